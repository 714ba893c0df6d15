"""The management API: groups as pushed, manual groups, IP lists, rules
with field errors, the policy version, the bundle long-poll, workloads,
and org isolation."""

from __future__ import annotations

import json
import threading
import time

from tests.support.provision import provision
from tests.support.server_seed import seed


def _rule(sources, dest=("10.0.0.0/8",), services=("80/tcp",), name="dev-web"):
    return {"name": name, "sources": list(sources), "destinations": list(dest),
            "services": list(services)}


def test_auth_basic_and_bearer_and_errors(server):
    c = server.client
    assert c.get(f"{server.api}/whoami", auth=server.basic()).json() == {"org": "1"}
    assert c.get(f"{server.api}/whoami", headers=server.bearer()).status_code == 200
    r = c.get(f"{server.api}/whoami")
    assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"].startswith("Basic")
    key, secret = server.basic()
    r = c.get(f"{server.api}/whoami", auth=(key, secret + "x"))
    assert r.status_code == 401 and "wrong secret" in r.json()["error"]["message"]
    r = c.get(f"{server.api}/whoami", auth=("aknothere", "x"))
    assert r.status_code == 401
    # A key of org 2 sees nothing of org 1.
    r = c.get(f"{server.api}/groups", auth=server.basic(server.other_token))
    assert r.status_code == 403 and "another org" in r.json()["error"]["message"]


def test_groups_list_search_page_and_detail(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice", "bob"], "Ops Team": ["carol"],
                                           "dev-contractors": [], "Parent": []},
               nested={"Parent": ["DEV"]}, external_ids={"DEV": "8f2c0c6e-aaaa-bbbb-cccc-000000000001"})
    ids2 = seed(server.db_url, "2", groups={"DEV-of-org2": ["zed"]})
    c, auth = server.client, server.basic()
    body = c.get(f"{server.api}/groups", auth=auth).json()
    assert body["total"] == 4
    assert [g["display_name"] for g in body["items"]] == ["DEV", "dev-contractors", "Ops Team", "Parent"]
    # Substring, case-insensitive, by name or by external id.
    names = [g["display_name"] for g in c.get(f"{server.api}/groups", params={"q": "dEv"}, auth=auth).json()["items"]]
    assert names == ["DEV", "dev-contractors"]
    by_ext = c.get(f"{server.api}/groups", params={"q": "0000000001"}, auth=auth).json()
    assert [g["display_name"] for g in by_ext["items"]] == ["DEV"]
    page = c.get(f"{server.api}/groups", params={"offset": 1, "limit": 2}, auth=auth).json()
    assert page["total"] == 4 and [g["display_name"] for g in page["items"]] == ["dev-contractors", "Ops Team"]
    dev = next(g for g in body["items"] if g["display_name"] == "DEV")
    assert dev["member_count"] == 2 and dev["source"] == "scim"
    assert dev["last_sync"]["outcome"] == "ok"
    assert dev["nested"]["member_of"] == [{"id": ids["Parent"], "display_name": "Parent"}]
    detail = c.get(f"{server.api}/groups/{ids['Parent']}", auth=auth).json()
    assert detail["members"]["items"] == [{"id": ids["DEV"], "type": "Group", "name": "DEV"}]
    assert "nested" in detail["warning"]
    detail = c.get(f"{server.api}/groups/{ids['DEV']}", auth=auth).json()
    assert [m["name"] for m in detail["members"]["items"]] == ["alice", "bob"]
    assert "warning" in detail   # DEV is itself a member of Parent
    assert c.get(f"{server.api}/groups/{ids2['DEV-of-org2']}", auth=auth).status_code == 404


