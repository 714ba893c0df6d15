"""Policy model and loader: parsing, resolution and every refusal."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest
from pydantic import ValidationError

from aus.core.errors import PolicyError
from aus.core.policy import (
    Policy,
    Rule,
    ServiceSpec,
    UserGroup,
    empty_policy,
    load_policy,
    parse_network,
    parse_service,
    policy_from_text,
)

EXAMPLE = """\
user_groups:
  - name: DEV                 # as the directory names it
    sid: S-1-5-21-1-2-3-1104  # optional: AD SID
    external_id: 8f2c0c6e-1111-2222-3333-444455556666
ip_lists:
  internet: ["0.0.0.0/0", "::/0"]
services:
  web: ["80/tcp", "443/tcp"]
rules:
  - name: dev-web
    sources: [DEV]            # user group names
    destinations: [internet]  # ip list names or CIDRs / single IPs (v4 or v6)
    services: [web, "8000-8100/tcp", "53/udp", icmp]
"""

# A valid policy prefix; tests append rules that refer to it.
HEAD = """\
user_groups:
  - name: DEV
  - name: OPS
ip_lists:
  internet: ["0.0.0.0/0", "::/0"]
services:
  web: ["80/tcp", "443/tcp"]
rules:
"""
RULE_LINE = HEAD.count("\n") + 1  # line of the first appended rule


def net(text: str):
    return ipaddress.ip_network(text)


def refused(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        policy_from_text(textwrap.dedent(text), source="test.yaml")
    assert info.value.source == "test.yaml"
    assert info.value.problems
    return info.value.problems


def one_problem(text: str) -> str:
    problems = refused(text)
    assert len(problems) == 1, problems
    return problems[0]


def with_rule(**fields: str) -> str:
    """HEAD plus one rule; fields override the defaults (YAML flow text)."""
    values = {
        "name": "r1",
        "sources": "[DEV]",
        "destinations": "[internet]",
        "services": "[web]",
    }
    values.update(fields)
    lines = ["  - name: " + values.pop("name")]
    lines += [f"    {k}: {v}" for k, v in values.items() if v is not None]
    return HEAD + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# The example


def test_example_parses_and_resolves(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    policy = load_policy(path)

    assert policy.user_groups == [
        UserGroup(name="DEV", sid="S-1-5-21-1-2-3-1104",
                  external_id="8f2c0c6e-1111-2222-3333-444455556666")
    ]
    assert policy.ip_lists == {"internet": ["0.0.0.0/0", "::/0"]}
    assert policy.services == {"web": ["80/tcp", "443/tcp"]}
    (rule,) = policy.rules
    assert rule == Rule(name="dev-web", sources=["DEV"], destinations=["internet"],
                        services=["web", "8000-8100/tcp", "53/udp", "icmp"])
    assert policy.destinations_of(rule) == [net("0.0.0.0/0"), net("::/0")]
    assert policy.services_of(rule) == [
        ServiceSpec("tcp", 80, 80),
        ServiceSpec("tcp", 443, 443),
        ServiceSpec("tcp", 8000, 8100),
        ServiceSpec("udp", 53, 53),
        ServiceSpec("icmp", 0, 0),
    ]


def test_models_are_frozen():
    policy = policy_from_text(EXAMPLE)
    with pytest.raises(ValidationError):
        policy.rules = []  # type: ignore[misc]
    with pytest.raises(ValidationError):
        policy.rules[0].name = "x"  # type: ignore[misc]


def test_empty_text_and_sections_are_the_empty_policy():
    assert policy_from_text("") == empty_policy()
    assert policy_from_text("# nothing yet\n") == empty_policy()
    assert policy_from_text("rules:\nuser_groups:\n") == empty_policy()
    assert empty_policy() == Policy(user_groups=[], ip_lists={}, services={}, rules=[])


def test_group_lookup_is_case_insensitive():
    policy = policy_from_text(EXAMPLE)
    assert policy.group("dev") is policy.user_groups[0]
    assert policy.group("Dev").name == "DEV"
    assert policy.group("ops") is None


def test_sources_match_groups_case_insensitively():
    policy = policy_from_text(with_rule(sources="[dev, Ops]"))
    assert policy.rules[0].sources == ["dev", "Ops"]


# --------------------------------------------------------------------------
# Resolution


def test_destinations_ipv6_bare_ips_and_dedup():
    policy = policy_from_text(with_rule(
        destinations='[internet, "2001:db8::/32", "192.0.2.7", "2001:db8::1", '
                     '"0.0.0.0/0", "10.0.0.0/8"]'))
    assert policy.destinations_of(policy.rules[0]) == [
        net("0.0.0.0/0"),
        net("::/0"),
        net("2001:db8::/32"),
        net("192.0.2.7/32"),
        net("2001:db8::1/128"),
        net("10.0.0.0/8"),
    ]


def test_services_literals_and_dedup():
    policy = policy_from_text(with_rule(
        services='[web, "443/TCP", "8000-8100/udp", tcp, UDP, ICMP, any, "80/tcp"]'))
    assert policy.services_of(policy.rules[0]) == [
        ServiceSpec("tcp", 80, 80),
        ServiceSpec("tcp", 443, 443),
        ServiceSpec("udp", 8000, 8100),
        ServiceSpec("tcp", 0, 65535),
        ServiceSpec("udp", 0, 65535),
        ServiceSpec("icmp", 0, 0),
        ServiceSpec("any", 0, 0),
    ]


def test_policy_holds_its_parsed_networks_and_services():
    data = {
        "user_groups": [{"name": "DEV", "sid": None, "external_id": None}],
        "ip_lists": {"lan": ["10.0.0.0/8", "2001:db8::/32"]},
        "services": {"web": ["80/tcp", "443/tcp"]},
        "rules": [{"name": "r", "sources": ["DEV"], "destinations": ["lan", "192.0.2.7"],
                   "services": ["web", "53/udp"]}],
    }
    policy = Policy.model_validate(data)      # as the server builds it
    rule = policy.rules[0]
    nets = policy.destinations_of(rule)
    specs = policy.services_of(rule)
    assert nets == [parse_network(t) for t in ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7")]
    assert specs == [parse_service(t) for t in ("80/tcp", "443/tcp", "53/udp")]
    # parsed when the policy was validated, not at each question
    assert all(a is b for a, b in zip(nets, policy.destinations_of(rule), strict=True))
    assert all(a is b for a, b in zip(specs, policy.services_of(rule), strict=True))
    # the document keeps its text
    assert policy.model_dump() == data
    assert Policy.model_validate_json(policy.model_dump_json()) == policy


def test_unparsable_reference_is_reported_not_raised_while_parsing():
    with pytest.raises(ValidationError) as info:
        Policy.model_validate({"rules": [{"name": "r", "sources": ["DEV"],
                                          "destinations": ["intrnet"], "services": ["wbe"]}],
                               "user_groups": [{"name": "DEV"}],
                               "ip_lists": {"internet": ["0.0.0.0/0"]}})
    text = str(info.value)
    assert "rules[0].destinations[0]: 'intrnet' is neither an ip_list name nor a CIDR" in text
    assert "rules[0].services[0]: 'wbe' is neither a service name" in text


@pytest.mark.parametrize("text, spec", [
    ("22/tcp", ServiceSpec("tcp", 22, 22)),
    ("1/udp", ServiceSpec("udp", 1, 1)),
    ("65535/tcp", ServiceSpec("tcp", 65535, 65535)),
    ("1-65535/tcp", ServiceSpec("tcp", 1, 65535)),
    ("8000-8000/udp", ServiceSpec("udp", 8000, 8000)),
    ("Tcp", ServiceSpec("tcp", 0, 65535)),
    ("udp", ServiceSpec("udp", 0, 65535)),
    ("icmp", ServiceSpec("icmp", 0, 0)),
    ("ANY", ServiceSpec("any", 0, 0)),
])
def test_parse_service_accepts(text, spec):
    assert parse_service(text) == spec


@pytest.mark.parametrize("text, fragment", [
    ("0/tcp", "port 0 is outside 1..65535"),
    ("65536/udp", "port 65536 is outside 1..65535"),
    ("90-80/tcp", "range start 90 is above its end 80"),
    ("80/sctp", "unknown protocol 'sctp'"),
    ("80/icmp", "icmp has no ports"),
    ("80", "not a service literal"),
    ("http", "not a service literal"),
    ("a-b/tcp", "not a port or a LO-HI port range"),
    ("", "empty service"),
    ("icmpv6", "write 'icmp'"),
])
def test_parse_service_refuses(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_service(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text, network", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3", "10.1.2.3/32"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("2001:db8::1", "2001:db8::1/128"),
    ("::/0", "::/0"),
])
def test_parse_network_accepts(text, network):
    assert parse_network(text) == net(network)


@pytest.mark.parametrize("text, fragment", [
    ("10.0.0.1/8", "has host bits set: the network is 10.0.0.0/8"),
    ("2001:db8::1/32", "has host bits set: the network is 2001:db8::/32"),
    ("10.0.0.0/33", "not a valid CIDR"),
    ("10.0.0.0/255.0.0.0", "prefix length must be a number"),
    ("300.1.1.1", "not a valid IP address or CIDR"),
    ("fe80::1%eth0", "scoped IPv6"),
    ("", "empty address"),
])
def test_parse_network_refuses(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_network(text)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------
# Refusals: each with its line and path


def test_unknown_destination_names_line_and_path():
    rule = "  - {{name: r{i}, sources: [DEV], destinations: [{dst}], services: [web]}}\n"
    text = HEAD + "".join(rule.format(i=i, dst=d)
                          for i, d in enumerate(["internet", "internet", "intrnet"]))
    problem = one_problem(text)
    line = RULE_LINE + 2
    assert problem.startswith(
        f"line {line}: rules[2].destinations[0]: "
        "'intrnet' is neither an ip_list name nor a CIDR")
    assert "did you mean 'internet'?" in problem


def test_host_bits_refused_in_rule_and_list():
    problems = refused(HEAD.replace('"::/0"]', '"::/0", "10.0.0.1/8"]')
                       + '  - {name: r, sources: [DEV], destinations: ["192.168.1.1/24"], '
                         'services: [web]}\n')
    assert problems == [
        "line 5: ip_lists.internet[2]: '10.0.0.1/8' has host bits set: the network "
        "is 10.0.0.0/8; write 10.0.0.0/8, or 10.0.0.1/32 for the single address",
        f"line {RULE_LINE}: rules[0].destinations[0]: '192.168.1.1/24' has host bits "
        "set: the network is 192.168.1.0/24; write 192.168.1.0/24, or "
        "192.168.1.1/32 for the single address",
    ]


def test_unknown_source():
    problem = one_problem(with_rule(sources="[DEV, devs]"))
    assert problem == (f"line {RULE_LINE + 1}: rules[0].sources[1]: "
                       "'devs' is not a declared user group (did you mean 'DEV'?)")


def test_unknown_service_and_bad_literals():
    problems = refused(with_rule(services='[webb, "0/tcp", "90-80/udp", "80/sctp"]'))
    line = RULE_LINE + 3
    assert problems[0].startswith(
        f"line {line}: rules[0].services[0]: 'webb' is neither a service name "
        "nor a service literal")
    assert "did you mean 'web'?" in problems[0]
    assert problems[1] == f"line {line}: rules[0].services[1]: '0/tcp': port 0 is outside 1..65535"
    assert problems[2] == (f"line {line}: rules[0].services[2]: "
                           "'90-80/udp': range start 90 is above its end 80")
    assert problems[3].startswith(f"line {line}: rules[0].services[3]: '80/sctp': unknown protocol")
    assert len(problems) == 4


@pytest.mark.parametrize("field, offset, fragment", [
    ("sources", 1, "a rule needs at least one source"),
    ("destinations", 2, "a rule needs at least one destination"),
    ("services", 3, "a rule needs at least one service"),
])
def test_rule_lists_must_not_be_empty(field, offset, fragment):
    problem = one_problem(with_rule(**{field: "[]"}))
    assert problem == f"line {RULE_LINE + offset}: rules[0].{field}: {fragment}" + (
        " (a user group)" if field == "sources" else
        " (an ip list, a CIDR or a dns: name)" if field == "destinations" else "")


def test_rule_missing_key():
    problem = one_problem(with_rule(services=None))
    assert problem == f"line {RULE_LINE}: rules[0].services: required key is missing"


@pytest.mark.parametrize("name, fragment", [
    ('""', "a rule needs a non-empty name"),
    ("x" * 64, "rule name is 64 characters long; at most 63 are allowed"),
    ('"dev web"', "rule name 'dev web' contains ' '"),
    ('"a/b"', "contains '/'"),
])
def test_rule_name_refused(name, fragment):
    problem = one_problem(with_rule(name=name))
    assert problem.startswith(f"line {RULE_LINE}: rules[0].name: ")
    assert fragment in problem


def test_rule_name_limits_accepted():
    policy = policy_from_text(with_rule(name="A" * 63))
    assert policy.rules[0].name == "A" * 63
    policy_from_text(with_rule(name="ops_ssh.v2:prod@site-1"))


def test_duplicate_rule_names():
    text = with_rule(name="r1") + "  - {name: R1, sources: [DEV], destinations: [internet], services: [web]}\n"
    problem = one_problem(text)
    assert problem.startswith(f"line {RULE_LINE + 4}: rules[1].name: duplicate rule name 'R1'")


def test_duplicate_group_names_and_sids():
    problems = refused("""\
        user_groups:
          - {name: DEV, sid: S-1-5-21-1-2-3-1104}
          - {name: dev}
          - {name: Other, sid: s-1-5-21-1-2-3-1104}
          - {name: "  "}
        """)
    assert problems == [
        "line 3: user_groups[1].name: duplicate user group 'dev' (already declared as "
        "user_groups[0]; names are compared case-insensitively)",
        "line 4: user_groups[2].sid: duplicate SID 's-1-5-21-1-2-3-1104' (already "
        "given to user_groups[0])",
        "line 5: user_groups[3].name: a user group needs a non-empty name",
    ]


@pytest.mark.parametrize("sid", ["S-1-5", "S-1", "X-1-5-21", "S-1-5-21-", "S-1-5-abc", "1-5-21"])
def test_bad_sid(sid):
    problem = one_problem(f"user_groups:\n  - name: DEV\n    sid: \"{sid}\"\n")
    assert problem.startswith(f"line 3: user_groups[0].sid: '{sid}' is not a SID")


def test_sid_normalised():
    policy = policy_from_text("user_groups:\n  - {name: DEV, sid: s-1-5-21-7-1104}\n")
    assert policy.user_groups[0].sid == "S-1-5-21-7-1104"


def test_list_and_service_names_must_not_be_literals():
    problems = refused("""\
        ip_lists:
          10.0.0.0/8: ["10.0.0.0/8"]
          tcp: ["10.0.0.0/8"]
        services:
          "443/tcp": ["443/tcp"]
          "192.0.2.1": ["any"]
        """)
    assert problems == [
        "line 2: ip_lists['10.0.0.0/8']: the ip list name '10.0.0.0/8' reads as a "
        "CIDR/IP address; choose a name that does not",
        "line 3: ip_lists.tcp: the ip list name 'tcp' reads as a service literal; "
        "choose a name that does not",
        "line 5: services['443/tcp']: the service name '443/tcp' reads as a service "
        "literal; choose a name that does not",
        "line 6: services['192.0.2.1']: the service name '192.0.2.1' reads as a "
        "CIDR/IP address; choose a name that does not",
    ]


def test_lists_do_not_nest_and_hold_literals():
    problems = refused("""\
        ip_lists:
          a: ["10.0.0.0/8"]
          b: [a, "not-an-ip"]
        services:
          web: ["80/tcp"]
          more: [web, "http"]
        """)
    assert problems[0] == ("line 3: ip_lists.b[0]: 'a' is an ip list name; an ip list "
                           "holds CIDRs, addresses and dns: names only (lists do not nest)")
    assert problems[1] == "line 3: ip_lists.b[1]: 'not-an-ip' is not a valid IP address or CIDR"
    assert problems[2] == ("line 6: services.more[0]: 'web' is a service name; a service "
                           "holds service literals only (services do not nest)")
    assert problems[3].startswith("line 6: services.more[1]: 'http' is not a service literal")
    assert len(problems) == 4


def test_unused_lists_are_fine():
    policy = policy_from_text(HEAD)
    assert policy.rules == []
    assert "internet" in policy.ip_lists


def test_empty_lists_refused():
    problems = refused("ip_lists:\n  none: []\nservices:\n  nothing: []\n")
    assert problems == [
        "line 2: ip_lists.none: ip list 'none' is empty; give it at least one CIDR",
        "line 4: services.nothing: service 'nothing' is empty; give it at least one service",
    ]


def test_unknown_keys_refused_at_every_level():
    problems = refused(HEAD.replace("  - name: OPS", "  - name: OPS\n    colour: red")
                       + "  - {name: r, sources: [DEV], destinations: [internet],"
                         " services: [web], action: allow}\n"
                       + "rulez: []\n")
    assert problems[0].startswith("line 4: user_groups[1].colour: unknown key 'colour'")
    assert problems[1].startswith(f"line {RULE_LINE + 1}: rules[0].action: unknown key 'action'")
    assert problems[2].startswith(f"line {RULE_LINE + 2}: rulez: unknown key 'rulez'; "
                                  "did you mean 'rules'?")
    assert len(problems) == 3


def test_wrong_types():
    problems = refused("""\
        user_groups:
          - DEV
          - {name: 42}
        ip_lists: ["10.0.0.0/8"]
        rules:
          - {name: r, sources: DEV, destinations: [internet], services: [any]}
        """)
    assert problems == [
        "line 2: user_groups[0]: expected a mapping, got the string 'DEV'",
        "line 3: user_groups[1].name: expected a string, got the integer 42 "
        "(put it in quotes to make it a string)",
        "line 4: ip_lists: expected a mapping, got a list",
        "line 6: rules[0].sources: expected a list, got the string 'DEV'",
    ]


def test_many_problems_collected_in_line_order():
    problems = refused("""\
        user_groups:
          - {name: DEV}
          - {name: dev}
        ip_lists:
          lan: ["10.0.0.1/8"]
        rules:
          - name: "bad name"
            sources: [QA]
            destinations: [wan]
            services: ["99999/tcp"]
          - name: ok
            sources: []
            destinations: [lan]
            services: [any]
            extra: true
        """)
    lines = [int(p.split(":")[0].split()[1]) for p in problems]
    assert lines == sorted(lines)
    assert [p.split(": ")[1] for p in problems] == [
        "user_groups[1].name",
        "ip_lists.lan[0]",
        "rules[0].name",
        "rules[0].sources[0]",
        "rules[0].destinations[0]",
        "rules[0].services[0]",
        "rules[1].sources",
        "rules[1].extra",
    ]
    assert lines == [3, 5, 7, 8, 9, 10, 12, 15]


def test_yaml_syntax_error_has_line_and_column():
    problem = one_problem("rules:\n  - name: a\n    sources: [DEV\n  - name: b\n")
    assert problem.startswith("line 4, column ")
    problem = one_problem("user_groups:\n\t- name: DEV\n")
    assert problem.startswith("line 2, column 1: ")


def test_duplicate_yaml_keys_refused():
    problem = one_problem("ip_lists:\n  a: [10.0.0.0/8]\n  a: [10.1.0.0/16]\n")
    assert problem == "line 3, column 3: duplicate key 'a' (first given on line 2)"


def test_top_level_must_be_a_mapping():
    problem = one_problem("- DEV\n- OPS\n")
    assert problem.startswith("line 1: the policy must be a mapping")


def test_unsafe_tags_refused():
    problem = one_problem("rules: !!python/object/apply:os.system ['true']\n")
    assert problem.startswith("line 1, column 8: could not determine a constructor")


def test_load_policy_unreadable_and_missing(tmp_path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert info.value.source == str(missing)
    assert "cannot read the policy" in info.value.problems[0]
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)  # a directory
    assert info.value.source == str(tmp_path)


def test_load_policy_error_names_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(with_rule(destinations="[intrnet]"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: policy refused:\n  line {RULE_LINE + 2}: ")


def test_load_policy_empty_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("")
    assert load_policy(path) == empty_policy()


def test_load_policy_not_utf8(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"rules:\n  - name: \xff\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems == ["line 2: not valid UTF-8 (byte 17)"]


def test_direct_construction_checks_references():
    with pytest.raises(ValidationError) as info:
        Policy(rules=[Rule(name="r", sources=["NOPE"], destinations=["10.0.0.0/8"],
                           services=["any"])])
    assert "rules[0].sources[0]: 'NOPE' is not a declared user group" in str(info.value)


def test_packaged_example_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "packaging" / "policy.example.yaml"
    policy = load_policy(path)
    assert [g.name for g in policy.user_groups] == ["DEV", "OPS"]
    assert policy.group("ops").sid is not None
    assert len(policy.rules) == 3
    for rule in policy.rules:
        assert policy.destinations_of(rule) and policy.services_of(rule)


# --------------------------------------------------------------------------
# DNS-name destinations

DNS_POLICY = """\
user_groups:
  - name: DEV
