"""Provisioning the draft from tests: rule and IP-list writes go into the
org's draft, and workloads see them once provisioned."""

from __future__ import annotations


def provision(client, api: str, note: str = "", **auth) -> int:
    """POST {api}/provision with ``client`` (a TestClient, a requests or an
    httpx client; ``auth``/``headers`` passed through); the new policy
    version. Fails loudly unless the server provisioned."""
    r = client.post(f"{api}/provision", json={"note": note}, **auth)
    assert r.status_code == 200, f"provision refused: {r.status_code} {r.text}"
    return r.json()["policy_version"]
