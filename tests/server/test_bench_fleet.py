"""The fleet part of bench.scale runs end to end at its tiny size (two
real replicas on a real PostgreSQL, 200 simulated long-polling workloads),
so it cannot rot, and its figures are the ones it measured."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = 200        # bench.fleet.TINY
WIRE_BUDGET = 2048     # bytes per workload for one membership change


def test_fleet_part_runs_tiny(tmp_path):
    out, raw_file = tmp_path / "scale.md", tmp_path / "scale.json"
    p = subprocess.run([sys.executable, "-m", "bench.scale", "--tiny", "--only", "fleet",
                        "--out", str(out), "--json", str(raw_file)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    raw = json.loads(raw_file.read_text())["fleet"]
    text = out.read_text()
    n = WORKLOADS

    # every workload received the new version of each change, once, with bytes on the wire
    for kind in ("membership", "rule"):
        f = raw[kind]
        assert f["workloads"] == f["received"] == n, (kind, f)
        assert len(f["versions"]) == 1, (kind, f["versions"])
        assert f["bytes_max"] >= f["bytes_median"] > 0
        assert 0 < f["max_from_send_s"] < 60 and f["max_from_send_s"] >= f["max_from_answer_s"]
        assert f["lost"] == 0 and f["errors"] == []
        # the one workload alone saw the same kind of answer
        assert raw["alone"][kind]["received"] == 1
    assert raw["rule"]["versions"][0] > raw["membership"]["versions"][0]
    # a full bundle carries every policy group's members: more than a member list's bytes
    if not raw["membership"]["deltas"]:
        assert raw["membership"]["bytes_median"] > raw["bundle_bytes"]

    mem = raw["memory"]
    # polls held by one replica (a loaded machine may have some on their way back)
    assert 0 < mem["held"] <= n and 0 < mem["most_held"] <= n and mem["held_rss"] > mem["idle_rss"] > 0
    assert 0 < sum(raw["spread"]["held"]) <= n and min(raw["spread"]["held"]) > 0

    # one row per target in the verdict table, each with its figure and MET or MISSED
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| fleet: ")]
    assert len(rows) == 5, rows
    targets = [r[0] for r in rows]
    assert "membership" in targets[0] and "2 KB" in targets[1] and "rule" in targets[2]
    assert "memory per held" in targets[3] and "held by one replica" in targets[4]
    assert all(r[1].strip() and r[2].strip(" |") in ("MET", "**MISSED**") for r in rows)
    assert (rows[1][2].strip(" |") == "MET") == (raw["membership"]["bytes_max"] <= WIRE_BUDGET)
    assert (rows[0][2].strip(" |") == "MET") == (raw["membership"]["max_from_send_s"] <= 2)
    for heading in ("| change |", "Method.", "Memory:"):
        assert heading in text
