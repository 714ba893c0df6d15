"""Policy bundles: parsing and refusal (every problem by path), membership
matching, and the cache of the last good bundle."""

from __future__ import annotations

import json
import os
import stat

import pytest

from aus.agent.bundlecache import read_cache, write_cache
from aus.core.bundle import BUNDLE_FORMAT, bundle_from_bytes, bundle_from_data
from aus.core.errors import PolicyError, PolicySourceError
from tests.support.bundle_server import bundle

SOURCE = "bundle from https://aus.example.com/v1/orgs/1/bundle"


def refusal(doc) -> list[str]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(PolicyError) as info:
        bundle_from_bytes(raw, SOURCE)
    head, *lines = str(info.value).split("\n")
    assert head == f"{SOURCE}: policy refused:"
    assert info.value.problems == [line.strip() for line in lines]
    return info.value.problems


def test_the_documented_example():
    doc = {"format": 1, "org": "1", "version": 42, "generated_at": "2026-11-28T15:00:00Z",
           "policy": {"user_groups": [{"name": "DEV", "external_id": "8f2c...", "sid": None}],
                      "ip_lists": {}, "services": {},
                      "rules": [{"name": "dev-web", "sources": ["DEV"],
                                 "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]}]},
           "members": {"DEV": ["alice@contoso.com", "bob"]}}
    b = bundle_from_bytes(json.dumps(doc).encode(), SOURCE)
    assert (b.org, b.version, b.generated_at) == ("1", 42, "2026-11-28T15:00:00Z")
    assert [r.name for r in b.policy.rules] == ["dev-web"]
    assert b.members == {"DEV": ("alice@contoso.com", "bob")}
    assert b.data == doc
    # the digest follows the content, not the key order or spacing
    again = bundle_from_bytes(json.dumps(doc, indent=4, sort_keys=True).encode(), SOURCE)
    assert again.digest == b.digest
    doc["members"]["DEV"].append("carol")
    assert bundle_from_data(doc, SOURCE).digest != b.digest


def test_member_keys_take_the_declared_spelling():
    doc = bundle(1, {"dev": ["alice"], "OPS": []})
    b = bundle_from_data(doc, SOURCE)
    assert b.members == {"DEV": ("alice",), "OPS": ()}


def test_unknown_format_is_refused_before_anything_else():
    assert refusal({"format": 2, "whatever": []}) == [
        f"format: unsupported bundle format 2; this ausd reads format {BUNDLE_FORMAT} "
        "(a newer policy server needs a newer ausd)"]
    assert refusal({"format": "1"})[0].startswith("format: unsupported bundle format '1'")
    assert refusal({"format": True})[0].startswith("format: unsupported bundle format True")
    assert refusal({"org": "1"}) == ["format: required key is missing"]


def test_policy_problems_are_listed_with_their_path():
    doc = bundle(7, {"DEV": ["alice"]})
    doc["policy"]["rules"][0]["sources"] = ["DEV", "QA"]
    doc["policy"]["rules"][0]["destinations"] = ["labb"]
    doc["policy"]["rules"][1]["services"] = ["22/tcpp"]
    doc["policy"]["ip_lists"]["bad"] = ["10.0.0.1/8"]
    assert refusal(doc) == [
        "policy.ip_lists.bad[0]: '10.0.0.1/8' has host bits set: the network is 10.0.0.0/8; "
        "write 10.0.0.0/8, or 10.0.0.1/32 for the single address",
        "policy.rules[0].sources[1]: 'QA' is not a declared user group",
        "policy.rules[0].destinations[0]: 'labb' is neither an ip_list name nor a CIDR "
        "(did you mean 'lab'?)",
        "policy.rules[1].services[0]: '22/tcpp': unknown protocol 'tcpp'; ports go with tcp or udp",
    ]


def test_top_level_problems():
    doc = bundle(0, {"DEV": ["alice", 5, ""], "QA": ["x"], "dev": ["y"]})
    doc["org"] = 1
    doc["generated_at"] = "yesterday"
    doc["extra"] = True
    assert refusal(doc) == [
        "extra: unknown key 'extra' (allowed keys: format, org, version, generated_at, "
        "policy, members, enforcement)",
        "org: expected a non-empty string, got the integer 1",
        "version: expected a positive integer, got the integer 0",
        "generated_at: expected an ISO 8601 time, got the string 'yesterday'",
        "members.DEV[1]: expected a non-empty userName, got the integer 5",
        "members.DEV[2]: expected a non-empty userName, got the string ''",
        "members.QA: 'QA' is not a user group of the bundle's policy (policy.user_groups)",
        "members.dev: 'dev' is listed twice (also as 'DEV'; group names are compared "
        "case-insensitively)",
    ]


def test_missing_keys_and_wrong_shapes():
    assert refusal({"format": 1}) == [
        f"{k}: required key is missing"
        for k in ("org", "version", "generated_at", "policy", "members")]
    doc = bundle(3, {})
    doc["policy"] = ["rules"]
    doc["members"] = ["alice"]
    assert refusal(doc) == [
        "policy: the policy must be a mapping with the keys user_groups, ip_lists, services "
        "and rules, not a list",
        "members: expected a mapping of user group names to lists of userNames, got a list"]
    doc = bundle(3, {"DEV": "alice"})
    doc["version"] = True
    assert refusal(doc) == ["version: expected a positive integer, got the boolean true",
                            "members.DEV: expected a list of userNames, got the string 'alice'"]


def test_not_json():
    assert refusal(b"<html>oops</html>") == [
        "line 1, column 1: not JSON: Expecting value"]
    assert refusal(b'{"format": 1, "format": 1}') == ["duplicate key 'format' in a JSON object"]
    assert refusal(b"[]") == ["a bundle is a JSON object, not a list"]
    assert refusal(b"\xff") == ["not valid UTF-8 (byte 0)"]


# --------------------------------------------------------------------------
# Membership


@pytest.fixture
def members():
    return bundle_from_data(bundle(1, {
        "DEV": ["alice@contoso.com", "Bob", "alice@fabrikam.com"],
        "OPS": ["ALICE", "carol@contoso.com", "dave"],
    }), SOURCE)


def test_exact_match_is_case_insensitive(members):
    assert members.groups_of("bob") == ("DEV",)
    assert members.groups_of("BOB") == ("DEV",)
    assert members.groups_of("alice") == ("OPS",)           # 'ALICE' is in OPS
    assert members.groups_of("Alice@Contoso.com") == ("DEV",)
    assert members.groups_of("carol") == ()                  # a UPN needs local-part
    assert members.groups_of("nobody") == ()
    assert members.groups_of(None) == ()                     # unknown to NSS


def test_local_part_match(members):
    assert members.groups_of("carol", "local-part") == ("OPS",)
    assert members.groups_of("CAROL", "local-part") == ("OPS",)
    # the documented risk: alice@contoso.com and alice@fabrikam.com both
    # match the local alice, on top of the exact 'ALICE'
    assert members.groups_of("alice", "local-part") == ("DEV", "OPS")
    assert members.groups_of("dave", "local-part") == ("OPS",)
    assert members.groups_of("contoso.com", "local-part") == ()
    assert members.groups_of("carol@contoso.com", "local-part") == ("OPS",)


def test_groups_follow_the_policy_order():
    b = bundle_from_data(bundle(1, {"OPS": ["erin"], "DEV": ["erin"]}), SOURCE)
    assert b.groups_of("erin") == ("DEV", "OPS")


# --------------------------------------------------------------------------
# Cache


URL = "https://aus.example.com/v1/orgs/1/bundle"


def test_cache_round_trip_is_private_and_atomic(tmp_path):
    path = tmp_path / "state" / "bundle.json"
    b = bundle_from_data(bundle(5, {"DEV": ["alice"]}), SOURCE)
    write_cache(path, URL, '"b5"', b, fetched_at=1234.5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["bundle.json"]        # no temporary left
    cached = read_cache(path, URL)
    assert (cached.etag, cached.fetched_at, cached.url) == ('"b5"', 1234.5, URL)
    assert cached.bundle.version == 5 and cached.bundle.digest == b.digest
    assert cached.bundle.groups_of("alice") == ("DEV",)
    # a second write replaces it whole, with the same mode
    path.chmod(0o644)
    write_cache(path, URL, '"b6"', bundle_from_data(bundle(6, {}), SOURCE))
    assert read_cache(path, URL).bundle.version == 6
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_no_cache_is_none(tmp_path):
    assert read_cache(tmp_path / "bundle.json", URL) is None


def test_cache_of_another_url_is_not_used(tmp_path):
    path = tmp_path / "bundle.json"
    write_cache(path, URL, '"b1"', bundle_from_data(bundle(1, {}), SOURCE))
    with pytest.raises(PolicyError) as info:
        read_cache(path, "https://aus.example.com/v1/orgs/2/bundle")
    assert "came from 'https://aus.example.com/v1/orgs/1/bundle'" in str(info.value)


def test_bad_cache_is_refused(tmp_path):
    path = tmp_path / "bundle.json"
    path.write_text("{not json")
    with pytest.raises(PolicyError) as info:
        read_cache(path, URL)
    assert str(path) in str(info.value) and "not a bundle cache" in str(info.value)
    doc = {"cache_format": 1, "url": URL, "etag": '"x"', "fetched_at": 1,
           "bundle": bundle(1, {"QA": ["x"]})}
    path.write_text(json.dumps(doc))
    with pytest.raises(PolicyError) as info:
        read_cache(path, URL)
    assert info.value.problems == [
        "members.QA: 'QA' is not a user group of the bundle's policy (policy.user_groups)"]


def test_unwritable_cache_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PolicySourceError) as info:
        write_cache(blocker / "bundle.json", URL, None, bundle_from_data(bundle(1, {}), SOURCE))
    assert info.value.kind == "cache"
    assert f"cannot write the bundle cache {blocker / 'bundle.json'}" in str(info.value)


def test_the_model_alone_refuses_what_the_parser_refuses():
    """The server builds with BundleDocument directly: undeclared member
    groups and policy cross references fail there too, not only in the
    agent's parser."""
    from pydantic import ValidationError

    from aus.core.bundle import BundleDocument

    doc = bundle(5, {"DEV": ["alice"], "QA": ["bob"]})
    with pytest.raises(ValidationError, match=r"members\.QA: 'QA' is not a user group"):
        BundleDocument.model_validate(doc)
    doc = bundle(5, {"DEV": ["alice"]})
    doc["policy"]["rules"][0]["sources"] = ["QA"]
    with pytest.raises(ValidationError, match=r"rules\[0\]\.sources\[0\]: 'QA' is not a declared"):
        BundleDocument.model_validate(doc)
    assert BundleDocument.model_validate(bundle(5, {"DEV": ["alice"]})).version == 5
