"""The fast way a policy is read (libyaml's events, lines found only on
error) gives what the node tree gives: the same data, the same Policy, the
same problems with the same file:line, and takes the node tree for
everything it does not handle."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest
import yaml

from aus.core import policy as P
from aus.core import yamlsource
from aus.core.errors import PolicyError
from aus.core.yamlevents import SLOW, fast_load

REPO = Path(__file__).resolve().parents[2]

PLAIN = [
    "",
    "---\n",
    "a: 1\n",
    "just a string\n",
    "- 1\n- 2\n",
    "[]\n",
    "{}\n",
    "a: ~\nb: null\nc:\nd: Null\n",
    "t: [true, false, yes, no, on, off, True, FALSE]\n",
    "n: [0, -1, +7, 0x1f, 0o17, 017, 1_000, 0b101, 1:30]\n",
    "f: [1.5, -0.0, .5, 1e3, 6.8e+3, .inf, -.Inf, 1_0.5]\n",
    "d: [2001-12-14, 2001-12-14t21:59:43.10-05:00, 2001-12-14 21:59:43.10]\n",
    "s: ['443/tcp', \"8000-8100/tcp\", '1', \"true\", 10.0.0.0/8, '::1/128', 'a''b', \"\\t\\u00e9\"]\n",
    "k:\n  1: int key\n  true: bool key\n  '1': str key\n  ~: null key\n",
    "block: |\n  line one\n  line two\nfolded: >\n  a\n  b\n",
    "nested:\n  - a: [1, {b: [2, 3]}]\n  - - x\n    - y\n",
    "unicode: ÄÖÜ \U0001F600\n",
    "eq: '='\nmerge_text: '<<'\n",
    textwrap.dedent("""\
        user_groups:
          - name: DEV
            sid: S-1-5-21-1-2-3-1104
        ip_lists:
          internet: ["0.0.0.0/0", "::/0"]
        services:
          web: ["80/tcp", "443/tcp"]
        rules:
          - name: dev-web
            sources: [DEV]
            destinations: [internet]
            services: [web, "8000-8100/tcp", "53/udp", icmp]
        """),
]

SLOW_DOCS = [
    "a: &x 1\nb: *x\n",                 # anchors and aliases
    "a: !!str 1\n",                     # explicit tags
    "a: !custom x\n",
    "base: &b {x: 1}\nc:\n  <<: *b\n",  # merge key
    "a: 1\na: 2\n",                     # duplicate key
    "? [a, b]\n: c\n",                  # complex key
    "a: 1\n---\nb: 2\n",                # two documents
    "a: [1, 2\n",                       # invalid
    "a: b: c\n",
    "a: \x07\n",                        # a character the reader refuses
    "s: [::1/128]\n",
    "e: =\n",                           # the value tag: no safe constructor
]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_documents_load_as_the_safe_loader_loads_them(text):
    got = fast_load(text)
    assert got is not SLOW
    want = yaml.load(text, Loader=yaml.SafeLoader)
    assert got == want
    assert repr(got) == repr(want)       # same types and key order too


@pytest.mark.parametrize("text", SLOW_DOCS)
def test_anything_else_takes_the_node_tree(text):
    assert fast_load(text) is SLOW


@pytest.mark.parametrize("text", SLOW_DOCS[:7])
def test_documents_of_the_slow_way_still_load_or_fail_as_before(text):
    try:
        want = ("ok", yaml.load(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        want = ("error",)
    try:
        data, _ = yamlsource.load_yaml_with_lines(text, "t.yaml")
        got = ("ok", data)
    except yamlsource.YamlSourceError:
        got = ("error",)
    if text.startswith("a: 1\na: 2"):
        assert got == ("error",)         # duplicate keys are refused, as before
    else:
        assert got == want


def test_dates_are_dates():
    assert fast_load("d: 2001-12-14\n") == {"d": dt.date(2001, 12, 14)}


def _slow(monkeypatch):
    """Make the loader take the node tree for everything (the old path)."""
    monkeypatch.setattr(yamlsource, "fast_load", lambda text: SLOW)


def big_policy_text(rules: int, bad_at: int | None = None) -> str:
    out = []
    for i in range(rules):
        src = "no-such-group" if i == bad_at else f"team{i % 50}"
        dests = '["web"]' if i % 7 == 0 else \
            f'["10.{(i >> 8) & 255}.{i & 255}.0/24", "2001:db8:{i:x}::/48"]'
        svcs = '["web"]' if i % 3 == 0 else '["443/tcp", "8000-8100/tcp", icmp]'
        out.append(f"  - name: rule-{i}\n    sources: [{src}, ops]\n"
                   f"    destinations: {dests}\n    services: {svcs}\n")
    groups = "".join(f"  - name: team{k}\n" for k in range(50)) + "  - name: ops\n"
    return (f"user_groups:\n{groups}ip_lists:\n  web: [192.0.2.0/24, '2001:db8::/32']\n"
            f"services:\n  web: [80/tcp, 443/tcp]\nrules:\n" + "".join(out))


def test_example_policies_give_the_same_policy_both_ways(monkeypatch):
    texts = [(REPO / "packaging" / "policy.example.yaml").read_text(), PLAIN[-1]]
    fast = [P.policy_from_text(t, "p.yaml") for t in texts]
    _slow(monkeypatch)
    slow = [P.policy_from_text(t, "p.yaml") for t in texts]
    assert fast == slow
    assert [p.model_dump() for p in fast] == [p.model_dump() for p in slow]
    assert len(fast[0].rules) > 0


def test_a_10000_rule_policy_gives_the_same_policy_both_ways(monkeypatch):
    text = big_policy_text(10_000)
    fast = P.policy_from_text(text, "big.yaml")
    assert len(fast.rules) == 10_000
    _slow(monkeypatch)
    slow = P.policy_from_text(text, "big.yaml")
    assert fast == slow
    assert fast.model_dump() == slow.model_dump()
    rule = fast.rules[9_999]
    assert fast.destinations_of(rule) == slow.destinations_of(rule)
    assert fast.services_of(rule) == slow.services_of(rule)


def test_errors_in_a_10000_rule_file_name_file_and_line(monkeypatch, tmp_path):
    path = tmp_path / "big.yaml"
    text = big_policy_text(10_000, bad_at=9_998)
    path.write_text(text)
    with pytest.raises(PolicyError) as fast:
        P.load_policy(path)
    line = text.splitlines().index("  - name: rule-9998") + 2      # its sources line
    assert fast.value.source == str(path)
    assert fast.value.problems == [
        f"line {line}: rules[9998].sources[0]: 'no-such-group' is not a declared user group"]
    assert str(path) in str(fast.value)
    _slow(monkeypatch)
    with pytest.raises(PolicyError) as slow:
        P.load_policy(path)
    assert str(fast.value) == str(slow.value)
    assert fast.value.located == slow.value.located


@pytest.mark.parametrize("text", [
    "rules:\n  - name: a\n    sources: [X]\n    destinations: [10.0.0.0/8]\n    services: [1/tcp]\n"
    "  - name: a\n    sources: [X]\n    destinations: [10.0.0.1/8]\n    services: [99999/tcp]\n",
    "user_groups:\n  - name: X\n    colour: red\nrules: 3\n",
    "ip_lists:\n  a: [1.2.3.4]\n  a: [5.6.7.8]\n",
    "rules:\n  - name: r\n    sources: [X]\n  destinations: oops\n",
    "ip_lists: {a: [1.2.3.4]}\nrules:\n  - {name: r, sources: [X], destinations: [*a], services: [tcp]}\n",
])
def test_every_problem_is_reported_as_before(monkeypatch, text):
    with pytest.raises(PolicyError) as fast:
        P.policy_from_text(text, "p.yaml")
    _slow(monkeypatch)
    with pytest.raises(PolicyError) as slow:
        P.policy_from_text(text, "p.yaml")
    assert fast.value.problems == slow.value.problems
    assert fast.value.located == slow.value.located
    assert all(p.startswith("line ") for p in fast.value.problems), fast.value.problems


DNS_TEXT = textwrap.dedent("""\
    user_groups: [{name: DEV}]
    ip_lists:
      github: [dns:github.com, dns:*.githubusercontent.com, "dns:*.GitHub.io.", 140.82.112.0/20]
      block:
        - dns:pypi.org
        - dns:*.pythonhosted.org
        - dns:bücher.example
    rules:
      - name: names
        sources: [DEV]
        destinations: [github, block, dns:*.example.org, 'dns:example.org']
        services: [443/tcp]
    """)


def test_dns_names_give_the_same_policy_both_ways(monkeypatch):
    assert fast_load(DNS_TEXT) is not SLOW        # plain: the event path reads it
    fast = P.policy_from_text(DNS_TEXT, "p.yaml")
    _slow(monkeypatch)
    slow = P.policy_from_text(DNS_TEXT, "p.yaml")
    assert fast == slow and fast.model_dump() == slow.model_dump()
    rule = fast.rules[0]
    assert fast.dns_of(rule) == slow.dns_of(rule)
    assert [str(p) for p in fast.dns_of(rule)] == [
        "dns:github.com", "dns:*.githubusercontent.com", "dns:*.github.io", "dns:pypi.org",
        "dns:*.pythonhosted.org", "dns:xn--bcher-kva.example", "dns:*.example.org",
        "dns:example.org"]
    assert [str(n) for n in fast.destinations_of(rule)] == ["140.82.112.0/20"]


def test_bad_dns_names_are_reported_the_same_both_ways(monkeypatch):
    text = DNS_TEXT.replace("dns:pypi.org", "dns:*.org").replace("'dns:example.org'",
                                                                 "dns:10.1.2.3")
    with pytest.raises(PolicyError) as fast:
        P.policy_from_text(text, "p.yaml")
    _slow(monkeypatch)
    with pytest.raises(PolicyError) as slow:
        P.policy_from_text(text, "p.yaml")
    assert fast.value.problems == slow.value.problems == [
        "line 5: ip_lists.block[0]: 'dns:*.org' would match every name under the top-level "
        "domain 'org'; a wildcard needs at least two labels after '*.' (dns:*.example.com)",
        "line 11: rules[0].destinations[3]: 'dns:10.1.2.3' is an address, not a name: "
        "write 10.1.2.3 without dns:"]
