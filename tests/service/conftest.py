import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support import debpkg

from . import container

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

POLICY = {
    "user_groups": [{"name": "staff"}],
    "ip_lists": {"lab": ["198.18.0.0/15"]},
    "services": {"web": ["80/tcp"]},
    "rules": [{"name": "staff-web", "sources": ["staff"], "destinations": ["lab"],
               "services": ["web"]}],
}


def pytest_collection_modifyitems(config, items):
    # These tests boot a container and load the real programs: they need
    # root. CI runs as root, so there they always run.
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="service tests need root")
        for item in items:
            if Path(str(item.fspath)).is_relative_to(HERE):
                item.add_marker(skip)


@dataclass
class Box:
    """The container with the package installed and ausd configured."""
    m: container.Machine
    pin_dir: str                 # inside the container
    cgroup: str                  # the container's cgroup2 root, inside
    install: subprocess.CompletedProcess
    after_install: dict[str, str]


@pytest.fixture(scope="session")
def debs() -> dict[str, Path]:
    """Both packages, built once by the one command, by package name."""
    missing = [t for t in ("systemd-nspawn", "debootstrap", "nsenter", "bpftool")
               if not shutil.which(t)]
    assert not missing, f"missing tools: {missing} (run scripts/service-packages.sh)"
    return debpkg.build()


@pytest.fixture(scope="module")
def deb(debs) -> Path:
    """The agent's package."""
    return debs["aus"]


@pytest.fixture(scope="module")
def box(deb):
    with container.machine(deb, {"probe.py": HERE / "probe.py"}) as m:
        try:
            cgroup = m.run("findmnt", "--noheadings", "--first-only", "--types", "cgroup2",
                           "--output", "TARGET").stdout.strip()
            pin_dir = f"/sys/fs/bpf/{m.name}"
            # The configuration is in place before the package: its postinst
            # starts ausd, which must attach to the container's cgroup2 root
            # (a cgroup made for this test) and pin under a directory of its own.
            m.write("/etc/aus/ausd.yaml", yaml.safe_dump(
                {"policy": "/etc/aus/policy.yaml", "cgroup": cgroup, "pin_dir": pin_dir}))
            m.write("/etc/aus/policy.yaml", yaml.safe_dump(POLICY, sort_keys=False))
            install = m.run("apt-get", "install", "-y", "-q",
                            "-o", "Dpkg::Options::=--force-confold",
                            f"{container.GUEST_DIR}/{deb.name}", check=False, timeout=900)
            after = m.show("ausd", "ActiveState", "SubState", "UnitFileState", "MainPID",
                           "NRestarts", "InvocationID")
            # Drop .debs no mirror serves any more from the shared archive.
            m.run("apt-get", "autoclean", "-q", check=False)
            yield Box(m, pin_dir, cgroup, install, after)
        finally:
            if m.leader:
                m.run("ausctl", "uninstall", "--yes", check=False)


@pytest.fixture
def token() -> str:
    return secrets.token_hex(3)