ip_lists:
  github: [dns:github.com, "dns:*.githubusercontent.com", 140.82.112.0/20]
  names-only: [dns:GitHub.com., dns:pypi.org]
rules:
  - name: names
    sources: [DEV]
    destinations: [github, dns:*.example.org, dns:bücher.example]
    services: ["443/tcp"]
  - name: only-names
    sources: [DEV]
    destinations: [names-only, dns:pypi.org]
    services: ["443/tcp"]
"""


def test_dns_names_inline_and_in_lists():
    from aus.core.dnsname import DnsPattern

    policy = policy_from_text(DNS_POLICY, "p.yaml")
    names, only = policy.rules
    assert policy.destinations_of(names) == [net("140.82.112.0/20")]
    assert policy.dns_of(names) == [DnsPattern("github.com", False),
                                    DnsPattern("githubusercontent.com", True),
                                    DnsPattern("example.org", True),
                                    DnsPattern("xn--bcher-kva.example", False)]
    # a rule of names only is valid: no networks; duplicates (any spelling) once
    assert policy.destinations_of(only) == []
    assert policy.dns_of(only) == [DnsPattern("github.com", False), DnsPattern("pypi.org", False)]
    # the document keeps what was written
    assert policy.ip_lists["names-only"] == ["dns:GitHub.com.", "dns:pypi.org"]


def test_a_policy_without_names_has_none():
    policy = policy_from_text(EXAMPLE)
    assert policy.dns_of(policy.rules[0]) == []


def test_bad_names_are_refused_with_line_and_path():
    problems = refused("""\
        user_groups: [{name: DEV}]
        ip_lists:
          mixed: [10.0.0.0/8, "dns:*.com", github.com]
        rules:
          - name: r1
            sources: [DEV]
            destinations: [mixed, dns:10.0.0.1, "dns:a..b", example.org, dns:ok.example]
            services: [tcp]
        """)
    assert problems == [
        "line 3: ip_lists.mixed[1]: 'dns:*.com' would match every name under the top-level "
        "domain 'com'; a wildcard needs at least two labels after '*.' (dns:*.example.com)",
        "line 3: ip_lists.mixed[2]: 'github.com' is not a valid IP address or CIDR; "
        "for the DNS name write 'dns:github.com'",
        "line 7: rules[0].destinations[1]: 'dns:10.0.0.1' is an address, not a name: "
        "write 10.0.0.1 without dns:",
        "line 7: rules[0].destinations[2]: 'dns:a..b' has an empty label (two dots in a row, "
        "or a leading dot)",
        "line 7: rules[0].destinations[3]: 'example.org' is neither an ip_list name nor a "
        "CIDR; for the DNS name write 'dns:example.org'",
    ]


def test_a_list_name_must_not_read_as_a_dns_name():
    assert one_problem("""\
        ip_lists:
          "dns:github.com": [10.0.0.0/8]
        """) == ("line 2: ip_lists['dns:github.com']: the ip list name 'dns:github.com' "
                 "reads as a DNS name (dns:); choose a name that does not")


def test_model_built_directly_validates_names():
    with pytest.raises(ValidationError, match="empty label"):
        Policy.model_validate({"ip_lists": {"a": ["dns:x..y"]}})
    with pytest.raises(ValidationError, match="is an address, not a name"):
        Policy.model_validate({"user_groups": [{"name": "DEV"}], "rules": [
            {"name": "r", "sources": ["DEV"], "destinations": ["dns:::1"], "services": ["tcp"]}]})