def test_manual_group_by_sid(server):
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/groups", json={"display_name": "AD-Admins", "sid": "s-1-5-21-1-2-3-512"}, auth=auth)
    assert r.status_code == 201, r.text
    g = r.json()
    assert g["source"] == "manual" and g["sid"] == "S-1-5-21-1-2-3-512"
    r = c.post(f"{server.api}/groups", json={"display_name": "ad-admins"}, auth=auth)
    assert r.status_code == 409 and r.json()["error"]["fields"][0]["field"] == "display_name"
    r = c.post(f"{server.api}/groups", json={"display_name": "X", "sid": "S-1-nope"}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "sid"
    r = c.post(f"{server.api}/groups", json={"display_name": "X", "colour": "red"}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "colour"
    assert c.delete(f"{server.api}/groups/{g['id']}", auth=auth).status_code == 204
    assert c.get(f"{server.api}/groups/{g['id']}", auth=auth).status_code == 404


def test_synced_group_cannot_be_deleted_here(server):
    ids = seed(server.db_url, "1", groups={"DEV": []})
    r = server.client.delete(f"{server.api}/groups/{ids['DEV']}", auth=server.basic())
    assert r.status_code == 409 and "SCIM" in r.json()["error"]["message"]


def test_rule_validation_names_every_field(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    other = seed(server.db_url, "2", groups={"Foreign": []})
    r = server.client.post(f"{server.api}/rules", auth=server.basic(), json={
        "name": "bad name!", "sources": [ids["DEV"], other["Foreign"]],
        "destinations": ["10.0.0.300/8", "10.1.0.0/16", "10.0.0.1/8"],
        "services": ["80/tcp", "70000/tcp", "http"]})
    assert r.status_code == 422
    fields = {f["field"]: f["message"] for f in r.json()["error"]["fields"]}
    assert set(fields) == {"name", "sources[1]", "destinations[0]", "destinations[2]",
                           "services[1]", "services[2]"}, fields
    assert "no user group" in fields["sources[1]"]
    assert "host bits" in fields["destinations[2]"] or "10.0.0.1/8" in fields["destinations[2]"]
    assert "65535" in fields["services[1]"]
    r = server.client.post(f"{server.api}/rules", auth=server.basic(),
                           json={"name": "x", "sources": [], "destinations": [], "services": []})
    assert {f["field"] for f in r.json()["error"]["fields"]} == {"sources", "destinations", "services"}
    assert server.client.get(f"{server.api}/rules", auth=server.basic()).json()["items"] == []


def test_rule_changes_bump_version_and_shape_the_bundle(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice@contoso.com", "bob"], "OPS": ["carol"]},
               inactive=("bob",), external_ids={"DEV": "ext-dev"})
    c, auth = server.client, server.basic()
    v0 = c.get(f"{server.api}/policy", auth=auth).json()["version"]
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth)
    assert r.status_code == 201, r.text
    rule = r.json()
    assert provision(c, server.api, auth=auth) == v0 + 1
    assert rule["sources"] == [{"id": ids["DEV"], "display_name": "DEV"}]
    bundle = c.get(f"{server.api}/bundle", auth=auth).json()
    assert bundle["version"] == v0 + 1 and bundle["format"] == 1 and bundle["org"] == "1"
    assert bundle["policy"]["user_groups"] == [{"name": "DEV", "external_id": "ext-dev"}]
    assert bundle["policy"]["rules"] == [{"name": "dev-web", "sources": ["DEV"],
                                          "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]}]
    # Only active members; OPS is named by no rule, so it is not shipped.
    assert bundle["members"] == {"DEV": ["alice@contoso.com"]}
    # An IP list as destination, and a change of the rule.
    r = c.post(f"{server.api}/ip-lists", json={"name": "dmz", "entries": ["192.0.2.0/24", "2001:db8::/64"]}, auth=auth)
    assert r.status_code == 201, r.text
    r = c.put(f"{server.api}/rules/{rule['id']}", auth=auth,
              json=_rule([ids["DEV"], ids["OPS"]], dest=["dmz"], services=["443/tcp", "icmp"]))
    assert r.status_code == 200, r.text
    v2 = provision(c, server.api, auth=auth)
    assert v2 > v0 + 1
    bundle = c.get(f"{server.api}/bundle", auth=auth).json()
    assert bundle["policy"]["ip_lists"] == {"dmz": ["192.0.2.0/24", "2001:db8::/64"]}
    assert bundle["members"] == {"DEV": ["alice@contoso.com"], "OPS": ["carol"]}
    # Deleting an IP list in use is refused; deleting the rule bumps again.
    lists = c.get(f"{server.api}/ip-lists", auth=auth).json()["items"]
    assert c.delete(f"{server.api}/ip-lists/{lists[0]['id']}", auth=auth).status_code == 409
    r = c.delete(f"{server.api}/rules/{rule['id']}", auth=auth)
    assert r.status_code == 200
    assert provision(c, server.api, auth=auth) == v2 + 1
    assert c.get(f"{server.api}/bundle", auth=auth).json()["policy"]["rules"] == []
    # The bundle validates as the daemon's policy model.
    from aus.core.policy import Policy
    Policy.model_validate(bundle["policy"])


def test_duplicate_rule_name(server):
    ids = seed(server.db_url, "1", groups={"DEV": []})
    c, auth = server.client, server.basic()
    assert c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth).status_code == 201
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth)
    assert r.status_code == 409 and r.json()["error"]["fields"][0]["field"] == "name"


def test_bundle_etag_304_and_long_poll_wakes_on_change(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    first = c.get(f"{server.api}/bundle", auth=auth)
    etag = first.headers["etag"]
    t0 = time.monotonic()
    r = c.get(f"{server.api}/bundle", params={"wait": 0.5}, headers={"If-None-Match": etag}, auth=auth)
    assert r.status_code == 304 and r.headers["etag"] == etag
    assert 0.4 < time.monotonic() - t0 < 3
    got: dict = {}

    def poll():
        t = time.monotonic()
        resp = c.get(f"{server.api}/bundle", params={"wait": 4}, auth=auth,
                     headers={"If-None-Match": etag, "X-Aus-Workload": "host-a", "X-Aus-Enforcing": "1"})
        got.update(status=resp.status_code, body=resp.json(), elapsed=time.monotonic() - t,
                   etag=resp.headers["etag"])

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.5)
    changed_at = time.monotonic()
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth)
    provision(c, server.api, auth=auth)
    th.join(10)
    assert got["status"] == 200 and got["etag"] != etag
    assert got["body"]["policy"]["rules"][0]["name"] == "dev-web"
    assert got["elapsed"] < 3.5, got["elapsed"]   # woke on the change, not at the end of the wait
    assert time.monotonic() - changed_at < 2
    deadline = time.monotonic() + 5   # check-ins are written in batches
    while not (w := c.get(f"{server.api}/workloads", auth=auth).json())["items"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [x["name"] for x in w["items"]] == ["host-a"]
    assert w["items"][0]["enforcing_version"] == 1 and w["items"][0]["current"] is False


def test_membership_change_reaches_bundle(server):
    """A write that bypasses the management API (as SCIM does) is picked
    up by the bundle service through the org's generation."""
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]}, users=["bob"])
    c, auth = server.client, server.basic()
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth)
    provision(c, server.api, auth=auth)
    before = c.get(f"{server.api}/bundle", auth=auth)
    from aus.server.bundle import touch
    from aus.server.db import Membership, open_database
    engine, sessions = open_database(server.db_url)
    with sessions.begin() as s:
        s.add(Membership(group_id=ids["DEV"], member_id=ids["bob"], member_type="User"))
        touch(s, "1")
    engine.dispose()
    r = c.get(f"{server.api}/bundle", params={"wait": 5},
              headers={"If-None-Match": before.headers["etag"]}, auth=auth)
    assert r.status_code == 200
    assert r.json()["members"] == {"DEV": ["alice", "bob"]}
    assert r.json()["version"] == before.json()["version"] + 1


