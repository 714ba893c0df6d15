"""bench.scale's rulesets part runs end to end in its tiny configuration
and reports what it measured: every login timed and checked in the
kernel, `ausctl session open` run, the policy file loaded and compiled.
(Whether the figures meet their targets is for a full run to say.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.kernel


def test_rulesets_part_runs_tiny(tmp_path):
    out, raw = tmp_path / "scale.md", tmp_path / "scale.json"
    tmp_path.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "bench.scale", "--tiny", "--only", "rulesets",
                        "--out", str(out), "--json", str(raw)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    text = out.read_text()
    assert "## Large rulesets" in text and "rulesets: FAILED" not in text
    res = json.loads(raw.read_text())["rulesets"]
    assert res["sizes"] == [1, 100, 1000]
    for n in res["sizes"]:
        new, shared = res[f"new_{n}"], res[f"shared_{n}"]
        # every login timed, each reply carrying exactly the user's n rules
        assert len(new["login_s"]) == res["logins"] and new["rules_per_user"] == [n]
        assert len(shared["login_s"]) == res["shared"] and shared["rules_per_user"] == [n]
        assert all(0 < x < 30 for x in new["login_s"] + shared["login_s"])
        runs = res[f"ausctl_{n}"]
        assert runs and all(r["exit"] == 0 for r in runs), runs
        assert f"| {n:,} | new (compiled and written) | {res['logins']} |" in text
        assert new["ausd_cpu_s"] > 0
    pf = res["policy_file"]
    assert pf["rules"] == 1000 and all(r["rules"] == 1000 for r in pf["runs"])
    assert all(r["load"] > 0 and r["compile"] > 0 for r in pf["runs"])
    # the refused file names the file and the line of its bad reference
    assert "big-policy-bad.yaml" in pf["bad"]["error"]
    assert "rules[999].sources[0]" in pf["bad"]["error"] and "line " in pf["bad"]["error"]
    for target in ("login to rules in the kernel, 1,000 rules per user",
                   "`ausctl session open` confirms, 1,000 rules per user",
                   "a 1,000-rule policy loads and compiles in <= 1 s"):
        assert target in text
