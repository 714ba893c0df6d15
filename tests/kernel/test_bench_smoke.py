"""The benchmark suite runs, end to end, in a tiny configuration, so it
cannot rot. (Figures are not checked here: they mean something only in a
full run on a quiet machine; see BENCHMARKS.md.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.kernel


def test_bench_suite_runs_tiny(tmp_path):
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    tmp_path.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--out", str(out),
                        "--json", str(raw)], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    # the first error is the cause; what follows it is the unwinding
    assert p.returncode == 0, p.stderr[:3000] + "\n[...]\n" + p.stderr[-1500:]
    text = out.read_text()
    for heading in ("## Data path", "## Control path", "## Verdicts"):
        assert heading in text
    data = json.loads(raw.read_text())
    samples = data["datapath"]["samples"]
    assert set(samples) == {"connect allowed", "connect denied", "udp allowed", "udp denied",
                            "bulk tcp"}
    # every configuration was measured in every round, and traffic flowed
    for workload, by_config in samples.items():
        assert "aus 10x10" in by_config and "nft-set 10x10" in by_config
        for config, rows in by_config.items():
            assert all(r["rate"] > 0 for r in rows), (workload, config)
    # allowed traffic went through under aus, denied traffic was refused
    aus = samples["connect allowed"]["aus 10x10"]
    assert all(r["ok"] > 0 and r["fail"] == 0 for r in aus)
    denied = samples["connect denied"]["aus 10x10"]
    assert all(r["ok"] == 0 and r["fail"] > 0 for r in denied)
    cp = data["controlpath"]
    assert len(cp["login_s"]) == cp["logins"] and cp["users_in_maps_at_ready"] == cp["users"]


def test_scale_startup_part_runs_tiny(tmp_path):
    """bench.scale's start-up part, tiny: both directory backends measured,
    every user in the maps at READY, the restart took the attached
    programs and refreshed every adopted user, the logins answered."""
    out, raw = tmp_path / "scale.md", tmp_path / "scale.json"
    tmp_path.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "bench.scale", "--tiny", "--only", "startup",
                        "--out", str(out), "--json", str(raw)], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    text = out.read_text()
    assert "## Start-up: READY without waiting for the directory" in text
    data = json.loads(raw.read_text())["startup"]
    assert set(data) == {"files", "sssd"}
    for backend, r in data.items():
        n = r["users"]
        assert r["cold_users_in_maps"] == n and r["restart_users_in_maps"] == n, backend
        assert 0 < r["restart_s"] < 60 and 0 < r["cold_start_s"] < 120, backend
        assert "take the attached programs" in r["restart_stages"], backend
        assert "directory lookups" not in r["restart_stages"], backend
        # (>=: the scan also sees other login sessions of this machine)
        assert r["refresh"]["adopted_at_start"] >= n and r["refresh"]["adopted_not_refreshed"] == 0
        assert r["refresh"]["answered"] >= n and r["refresh_s"] is not None
        assert len(r["logins_s"]) == r["logins"] and all(x > 0 for x in r["logins_s"])
        for target in ("restart to READY adopting pins", "cold start to READY",
                       "login right after a restart"):
            assert f"startup ({backend}): {target}" in text


def test_scale_connect_part_runs_tiny(tmp_path):
    """bench.scale's connect part: ratios of both allowed workloads in every
    round, verdicts from them, and a profile of the programs that ran."""
    out, raw = tmp_path / "scale.md", tmp_path / "scale.json"
    tmp_path.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "bench.scale", "--tiny", "--only", "connect",
                        "--out", str(out), "--json", str(raw)], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[:3000] + "\n[...]\n" + p.stderr[-1500:]
    text = out.read_text()
    assert "## Connect and UDP rates at fleet size" in text
    assert "connect allowed rate >= 0.95 of no filter at 100 x 10" in text
    data = json.loads(raw.read_text())["connect"]
    assert set(data["samples"]) == {"connect allowed", "udp allowed"}
    assert "udp allowed rate >= 0.95 of no filter at 100 x 10, allowed by a DNS-derived " \
        "entry" in text
    for workload in ("connect allowed", "udp allowed"):
        # by an address rule and by a DNS-derived entry: allowed traffic went
        # through, and the baseline it is compared with ran too
        for config in ("aus 100x10", "aus-dns 100x10"):
            rows = data["samples"][workload][config]
            assert len(rows) == data["rounds"] == 2
            assert all(r["ok"] > 0 and r["fail"] == 0 and r["base"] > 0 for r in rows), rows
    runs = {(r["workload"], r["program"]): r for r in data["profile"]}
    # a connection runs sock_create and connect4 once each, a datagram sendmsg4 once
    for key in (("connect", "sock_create"), ("connect", "connect4"), ("udp", "sendmsg4")):
        assert key in runs, sorted(runs)
        assert 0.9 <= runs[key]["runs_per_op"] <= 1.1 and runs[key]["ns_per_run"] > 0