def test_org_isolation_on_every_route(server):
    ids = seed(server.db_url, "1", groups={"DEV": []})
    c = server.client
    other = server.basic(server.other_token)
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=server.basic())
    rid = r.json()["id"]
    for method, path in [("GET", "/groups"), ("GET", f"/groups/{ids['DEV']}"), ("GET", "/rules"),
                         ("GET", f"/rules/{rid}"), ("DELETE", f"/rules/{rid}"), ("GET", "/bundle"),
                         ("GET", "/workloads"), ("GET", "/policy"), ("GET", "/ip-lists")]:
        resp = c.request(method, server.api + path, auth=other)
        assert resp.status_code == 403, (method, path, resp.status_code)
    # Org 2's own view holds nothing of org 1 (a rule with org 1's group is refused).
    r = c.post("/api/orgs/2/rules", json=_rule([ids["DEV"]]), auth=other)
    assert r.status_code == 422 and "no user group" in json.dumps(r.json())
    assert c.get(f"{server.api}/rules/{rid}", auth=server.basic()).status_code == 200


def test_whoami_tells_the_org_of_a_key(server):
    c = server.client
    assert c.get("/api/whoami", auth=server.basic()).json()["org"] == "1"
    assert c.get("/api/whoami", auth=server.basic(server.other_token)).json()["org"] == "2"
    assert c.get("/api/whoami", auth=("x", "y")).status_code == 401


