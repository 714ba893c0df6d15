import os
import shutil
from pathlib import Path

import pytest

from tests.support import debpkg, lab

PEER_PORTS = [22, 53, 80, 443, 5353, 7999, 8000, 8050, 8100, 8101]


def pytest_collection_modifyitems(config, items):
    # Kernel tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). CI runs
    # as root, so there they always run; elsewhere they are skipped.
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests need root")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tools():
    missing = [t for t in ("ping", "useradd", "bpftool") if not shutil.which(t)]
    assert not missing, f"missing tools: {missing} (run scripts/setup.sh)"


@pytest.fixture(scope="module")
def peer(tools):
    with lab.peer(PEER_PORTS) as p:
        yield p


@pytest.fixture(scope="module")
def cg():
    with lab.cgroup() as path:
        yield path


@pytest.fixture(scope="module")
def people():
    with lab.users({"alice": ["dev"], "bob": ["ops"], "carol": [], "dave": ["dev", "ops"]}) as u:
        yield u


def lab_policy(peer, groups, *, dev_services=None):
    return {
        "user_groups": [{"name": groups["dev"].upper()}, {"name": groups["ops"]}],
        "ip_lists": {"lab": [f"{peer.v4}/32", f"{peer.v6}/128"]},
        "services": {"web": ["80/tcp"]},
        "rules": [
            {"name": "dev-web", "sources": [groups["dev"].upper()], "destinations": ["lab"],
             "services": dev_services or ["web", "8000-8100/tcp", "53/udp", "icmp"]},
            {"name": "ops-ssh", "sources": [groups["ops"]], "destinations": ["lab"],
             "services": ["22/tcp"]},
        ],
    }


@pytest.fixture(scope="module")
def daemon(cg, peer, people):
    """A running ausd on the module's cgroup with the lab policy."""
    _users, groups = people
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        yield d



@pytest.fixture(scope="session")
def debs() -> dict[str, Path]:
    """Both packages, built once per run, by package name."""
    return debpkg.build()
