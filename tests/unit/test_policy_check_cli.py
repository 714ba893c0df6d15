"""`ausctl policy check FILE [--json]`: the real ausctl entry point run as a
subprocess, as an unprivileged user (nobody) when the tests run as root,
with a control socket that listens but must never be spoken to. Good files
exit 0; every kind of refusal exits 1 with every problem as
FILE:LINE: PATH: MESSAGE, or in the JSON shape."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

AUSCTL = Path(sys.executable).with_name("ausctl")   # the installed entry point

GOOD = """\
user_groups:
  - name: DEV
  - name: ops
ip_lists:
  lab: ["198.18.0.0/15"]
services:
  web: ["80/tcp", "443/tcp"]
rules:
  - name: dev-web
    sources: [DEV]
    destinations: [lab]
    services: [web]
  - name: ops-ssh
    sources: [ops]
    destinations: [lab, "10.1.2.3"]
    services: ["22/tcp"]
"""


@pytest.fixture(scope="module")
def place():
    """A directory everyone may read: the files, ausd.yaml, and a control
    socket that listens (a policy check must never connect to it)."""
    d = Path(tempfile.mkdtemp(prefix="aus-policy-check-"))
    d.chmod(0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(d / "ausd.sock"))
        os.chmod(d / "ausd.sock", 0o666)
        sock.listen(8)
        sock.setblocking(False)
        (d / "ausd.yaml").write_text(yaml.safe_dump(
            {"socket": str(d / "ausd.sock"), "max_rules": 16}))
        yield d, sock
        with pytest.raises(BlockingIOError):
            sock.accept()   # nobody connected
    finally:
        sock.close()
        shutil.rmtree(d)


def _unprivileged():
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)


def check(place, text: str, *extra: str, name: str = "policy.yaml") -> subprocess.CompletedProcess:
    d, _ = place
    f = d / name
    f.write_text(text)
    f.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([str(AUSCTL), "--config", str(d / "ausd.yaml"), "policy", "check",
                        str(f), *extra], capture_output=True, text=True, timeout=60, env=env,
                       preexec_fn=_unprivileged, cwd="/")
    assert "Traceback" not in p.stderr, p.stderr
    return p


def errors_of(p: subprocess.CompletedProcess) -> list[str]:
    return p.stderr.splitlines()


def test_runs_as_an_unprivileged_user():
    if os.geteuid() == 0:
        out = subprocess.run(["id", "-u"], capture_output=True, text=True,
                             preexec_fn=_unprivileged).stdout.strip()
        assert out == str(pwd.getpwnam("nobody").pw_uid)


def test_a_good_file_passes(place):
    p = check(place, GOOD)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("policy.yaml: OK, 2 rules, 2 user groups")
    assert p.stderr == ""
    p = check(place, GOOD, "--json")
    assert p.returncode == 0
    assert json.loads(p.stdout) == {"ok": True, "file": str(place[0] / "policy.yaml"),
                                    "errors": [], "rules": 2, "groups": ["DEV", "ops"]}


def test_an_empty_file_is_the_empty_policy(place):
    p = check(place, "", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["rules"] == 0


def test_every_reference_and_value_error_with_its_line_and_path(place):
    bad = (GOOD.replace("sources: [DEV]", "sources: [DVE]")
               .replace('"22/tcp"', '"22/tpc"')
               .replace('"10.1.2.3"', '"10.1.2.3/8"')
               .replace("name: ops-ssh", "name: dev-web"))
    p = check(place, bad)
    f = place[0] / "policy.yaml"
    assert p.returncode == 1
    assert p.stdout == ""
    assert errors_of(p) == [
        f"{f}:10: rules[0].sources[0]: 'DVE' is not a declared user group (did you mean 'DEV'?)",
        f"{f}:13: rules[1].name: duplicate rule name 'dev-web' (already used by rules[0]; "
        "names are compared case-insensitively)",
        f"{f}:15: rules[1].destinations[1]: '10.1.2.3/8' has host bits set: the network is "
        "10.0.0.0/8; write 10.0.0.0/8, or 10.1.2.3/32 for the single address",
        f"{f}:16: rules[1].services[0]: '22/tpc': unknown protocol 'tpc'; ports go with tcp or udp",
    ]
    p = check(place, bad, "--json")
    assert p.returncode == 1
    got = json.loads(p.stdout)
    assert got["ok"] is False and got["rules"] == 0 and got["groups"] == []
    assert got["errors"][0] == {"file": str(f), "line": 10, "path": "rules[0].sources[0]",
                                "message": "'DVE' is not a declared user group (did you mean 'DEV'?)"}
    assert [(e["line"], e["path"]) for e in got["errors"]] == [
        (10, "rules[0].sources[0]"), (13, "rules[1].name"),
        (15, "rules[1].destinations[1]"), (16, "rules[1].services[0]")]


def test_structure_errors_unknown_keys_and_wrong_types(place):
    bad = GOOD.replace("destinations: [lab]\n", "destination: [lab]\n").replace(
        '  lab: ["198.18.0.0/15"]', "  lab: 198.18.0.0/15")
    p = check(place, bad)
    f = place[0] / "policy.yaml"
    assert p.returncode == 1
    assert errors_of(p) == [
        f"{f}:5: ip_lists.lab: expected a list, got the string '198.18.0.0/15'",
        f"{f}:9: rules[0].destinations: required key is missing",
        f"{f}:11: rules[0].destination: unknown key 'destination'; did you mean "
        "'destinations'? (allowed keys: name, sources, destinations, services)",
    ]


def test_yaml_errors_carry_line_and_column(place):
    p = check(place, GOOD.replace("  - name: ops-ssh", "  - name: ops-ssh\n   bad"))
    f = place[0] / "policy.yaml"
    assert p.returncode == 1
    assert len(errors_of(p)) == 1 and errors_of(p)[0].startswith(f"{f}:14: column ")
    p = check(place, GOOD + "rules: []\n", "--json")
    assert json.loads(p.stdout)["errors"] == [{
        "file": str(f), "line": 17, "path": "",
        "message": "column 1: duplicate key 'rules' (first given on line 8)"}]


def test_what_only_the_compiler_refuses_is_refused(place):
    # ausd.yaml says max_rules: 16, so 14 rules fit (ids 0 and 1 are taken)
    rules = [{"name": f"r{i}", "sources": ["DEV"], "destinations": ["10.0.0.1"],
              "services": ["tcp"]} for i in range(15)]
    text = yaml.safe_dump({"user_groups": [{"name": "DEV"}], "rules": rules}, sort_keys=False)
    p = check(place, text)
    f = place[0] / "policy.yaml"
    assert p.returncode == 1
    assert errors_of(p) == [f"{f}:3: rules: the policy has more rules than max_rules (14)"]
    p = check(place, yaml.safe_dump({"user_groups": [{"name": "DEV"}], "rules": rules[:14]}))
    assert p.returncode == 0, p.stderr


def test_unreadable_and_non_utf8_files(place):
    d, _ = place
    missing = d / "nope.yaml"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([str(AUSCTL), "--config", str(d / "ausd.yaml"), "policy", "check",
                        str(missing), "--json"], capture_output=True, text=True, env=env,
                       preexec_fn=_unprivileged, timeout=60)
    assert p.returncode == 1
    assert json.loads(p.stdout)["errors"] == [{
        "file": str(missing), "line": None, "path": "",
        "message": "cannot read the policy: No such file or directory"}]
    f = d / "latin1.yaml"
    f.write_bytes(b"user_groups:\n  - name: caf\xe9\n")
    f.chmod(0o644)
    p = subprocess.run([str(AUSCTL), "--config", str(d / "ausd.yaml"), "policy", "check",
                        str(f)], capture_output=True, text=True, env=env,
                       preexec_fn=_unprivileged, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip() == f"{f}:2: not valid UTF-8 (byte 26)"


def test_the_daemon_refuses_what_the_check_refuses(place):
    """The check and ausd's loader are one code path: what ausd's reload
    error lists is what the check lists."""
    from aus.core.errors import PolicyError
    from aus.core.policy import load_policy
    bad = GOOD.replace("sources: [DEV]", "sources: [DVE]").replace('"22/tcp"', '"22/tpc"')
    p = check(place, bad)
    with pytest.raises(PolicyError) as exc:
        load_policy(place[0] / "policy.yaml")
    f = place[0] / "policy.yaml"
    assert errors_of(p) == [f"{f}:{e.removeprefix('line ')}" for e in exc.value.problems]


DNS = """\
user_groups: [{name: DEV}]
ip_lists:
  github: [dns:github.com, "dns:*.githubusercontent.com", 140.82.112.0/20]