def test_dns_names_in_rules_and_ip_lists_reach_the_bundle(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/ip-lists", auth=auth, json={
        "name": "github", "entries": ["dns:github.com", "dns:*.githubusercontent.com",
                                      "140.82.112.0/20"]})
    assert r.status_code == 201, r.text
    r = c.post(f"{server.api}/rules", auth=auth, json=_rule(
        [ids["DEV"]], dest=["github", "dns:pypi.org"], services=["443/tcp"]))
    assert r.status_code == 201, r.text
    assert r.json()["destinations"] == ["github", "dns:pypi.org"]
    provision(c, server.api, auth=auth)
    bundle = c.get(f"{server.api}/bundle", auth=auth).json()
    assert bundle["policy"]["ip_lists"] == {
        "github": ["dns:github.com", "dns:*.githubusercontent.com", "140.82.112.0/20"]}
    assert bundle["policy"]["rules"][0]["destinations"] == ["github", "dns:pypi.org"]
    # the daemon's model takes it, names and all
    from aus.core.policy import Policy
    policy = Policy.model_validate(bundle["policy"])
    assert [str(p) for p in policy.dns_of(policy.rules[0])] == [
        "dns:github.com", "dns:*.githubusercontent.com", "dns:pypi.org"]


def test_a_bad_dns_name_is_a_422_naming_the_entry(server):
    ids = seed(server.db_url, "1", groups={"DEV": []})
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/rules", auth=auth, json=_rule(
        [ids["DEV"]], dest=["10.0.0.0/8", "dns:*.com", "dns:10.0.0.1", "github.com"]))
    assert r.status_code == 422
    fields = {f["field"]: f["message"] for f in r.json()["error"]["fields"]}
    assert fields == {
        "destinations[1]": "'dns:*.com' would match every name under the top-level domain "
                           "'com'; a wildcard needs at least two labels after '*.' "
                           "(dns:*.example.com)",
        "destinations[2]": "'dns:10.0.0.1' is an address, not a name: write 10.0.0.1 "
                           "without dns:",
        "destinations[3]": "'github.com' is not a valid IP address or CIDR (nor is it the "
                           "name of an IP list); for the DNS name write 'dns:github.com'"}
    r = c.post(f"{server.api}/ip-lists", auth=auth,
               json={"name": "mixed", "entries": ["192.0.2.0/24", "dns:a_b.example"]})
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == [{
        "field": "entries[1]", "message": "'dns:a_b.example': the label 'a_b' contains '_'; "
                                          "a label holds letters, digits and hyphens only"}]
    r = c.post(f"{server.api}/ip-lists", auth=auth,
               json={"name": "dns:github.com", "entries": ["192.0.2.0/24"]})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "name"
    assert "reads as a DNS name" in r.json()["error"]["fields"][0]["message"]
    assert c.get(f"{server.api}/rules", auth=auth).json()["items"] == []
    assert c.get(f"{server.api}/ip-lists", auth=auth).json()["items"] == []
