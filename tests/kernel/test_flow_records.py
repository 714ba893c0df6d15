"""Flow records from the real ausd on a test cgroup, made by real traffic
of real managed users: user names, policy groups, rules and verdicts
(allowed and denied in enforce, would_deny in visibility), counts that
match the refused calls, the JSON-lines export rotating at its size, the
journal export (received on a test socket the configuration points to:
this host runs no journald), the window cap, and the ausctl filters."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel

WINDOW = 1.0


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="aus-test-flows-") as d:
        yield Path(d)


def send_udp(cg, user, addr: str, ports: list[int], repeat: int = 1) -> dict:
    """Unconnected UDP datagrams from the user's own process, to each port
    ``repeat`` times; how many sendto() calls were refused."""
    code = ("import json, socket, sys\n"
            "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
            "s = socket.socket(fam, socket.SOCK_DGRAM)\n"
            "refused = {}\n"
            "for port in map(int, sys.argv[3:]):\n"
            "    for _ in range(int(sys.argv[2])):\n"
            "        try: s.sendto(b'x', (sys.argv[1], port))\n"
            "        except PermissionError: refused[port] = refused.get(port, 0) + 1\n"
            "print(json.dumps(refused))\n")
    p = lab.spawn([lab.PYTHON, "-c", code, addr, str(repeat), *map(str, ports)], cg=cg,
                  loginuid=user.uid, uid=user.uid, gid=user.gid, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return {int(k): v for k, v in json.loads(out).items()}


def tcp(cg, user, addr, port) -> dict:
    return lab.act(cg, "tcp", addr, port, loginuid=user.uid, uid=user.uid, gid=user.gid)


def file_records(path: Path) -> list[dict]:
    out = []
    for p in sorted(path.parent.glob(path.name + "*")):
        out += [json.loads(line) for line in p.read_text().splitlines()]
    return out


def total(records, **want) -> int:
    return sum(r["count"] for r in records if all(r[k] == v for k, v in want.items()))


def events(d: lab.Ausd, *args: str) -> list[dict]:
    return [json.loads(line) for line in
            d.ctl("flows", "--json", "--limit", "2000", *args).stdout.splitlines()]


def as_user(d: lab.Ausd, user, *args: str) -> subprocess.CompletedProcess:
    p = lab.spawn([lab.PYTHON, "-m", "aus.cli.ausctl", "--config", str(d.config_path), *args],
                  loginuid=user.uid, uid=user.uid, gid=user.gid, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def test_enforce_records_file_export_and_filters(cg, peer, people):
    users, groups = people
    alice, bob = users["alice"], users["bob"]
    dev = groups["dev"].upper()           # the policy's name of alice's group
    with scratch() as tmp:
        log = tmp / "log" / "flows.jsonl"
        flow_log = {"path": str(log), "max_bytes": 4096, "keep": 2}
        with lab.ausd(cg, lab_policy(peer, groups), flow_window=WINDOW,
                      flow_log=flow_log) as d:
            d.start()
            with lab.session(d, alice.uid), lab.session(d, bob.uid):
                assert tcp(cg, alice, peer.v4, 80)["ok"]
                for _ in range(3):
                    assert tcp(cg, alice, peer.v4, 443)["errno"] == "EPERM"
                refused = send_udp(cg, alice, peer.v4, [9], repeat=40)
                assert refused == {9: 40}
                assert tcp(cg, bob, peer.v4, 22)["ok"]

                def written():
                    recs = file_records(log)
                    ok = (total(recs, user=alice.name, port=9, verdict="denied") == 40
                          and total(recs, user=alice.name, port=443) == 3
                          and total(recs, user=bob.name, port=22) >= 1
                          and total(recs, user=alice.name, port=80) >= 1)
                    return recs if ok else None
                recs = lab.wait_until(written, timeout=20, what="records in the flow log")

                # One connect() allowed, three refused, forty refused sendto():
                # each refused call is one event, the allowed connection one.
                allowed = [r for r in recs if r["user"] == alice.name and r["port"] == 80]
                assert {(r["verdict"], r["rule"], r["proto"], r["dst"]) for r in allowed} == \
                    {("allowed", "dev-web", "tcp", peer.v4)}
                assert sum(r["count"] for r in allowed) == 1
                denied = [r for r in recs if r["user"] == alice.name and r["port"] == 443]
                assert {(r["verdict"], r["rule"]) for r in denied} == {("denied", "")}
                for r in recs:
                    if r["user"] == alice.name:
                        assert r["groups"] == [dev] and r["login_uid"] == alice.uid
                        assert r["process"].startswith("python")
                    else:
                        assert r["user"] == bob.name and r["groups"] == [groups["ops"]]
                        assert r["rule"] == "ops-ssh" and r["verdict"] == "allowed"

                # The aggregated records through ausctl, and what a user may see.
                view = d.ctl_json("flows", "--records", "--user", alice.name)["records"]
                assert view and {r["user"] for r in view} == {alice.name}
                mine = json.loads(as_user(d, bob, "flows", "--records", "--json").stdout)
                assert mine["records"] and {r["login_uid"] for r in mine["records"]} == {bob.uid}
                table = d.ctl("flows", "--records", "--verdict", "denied").stdout
                assert alice.name in table and dev in table and bob.name not in table

                # The event filters, with user names shown.
                every = events(d)
                assert {f["user"] for f in every} >= {alice.name, bob.name}
                assert f"user={alice.name}" in d.ctl("flows", "--user", alice.name).stdout
                den = events(d, "--verdict", "denied")
                assert den and all(f["verdict"] == "deny" for f in den)
                assert {f["dport"] for f in den} == {443, 9}
                ssh = events(d, "--to", f"{peer.v4}/32", "--port", "22")
                assert ssh and {(f["user"], f["dport"]) for f in ssh} == {(bob.name, 22)}
                assert not events(d, "--to", "198.51.100.0/24")
                assert len(events(d, "--since", "1h")) == len(every)
                assert not events(d, "--since", "2099-01-01T00:00:00Z")
                assert events(d, "--user", alice.name, "--verdict", "allowed") == \
                    [f for f in every if f["user"] == alice.name and f["verdict"] == "allow"]
                bad = d.ctl("flows", "--to", "10.0.0.0/33", check=False)
                assert bad.returncode == 2 and "not an address or CIDR" in bad.stderr

                # --follow applies the filters too.
                follow = subprocess.Popen(
                    [*d.ausctl_cmd, "--config", str(d.config_path), "flows", "--follow",
                     "--json", "--limit", "0", "--port", "443"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                try:
                    # Traffic until the follower (connecting meanwhile) prints:
                    # the UDP datagram to port 10 must never pass its filter.
                    sel = selectors.DefaultSelector()
                    sel.register(follow.stdout, selectors.EVENT_READ)
                    deadline = time.monotonic() + 20
                    while not sel.select(0.5):
                        assert time.monotonic() < deadline, "the follower printed nothing"
                        send_udp(cg, alice, peer.v4, [10])
                        tcp(cg, alice, peer.v4, 443)
                    line = json.loads(follow.stdout.readline())
                    assert (line["dport"], line["user"], line["verdict"]) == \
                        (443, alice.name, "deny")
                finally:
                    follow.kill()
                    follow.wait()

                # Rotation: enough distinct records for several files of 4 KiB.
                assert send_udp(cg, alice, peer.v4, list(range(2000, 2060)))
                rotated = lab.wait_until(
                    lambda: (st := d.ctl_json("status")["flow_records"])["export"]["rotations"]
                    >= 2 and st, timeout=20, what="the flow log rotated twice")
                files = sorted(p.name for p in log.parent.iterdir())
                assert files == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
                for p in log.parent.iterdir():
                    assert 0 < p.stat().st_size <= 4096
                    assert all(json.loads(line)["login_uid"] for line in p.read_text().splitlines())
                assert rotated["export"]["failures"] == 0
                assert rotated["windows_closed"] >= 2 and rotated["dropped"] == 0
                status = d.ctl("status").stdout
                assert "records:" in status and "dropped by the cap" in status


def test_visibility_records_journal_export_and_cap(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with scratch() as tmp:
        path = tmp / "journal.sock"
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(str(path))
        rx.settimeout(20)
        try:
            with lab.ausd(cg, lab_policy(peer, groups), mode="visibility", flow_window=WINDOW,
                          flow_window_records=5, flow_log={"journal": str(path)}) as d:
                d.start()
                with lab.session(d, alice.uid):
                    assert tcp(cg, alice, peer.v4, 443)["ok"]      # would be denied
                    assert tcp(cg, alice, peer.v4, 80)["ok"]
                    got = {}
                    while not {"would_deny", "allowed"} <= {e["AUS_VERDICT"] for e in got.values()}:
                        e = parse(rx.recv(65536))
                        got[(e["AUS_PORT"], e["AUS_VERDICT"])] = e
                    e = got[("443", "would_deny")]
                    assert (e["AUS_USER"], e["AUS_LOGIN_UID"], e["AUS_DST"], e["AUS_PROTO"],
                            e["AUS_RULE"], e["AUS_GROUPS"]) == \
                        (alice.name, str(alice.uid), peer.v4, "tcp", "", groups["dev"].upper())
                    assert e["PRIORITY"] == "5" and e["MESSAGE"].startswith(f"would_deny {alice.name}")
                    assert got[("80", "allowed")]["AUS_RULE"] == "dev-web"

                    # Twenty destinations in one burst, five records a window.
                    send_udp(cg, alice, peer.v4, list(range(3000, 3020)))
                    st = lab.wait_until(
                        lambda: (s := d.ctl_json("status")["flow_records"])["dropped"] >= 10 and s,
                        timeout=20, what="records dropped by the window cap")
                    assert st["cap"] == 5 and st["records_open"] <= 5
                    assert st["export"]["kind"] == "journal" and st["export"]["failures"] == 0
                    assert d.proc.poll() is None
        finally:
            rx.close()


def parse(data: bytes) -> dict:
    return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
