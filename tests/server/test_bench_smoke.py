"""The server benchmark runs end to end in its tiny configuration, so it
cannot rot. (Its figures mean something only in a full run on a quiet
machine; see BENCHMARKS.md.)"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_server_bench_runs_tiny(tmp_path):
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "bench.server", "--tiny", "--out", str(out),
                        "--json", str(raw)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    for heading in ("## SCIM request rate", "## Initial sync", "## Bundle fan-out", "## Verdicts"):
        assert heading in text
    results = json.loads(raw.read_text())
    assert [r["db"] for r in results] == ["sqlite", "postgresql"]
    for r in results:
        # every SCIM request of the sync and of each rate run succeeded
        assert r["sync"]["errors"] == 0 and r["sync"]["requests"] > r["sync"]["users"]
        for kind, rate in r["rates"].items():
            assert rate["errors"] == 0 and rate["requests"] > 0, (r["db"], kind)
        # every long-polling daemon received the changed bundle
        assert r["fanout"]["received"] == r["fanout"]["daemons"] > 1
