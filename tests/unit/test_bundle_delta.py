"""Bundle deltas (aus.core.bundle): the state after any chain of deltas is
the state of the full bundle, composed chains equal step-by-step
application, and a delta that does not fit is refused with the reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aus.core.bundle import (
    apply_delta,
    bundle_from_data,
    bundle_from_delta,
    canonical_digest,
    compose_deltas,
    diff_documents,
)
from aus.core.errors import PolicyError

GROUPS = ["DEV", "OPS", "Finance", "QA", "sec"]
USERS = [f"u{i}" for i in range(8)] + ["alice@contoso.com", "bob@contoso.com"]
DESTS = ["10.0.0.0/8", "192.0.2.7", "198.51.100.0/24"]
SERVICES = ["80/tcp", "443/tcp", "53/udp", "icmp"]
SOURCE = "delta from the test server"

# A state: the rules (name -> (source groups, destinations, services)),
# every group's members, and the enforcement (None: the server sets none).
rule_body = st.tuples(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=3, unique=True),
                      st.lists(st.sampled_from(DESTS), min_size=1, max_size=2, unique=True),
                      st.lists(st.sampled_from(SERVICES), min_size=1, max_size=2, unique=True))
enforcement = st.none() | st.fixed_dictionaries({
    "default": st.sampled_from(["enforce", "visibility"]),
    "workloads": st.dictionaries(st.sampled_from(["web-1", "db-1"]),
                                 st.sampled_from(["enforce", "visibility"]), max_size=2)})
change = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(GROUPS), st.sampled_from(USERS)),
    st.tuples(st.just("leave"), st.sampled_from(GROUPS), st.sampled_from(USERS)),
    st.tuples(st.just("rule"), st.sampled_from(["r1", "r2", "r3"]), rule_body),
    st.tuples(st.just("unrule"), st.sampled_from(["r1", "r2", "r3"]), st.none()),
    st.tuples(st.just("enforcement"), enforcement, st.none()),
)


def document(state: dict, version: int) -> dict:
    """The bundle a server publishes for ``state``: the groups the rules
    name, each with its members, sorted as the server sorts them."""
    rules = state["rules"]
    used = sorted({g for srcs, _, _ in rules.values() for g in srcs})
    doc = {"format": 1, "org": "1", "version": version,
           "generated_at": f"2026-12-01T00:00:{version % 60:02d}Z",
           "policy": {"user_groups": [{"name": g} for g in used], "ip_lists": {},
                      "services": {},
                      "rules": [{"name": n, "sources": s, "destinations": d, "services": v}
                                for n, (s, d, v) in sorted(rules.items())]},
           "members": {g: sorted(state["members"][g]) for g in used}}
    if state["enforcement"] is not None:
        doc["enforcement"] = state["enforcement"]
    return doc


def step(state: dict, c: tuple) -> dict:
    kind, a, b = c
    members = {g: set(u) for g, u in state["members"].items()}
    rules = dict(state["rules"])
    out = {"members": members, "rules": rules, "enforcement": state["enforcement"]}
    if kind == "join":
        members[a].add(b)
    elif kind == "leave":
        members[a].discard(b)
    elif kind == "rule":
        rules[a] = b
    elif kind == "unrule":
        rules.pop(a, None)
    else:
        out["enforcement"] = a
    return out


def documents(start: dict, changes: list) -> list[dict]:
    """The bundle after each change that changed it (a new version each)."""
    docs = [document(start, 1)]
    state = start
    for c in changes:
        state = step(state, c)
        doc = document(state, docs[-1]["version"] + 1)
        if {**doc, "version": 0, "generated_at": ""} != \
                {**docs[-1], "version": 0, "generated_at": ""}:
            docs.append(doc)
    return docs


start_state = st.builds(
    lambda members, rules, enf: {"members": {g: set(members.get(g, ())) for g in GROUPS},
                                 "rules": rules, "enforcement": enf},
    st.dictionaries(st.sampled_from(GROUPS), st.sets(st.sampled_from(USERS)), max_size=5),
    st.dictionaries(st.sampled_from(["r1", "r2", "r3"]), rule_body, max_size=3),
    enforcement)


def through_the_wire(base, delta: dict):
    return bundle_from_delta(base, json.dumps(delta).encode(), SOURCE)


@settings(max_examples=300, deadline=None)
@given(start_state, st.lists(change, max_size=25))
def test_any_chain_of_deltas_gives_the_full_bundle(start, changes):
    docs = documents(start, changes)
    held = bundle_from_data(docs[0], "first")
    for old, new in zip(docs, docs[1:]):
        held = through_the_wire(held, diff_documents(old, new))
        full = bundle_from_data(new, "full")
        assert held.data == new
        assert held.digest == full.digest
        assert (held.version, held.members, held.policy, held.enforcement) == \
            (full.version, full.members, full.policy, full.enforcement)


@settings(max_examples=300, deadline=None)
@given(start_state, st.lists(change, max_size=25), st.data())
def test_a_composed_chain_equals_step_by_step(start, changes, data):
    docs = documents(start, changes)
    deltas = [diff_documents(a, b) for a, b in zip(docs, docs[1:])]
    if not deltas:
        return
    # Compose any stretch i..j, in any grouping, and apply it at once.
    i = data.draw(st.integers(0, len(deltas) - 1))
    j = data.draw(st.integers(i + 1, len(deltas)))
    composed = deltas[i]
    for d in deltas[i + 1:j]:
        composed = compose_deltas(composed, d)
    held = through_the_wire(bundle_from_data(docs[i], "held"), composed)
    assert held.data == docs[j]
    # The right-leaning grouping gives the same delta.
    right = deltas[j - 1]
    for d in reversed(deltas[i:j - 1]):
        right = compose_deltas(d, right)
    assert apply_delta(docs[i], right, SOURCE) == docs[j]
    # Never larger than the sum of the steps it replaces.
    assert len(json.dumps(composed)) <= sum(len(json.dumps(d)) for d in deltas[i:j])


def two_versions():
    state = {"members": {g: set() for g in GROUPS}, "rules": {"r1": (["DEV"], ["10.0.0.0/8"],
                                                                  ["80/tcp"])},
             "enforcement": None}
    old = document({**state, "members": {**state["members"], "DEV": {"u1", "u2"}}}, 4)
    new = document({**state, "members": {**state["members"], "DEV": {"u2", "u3"}}}, 5)
    return old, new


def test_a_membership_change_is_a_small_delta():
    old, new = two_versions()
    d = diff_documents(old, new)
    assert d["members"] == {"add": {"DEV": ["u3"]}, "remove": {"DEV": ["u1"]}}
    assert "policy" not in d and "enforcement" not in d
    assert (d["from_version"], d["version"], d["digest"]) == (4, 5, canonical_digest(new))


@pytest.mark.parametrize("spoil, reason", [
    (lambda d: d.update(digest="0" * 64), "digest: the bundle the delta makes hashes to"),
    (lambda d: d.update(from_version=3), "from_version: the delta starts from version 3, "
                                         "the bundle in force is version 4"),
    (lambda d: d.update(org="2"), "org: the delta is for org '2'"),
    (lambda d: d["members"]["add"].update(DEV=["u3", 7]), "members.add.DEV: expected a list "
                                                          "of userNames"),
    (lambda d: d["members"]["add"].update(NOPE=["x"]), "members.NOPE: 'NOPE' is not a user group"),
    (lambda d: d.update(format="aus.bundle-delta/9"), "format: expected 'aus.bundle-delta/1'"),
    (lambda d: d.update(version=4), "version: 4 is not above from_version 4"),
    (lambda d: d.update(policy={"rules": "x"}), "policy"),
])
def test_a_bad_delta_is_refused_with_the_reason(spoil, reason):
    old, new = two_versions()
    held = bundle_from_data(old, "held")
    d = diff_documents(old, new)
    spoil(d)
    with pytest.raises(PolicyError) as info:
        through_the_wire(held, d)
    assert str(info.value).startswith(SOURCE)
    assert any(reason in p for p in info.value.problems), info.value.problems
    assert held.data == old      # the bundle held is untouched


def test_a_delta_that_is_not_json_is_refused():
    old, _ = two_versions()
    with pytest.raises(PolicyError, match="not JSON"):
        bundle_from_delta(bundle_from_data(old, "held"), b'{"format": ', SOURCE)
