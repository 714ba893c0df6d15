"""The test DNS server as the end-to-end tests run it: a process of its
own that says ``ready`` once bound, answers from a JSON zone over UDP and
TCP with exactly the zone's TTLs, follows CNAME chains inside one answer,
says NXDOMAIN for what the zone lacks, and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

REPO = Path(__file__).resolve().parents[2]
ZONE = {"github.com": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"], "ttl": 7},
        "www.example.org": {"CNAME": "edge.example.net", "ttl": 30},
        "edge.example.net": {"A": "192.0.2.9", "ttl": 3}}


def records(answer: dns.message.Message) -> list[tuple[str, int, str, list[str]]]:
    return [(r.name.to_text().lower(), r.ttl, dns.rdatatype.to_text(r.rdtype),
             sorted(rd.to_text() for rd in r)) for r in answer.answer]


def test_the_server_process(tmp_path):
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps(ZONE))
    env = dict(os.environ, PYTHONPATH=f"{REPO}/daemon:{REPO}")
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.dnsserver", "--listen", "127.0.0.1",
                             "--port", "0", "--zone", str(zone)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        port = int(proc.stdout.readline().split()[1])
        assert proc.stdout.readline().strip() == "ready"
        ask = dns.message.make_query
        r = dns.query.udp(ask("GITHUB.com.", "A"), "127.0.0.1", port=port, timeout=5)
        assert records(r) == [("github.com.", 7, "A", ["192.0.2.1", "192.0.2.2"])]
        r = dns.query.tcp(ask("github.com", "AAAA"), "127.0.0.1", port=port, timeout=5)
        assert records(r) == [("github.com.", 7, "AAAA", ["2001:db8::1"])]
        r = dns.query.udp(ask("www.example.org", "A"), "127.0.0.1", port=port, timeout=5)
        assert records(r) == [("www.example.org.", 30, "CNAME", ["edge.example.net."]),
                              ("edge.example.net.", 3, "A", ["192.0.2.9"])]
        r = dns.query.udp(ask("edge.example.net", "AAAA"), "127.0.0.1", port=port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR and r.answer == []
        r = dns.query.tcp(ask("gitlab.com", "A"), "127.0.0.1", port=port, timeout=5)
        assert r.rcode() == dns.rcode.NXDOMAIN
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
