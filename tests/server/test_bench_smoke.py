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


def test_scale_sync_part_runs_tiny(tmp_path):
    """bench.scale's ``sync`` part, tiny: a real sync into PostgreSQL and
    real PATCH runs on both databases, every request answered 2xx."""
    out, raw = tmp_path / "scale.md", tmp_path / "scale.json"
    p = subprocess.run([sys.executable, "-m", "bench.scale", "--tiny", "--only", "sync",
                        "--out", str(out), "--json", str(raw)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    assert "## Initial sync and member PATCH" in text
    assert "initial sync of 600 users, 60 groups on PostgreSQL <= 300 s" in text
    assert "member PATCH on SQLite >= 500/s" in text
    r = json.loads(raw.read_text())["sync"]
    sync = r["pg_sync"]
    assert sync["errors"] == 0 and sync["users"] == 600 and sync["groups"] == 60
    # every user and group: a lookup and a POST; every group's members in PATCHes of <= 50
    assert sync["lookups"] == sync["posts"] == 660
    assert sync["memberships"] > 600 and sync["patches"] >= sync["memberships"] / 50
    assert sync["largest_group"] == 120 and 0 < sync["seconds"] < 300
    assert sync["server_cpu_s"] > 0
    for run in ("sqlite_patch", "pg_patch", "sqlite_baseline", "pg_baseline"):
        assert r[run]["errors"] == 0 and r[run]["requests"] > 10 and r[run]["rate"] > 0, run
        assert r[run]["server_cpu_ms"] > 0, run
