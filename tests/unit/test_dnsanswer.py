"""What one DNS answer allows: the CNAME chain inside the answer, the
addresses at its end, the grants of every name on it; and no bytes, however
hostile, make the analysis raise."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aus.core import dnsanswer
from aus.core.dnsanswer import (
    AnswerError,
    AnswerUnreadable,
    Derived,
    chain,
    derive,
    derive_message,
)
from tests.support.dnsgrants import Grants, grant

GITHUB = grant("github.com", 1, ("tcp", 443))
EDGE = grant("*.example.net", 2, ("tcp", 443), ("tcp", 80))
SSH = grant("www.example.org", 3, ("tcp", 22))


def mapped(ip: str) -> bytes:
    a = ipaddress.ip_address(ip)
    return (b"\x00" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed


def answer(qname: str, *records: tuple, qtype: str = "A", rcode=dns.rcode.NOERROR,
           tc: bool = False) -> bytes:
    """An answer to ``qname`` carrying (owner, ttl, type, *values) records."""
    r = dns.message.make_response(dns.message.make_query(qname, qtype))
    r.set_rcode(rcode)
    if tc:
        r.flags |= dns.flags.TC
    for owner, ttl, kind, *values in records:
        r.answer.append(dns.rrset.from_text_list(owner.rstrip(".") + ".", ttl, "IN", kind,
                                                 list(values)))
    return r.to_wire()


def test_addresses_of_a_granted_name():
    wire = answer("github.com", ("github.com", 60, "A", "192.0.2.1", "192.0.2.2"))
    got = sorted(derive(wire, Grants(GITHUB, EDGE)))
    assert got == [Derived(4, mapped("192.0.2.1"), 60, "github.com", frozenset({1}), GITHUB.services),
                   Derived(4, mapped("192.0.2.2"), 60, "github.com", frozenset({1}), GITHUB.services)]


def test_aaaa_and_case_and_final_dot():
    wire = answer("GitHub.COM.", ("GitHub.COM.", 30, "AAAA", "2001:db8::1"), qtype="AAAA")
    assert derive(wire, Grants(GITHUB)) == [
        Derived(6, mapped("2001:db8::1"), 30, "github.com", frozenset({1}), GITHUB.services)]


def test_a_name_no_grant_matches_derives_nothing():
    wire = answer("gitlab.com", ("gitlab.com", 60, "A", "192.0.2.1"))
    assert derive(wire, Grants(GITHUB, EDGE)) == []
    # the suffix of a wildcard is not matched by the wildcard itself
    wire = answer("example.net", ("example.net", 60, "A", "192.0.2.1"))
    assert derive(wire, Grants(EDGE)) == []


def test_cname_chain_to_a_granted_target():
    wire = answer("www.example.org",
                  ("www.example.org", 300, "CNAME", "a.cdn.example.com."),
                  ("a.cdn.example.com", 30, "CNAME", "edge7.example.net."),
                  ("edge7.example.net", 60, "A", "192.0.2.9"))
    qname, names, addresses = chain(dns.message.from_wire(wire))
    assert qname == "www.example.org"
    assert names == ["www.example.org", "a.cdn.example.com", "edge7.example.net"]
    assert addresses == [dnsanswer.AnswerAddress("edge7.example.net", 4, mapped("192.0.2.9"), 30)]
    # shown under the first matching name, valid for the shortest TTL on the chain
    assert derive(wire, Grants(EDGE)) == [
        Derived(4, mapped("192.0.2.9"), 30, "edge7.example.net", frozenset({2}), EDGE.services)]


def test_every_matching_name_on_the_chain_adds_its_grants():
    wire = answer("www.example.org",
                  ("www.example.org", 300, "CNAME", "edge7.example.net."),
                  ("edge7.example.net", 600, "A", "192.0.2.9"))
    (d,) = derive(wire, Grants(EDGE, SSH, GITHUB))
    assert d.name == "www.example.org"
    assert d.rules == {2, 3}
    assert d.services == EDGE.services | SSH.services
    assert d.ttl == 300


def test_records_off_the_chain_are_ignored():
    wire = answer("github.com",
                  ("github.com", 60, "A", "192.0.2.1"),
                  ("evil.example", 60, "A", "198.51.100.66"),
                  ("api.github.com", 60, "A", "198.51.100.67"))
    assert [d.addr for d in derive(wire, Grants(GITHUB, grant("*.github.com", 4, ("tcp", 443))))] \
        == [mapped("192.0.2.1")]


def test_the_chain_is_not_followed_outside_the_answer():
    # a CNAME whose target has no addresses in this answer allows nothing
    wire = answer("github.com", ("github.com", 60, "CNAME", "lb.example.net."))
    assert derive(wire, Grants(GITHUB, EDGE)) == []


def test_cname_loops_and_long_chains_are_refused():
    loop = answer("a.example.net",
                  ("a.example.net", 60, "CNAME", "b.example.net."),
                  ("b.example.net", 60, "CNAME", "a.example.net."),
                  ("a.example.net", 60, "A", "192.0.2.1"))
    with pytest.raises(AnswerError, match="more than one CNAME|loop"):
        chain(dns.message.from_wire(loop))
    loop = answer("a.example.net",
                  ("a.example.net", 60, "CNAME", "b.example.net."),
                  ("b.example.net", 60, "CNAME", "a.example.net."))
    with pytest.raises(AnswerError, match="loop"):
        chain(dns.message.from_wire(loop))
    assert derive(loop, Grants(EDGE)) == []
    n = dnsanswer.MAX_CHAIN + 2
    long = answer("n0.example.net",
                  *[(f"n{i}.example.net", 60, "CNAME", f"n{i + 1}.example.net.") for i in range(n)],
                  (f"n{n}.example.net", 60, "A", "192.0.2.1"))
    with pytest.raises(AnswerError, match="longer than"):
        chain(dns.message.from_wire(long))
    assert derive(long, Grants(EDGE)) == []


def test_only_successful_responses_derive():
    wire = answer("github.com", ("github.com", 60, "A", "192.0.2.1"), rcode=dns.rcode.NXDOMAIN)
    assert derive(wire, Grants(GITHUB)) == []
    query = dns.message.make_query("github.com", "A")
    query.answer.append(dns.rrset.from_text("github.com.", 60, "IN", "A", "192.0.2.1"))
    assert derive(query.to_wire(), Grants(GITHUB)) == []       # not a response
    assert not dnsanswer.may_derive(answer("github.com"))       # no answer records


def test_a_truncated_answer_still_derives_what_it_carries():
    wire = answer("github.com", ("github.com", 60, "A", "192.0.2.1"), tc=True)
    assert [d.addr for d in derive(wire, Grants(GITHUB))] == [mapped("192.0.2.1")]


def test_ttls_are_bounded():
    wire = answer("github.com", ("github.com", 0x7FFFFFFF, "A", "192.0.2.1"),
                  ("github.com", 0x7FFFFFFF, "AAAA", "2001:db8::1"))
    assert {d.ttl for d in derive(wire, Grants(GITHUB))} == {dnsanswer.MAX_TTL}
    # RFC 2181: the top bit set counts as 0
    top = bytearray(answer("github.com", ("github.com", 60, "A", "192.0.2.1")))
    top[-10:-6] = (0x80000000).to_bytes(4, "big")
    assert [d.ttl for d in derive(bytes(top), Grants(GITHUB))] == [0]


def test_other_record_types_and_classes_are_passed_over():
    wire = answer("github.com", ("github.com", 60, "TXT", '"v=spf1 -all"'),
                  ("github.com", 60, "MX", "10 mail.github.com."),
                  ("github.com", 60, "A", "192.0.2.1"))
    r = dns.message.from_wire(wire)
    r.answer.append(dns.rrset.from_text("github.com.", 60, "CH", "A", "github.com. 1"))
    assert [d.addr for d in derive(r.to_wire(), Grants(GITHUB))] == [mapped("192.0.2.1")]
    assert derive_message(r, Grants(GITHUB)) == derive(r.to_wire(), Grants(GITHUB))


def test_duplicate_addresses_once_with_the_shortest_ttl():
    r = dns.message.from_wire(answer("github.com", ("github.com", 60, "A", "192.0.2.1")))
    r.answer.append(dns.rrset.from_text("github.com.", 5, "IN", "A", "192.0.2.1"))
    got = derive(r.to_wire(), Grants(GITHUB))
    assert [(d.addr, d.ttl) for d in got] == [(mapped("192.0.2.1"), 5)]


def test_bytes_that_are_no_message_derive_nothing():
    wire = answer("github.com", ("github.com", 60, "A", "192.0.2.1"))
    assert dnsanswer.parse(wire[:-3]) is None
    assert derive(wire[:-3], Grants(GITHUB)) == []
    with pytest.raises(AnswerUnreadable):
        dnsanswer.read_answer(wire[:-3], Grants(GITHUB))
    # an address record of the wrong size
    bad = wire[:-6] + b"\x00\x03" + wire[-4:-1]
    assert dnsanswer.parse(bad) is None and derive(bad, Grants(GITHUB)) == []
    # a compression pointer pointing at itself, in the question name
    loop = wire[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert derive(loop, Grants(GITHUB)) == []
    assert derive(b"", Grants(GITHUB)) == [] and derive(b"\x00" * 11, Grants(GITHUB)) == []


def test_a_label_holding_a_dot_is_one_label():
    odd = dns.name.Name([b"github.com", b""])           # one label: "github\.com"
    r = dns.message.make_response(dns.message.make_query(odd, "A"))
    r.answer.append(dns.rrset.from_text_list(odd, 60, "IN", "A", ["192.0.2.1"]))
    assert derive(r.to_wire(), Grants(GITHUB)) == [] == derive_message(r, Grants(GITHUB))
    assert chain(r)[0] == "github\\.com"
    assert dnsanswer.read_answer(r.to_wire(), Grants(grant("*.com", 9))) == []


def test_compression_pointers_must_point_backwards():
    wire = bytearray(answer("github.com", ("github.com", 60, "A", "192.0.2.1")))
    owner = wire.index(b"\xc0\x0c", 12)                 # the record's owner points at the question
    wire[owner + 1] = owner                              # now at itself
    with pytest.raises(AnswerUnreadable, match="backwards"):
        dnsanswer.read_answer(bytes(wire), Grants(GITHUB))
    wire[owner + 1] = owner + 2                          # forwards
    with pytest.raises(AnswerUnreadable, match="backwards"):
        dnsanswer.read_answer(bytes(wire), Grants(GITHUB))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(wire):
    assert isinstance(derive(wire, Grants(GITHUB, EDGE)), list)


_BASE = answer("www.example.org",
               ("www.example.org", 300, "CNAME", "edge7.example.net."),
               ("edge7.example.net", 60, "A", "192.0.2.9", "192.0.2.10"),
               ("edge7.example.net", 60, "AAAA", "2001:db8::9"),
               ("edge7.example.net", 60, "MX", "10 mx.example.net."))


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(_BASE)))
def test_corrupted_answers_never_raise(edits, cut):
    wire = bytearray(_BASE)
    for at, value in edits:
        wire[at] = value
    wire = bytes(wire[:max(cut, 12)])
    got = derive(wire, Grants(EDGE, SSH))
    for d in got:       # whatever survives is well formed
        assert d.family in (4, 6) and len(d.addr) == 16 and 0 <= d.ttl <= dnsanswer.MAX_TTL
        assert d.rules <= {2, 3}
    # where dnspython reads the whole message, reading the wire finds the same
    message = dnsanswer.parse(wire)
    if message is not None:
        assert sorted(got) == sorted(derive_message(message, Grants(EDGE, SSH)))


name = st.from_regex(r"[a-c]{1,2}\.example\.net", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(name, name, max_size=6), st.lists(name, max_size=3), name)
def test_random_cname_graphs(links, with_address, qname):
    """Any CNAME graph: derive returns the chain end's addresses or nothing,
    never raises, and a loop allows nothing."""
    r = dns.message.make_response(dns.message.make_query(qname, "A"))
    for owner, target in links.items():
        r.answer.append(dns.rrset.from_text(owner + ".", 60, "IN", "CNAME", target + "."))
    for i, owner in enumerate(with_address):
        if owner not in links:
            r.answer.append(dns.rrset.from_text(owner + ".", 60, "IN", "A", f"192.0.2.{i + 1}"))
    got = derive(r.to_wire(), Grants(EDGE))
    assert sorted(got) == sorted(derive_message(r, Grants(EDGE)))
    seen, end = [qname], qname
    while end in links and links[end] not in seen:
        end = links[end]
        seen.append(end)
    looped = end in links
    if looped or end not in with_address:
        assert got == []
    else:
        assert sorted(d.addr for d in got) == sorted(
            mapped(f"192.0.2.{i + 1}") for i, owner in enumerate(with_address) if owner == end)
