"""What an API key may do. A key has one or more scopes:

    scim      the SCIM endpoint only (the Secret Token given to Entra ID)
    workload  what ausd needs: the bundle, check-in, flow upload
    read      the read-only management API and the console
    admin     everything, including SCIM and every change

A credential does one job: the token Entra ID holds cannot rewrite rules,
and a workload's credentials file cannot read other workloads' traffic.
"""

from __future__ import annotations

SCIM = "scim"
WORKLOAD = "workload"
READ = "read"
ADMIN = "admin"
ALL = (SCIM, WORKLOAD, READ, ADMIN)
DEFAULT = (ADMIN,)   # what every key could do before scopes; scripts keep working


def parse(text: str) -> tuple[str, ...]:
    """The scopes stored as space-separated names, in :data:`ALL`'s order."""
    names = set(text.split())
    return tuple(s for s in ALL if s in names)


def render(scopes) -> str:  # noqa: ANN001 - any iterable of names
    return " ".join(s for s in ALL if s in set(scopes))
