"""aus.core.dnsname: DNS-name destinations, their validation and matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aus.core.dnsname import (
    DnsPattern,
    is_dns_destination,
    normalize_qname,
    parse_dns_destination,
)


@pytest.mark.parametrize("text, name, wildcard", [
    ("dns:github.com", "github.com", False),
    ("dns:GitHub.COM", "github.com", False),
    ("DNS:github.com", "github.com", False),
    ("  dns:github.com.  ", "github.com", False),          # trailing dot dropped
    ("dns:*.githubusercontent.com", "githubusercontent.com", True),
    ("dns:*.A.Example.Org.", "a.example.org", True),
    ("dns:bücher.example", "xn--bcher-kva.example", False),  # IDNA A-label
    ("dns:*.bücher.example", "xn--bcher-kva.example", True),
    ("dns:xn--bcher-kva.example", "xn--bcher-kva.example", False),
    ("dns:XN--BCHER-KVA.example", "xn--bcher-kva.example", False),
    ("dns:bücher\u3002example", "xn--bcher-kva.example", False),   # IDNA's other full stops
    ("dns:ＧＩＴＨＵＢ.com", "github.com", False),                   # fullwidth: mapped
    ("dns:a-b.c0.example", "a-b.c0.example", False),
    ("dns:localhost", "localhost", False),                # one label: exact names may
    ("dns:3com.example", "3com.example", False),
    ("dns:" + "a" * 63 + ".example", "a" * 63 + ".example", False),
])
def test_accepted(text, name, wildcard):
    pattern = parse_dns_destination(text)
    assert pattern == DnsPattern(name, wildcard)
    assert str(pattern) == ("dns:*." if wildcard else "dns:") + name
    assert parse_dns_destination(str(pattern)) == pattern      # its text reads back


def _long_name(total: int) -> str:
    labels, left = [], total
    while left > 0:
        n = min(63, left)
        labels.append("a" * n)
        left -= n + 1
    return ".".join(labels)


def test_length_limit_is_253_characters():
    ok = _long_name(253)
    assert len(ok) == 253
    assert parse_dns_destination("dns:" + ok).name == ok
    with pytest.raises(ValueError, match="254 characters long as a DNS name; at most 253"):
        parse_dns_destination("dns:" + ok + "a")
    # a wildcard counts its '*.' (the shortest name it matches is longer still)
    with pytest.raises(ValueError, match="at most 253"):
        parse_dns_destination("dns:*." + ok)


@pytest.mark.parametrize("text, fragment", [
    ("dns:", "names no DNS name"),
    ("dns:  ", "names no DNS name"),
    ("dns:*.com", "would match every name under the top-level domain 'com'"),
    ("dns:*.com.", "at least two labels after '*.'"),
    ("dns:*", "'*' is allowed only as the whole first label"),
    ("dns:a.*.example.com", "'*' is allowed only as the whole first label"),
    ("dns:*a.example.com", "'*' is allowed only as the whole first label"),
    ("dns:**.example.com", "'*' is allowed only as the whole first label"),
    ("dns:*.*.example.com", "'*' is allowed only as the whole first label"),
    ("dns:10.0.0.1", "is an address, not a name: write 10.0.0.1 without dns:"),
    ("dns:2001:db8::1", "is an address, not a name"),
    ("dns:10.0.0.0/8", "is an address, not a name"),
    ("dns:1.2.3", "the last label '3' is all digits"),
    ("dns:a..example.com", "empty label"),
    ("dns:.example.com", "empty label"),
    ("dns:example.com..", "empty label"),
    ("dns:-a.example.com", "starts or ends with a hyphen"),
    ("dns:a-.example.com", "starts or ends with a hyphen"),
    ("dns:a_b.example.com", "contains '_'"),
    ("dns:a b.example.com", "contains ' '"),
    ("dns:example.com/path", "contains '/'"),
    ("dns:" + "a" * 64 + ".example", "is 64 characters long; at most 63"),
    ("dns:\u0080.example", "not a valid internationalized name"),
    ("dns:\ud800.example", "not a valid internationalized name"),
    ("dns:xn--zz.example", "the label 'xn--zz' is not a valid IDNA A-label"),
    ("github.com", "is not a DNS name destination"),
])
def test_refused_with_the_reason(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_dns_destination(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value) or text.strip() in str(info.value)


def test_not_a_string():
    with pytest.raises(ValueError, match="must be a string, not int"):
        parse_dns_destination(5)


def test_is_dns_destination():
    assert is_dns_destination("dns:x.example")
    assert is_dns_destination(" DNS:bad..")
    assert not is_dns_destination("10.0.0.0/8")
    assert not is_dns_destination("dnsx.example")
    assert not is_dns_destination(None)


def test_normalize_qname():
    assert normalize_qname("WWW.GitHub.com.") == "www.github.com"
    assert normalize_qname("github.com") == "github.com"
    assert normalize_qname(".") == ""


@pytest.mark.parametrize("pattern, qname, hit", [
    ("dns:github.com", "github.com", True),
    ("dns:github.com", "GITHUB.com.", True),
    ("dns:github.com", "www.github.com", False),     # exact is the name only
    ("dns:github.com", "notgithub.com", False),
    ("dns:*.github.com", "www.github.com", True),
    ("dns:*.github.com", "a.b.c.GitHub.Com.", True),  # any depth
    ("dns:*.github.com", "github.com", False),       # not the suffix itself
    ("dns:*.github.com", "github.com.", False),
    ("dns:*.github.com", "xgithub.com", False),      # on a label boundary only
    ("dns:*.github.com", ".github.com", False),
    ("dns:*.bücher.example", "www.xn--bcher-kva.example", True),
])
def test_matches(pattern, qname, hit):
    assert parse_dns_destination(pattern).matches(qname) is hit


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10) \
    .filter(lambda s: s[0] != "-" and s[-1] != "-")


@given(st.lists(_label, min_size=2, max_size=5), st.lists(_label, min_size=0, max_size=3))
def test_wildcard_matches_exactly_the_names_below_it(suffix, prefix):
    suffix[-1] = "x" + suffix[-1]                     # never an all-digit last label
    name = ".".join(suffix)
    wild = parse_dns_destination("dns:*." + name.upper())
    exact = parse_dns_destination("dns:" + name)
    below = ".".join(prefix + suffix)
    assert wild.matches(below) is bool(prefix)
    assert exact.matches(below) is not bool(prefix)
    assert wild.matches(below.upper() + ".") is bool(prefix)


@given(st.text(max_size=80))
def test_any_text_parses_or_refuses_with_a_value_error(text):
    try:
        pattern = parse_dns_destination("dns:" + text)
    except ValueError:
        return
    assert parse_dns_destination(str(pattern)) == pattern
    assert len(pattern.name) <= 253