rules:
  - name: dev-github
    sources: [DEV]
    destinations: [github]
    services: ["443/tcp"]
"""


def ausctl(place, *args: str) -> subprocess.CompletedProcess:
    d, _ = place
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([str(AUSCTL), "--config", str(d / "ausd.yaml"), *args],
                       capture_output=True, text=True, timeout=60, env=env,
                       preexec_fn=_unprivileged, cwd="/")
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_names_pass_the_check_and_explain_against_the_file(place):
    assert check(place, DNS, name="dns.yaml").returncode == 0
    f = str(place[0] / "dns.yaml")
    p = ausctl(place, "explain", "--groups", "DEV", "--to", "raw.GitHubUserContent.com",
               "--proto", "tcp", "--port", "443", "--policy", f, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert (res["to"], res["allowed"], res["reason"], res["rule"]) == \
        ("raw.githubusercontent.com", True, "dns", "dev-github")
    assert [g["pattern"] for g in res["dns"]["grants"]] == ["dns:*.githubusercontent.com"]
    p = ausctl(place, "explain", "--groups", "DEV", "--to", "github.com", "--proto", "tcp",
               "--port", "22", "--policy", f)
    assert p.returncode == 3
    assert p.stdout.splitlines()[:2] == [
        "DENIED: groups DEV -> github.com tcp/22 (a DNS name)",
        "  no rule of the user's allows this name on tcp/22"]
    assert "rule dev-github (rules[0], id 2) names it as dns:github.com: 443/tcp" in p.stdout
    p = ausctl(place, "explain", "--groups", "DEV", "--to", "*.github.com", "--proto", "tcp",
               "--port", "22", "--policy", f)
    assert p.returncode == 2 and "is a pattern; give a name" in p.stderr


def test_a_bad_name_is_refused_with_its_line(place):
    p = check(place, DNS.replace("dns:github.com", "dns:git_hub.com"), name="dns.yaml")
    assert p.returncode == 1
    assert errors_of(p) == [f"{place[0] / 'dns.yaml'}:3: ip_lists.github[0]: 'dns:git_hub.com': "
                            "the label 'git_hub' contains '_'; a label holds letters, digits "
                            "and hyphens only"]
