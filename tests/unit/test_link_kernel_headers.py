"""packaging/debian/link-kernel-headers links Debian's and Ubuntu's header
trees, run in a private mount namespace over empty /usr/src and
/lib/modules (the machine's own are never touched)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging/debian/link-kernel-headers"
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                      text=True).stdout.strip() or "amd64"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")


def link_in(trees: list[str]) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run the script with only ``trees`` under /usr/src; its output and
    {link name: target} in /lib/modules/$(uname -r)."""
    kdir = f"/lib/modules/{platform.release()}"
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs aus-test /usr/src; "
        "mount -t tmpfs aus-test /lib/modules; "
        + "".join(f"mkdir -p /usr/src/{t}; " for t in trees)
        + f'rc=0; sh {SCRIPT} || rc=$?; echo "rc=$rc"; '
        f'for l in {kdir}/*; do [ -L "$l" ] && echo "link $(basename $l) $(readlink $l)"; done; '
        "true")
    p = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    links = dict(line.split()[1:] for line in p.stdout.splitlines() if line.startswith("link "))
    return p, links


def test_debian_newest_arch_tree_with_its_common_tree():
    p, links = link_in([f"linux-headers-6.1.0-9-{ARCH}", "linux-headers-6.1.0-9-common",
                        f"linux-headers-6.1.0-12-{ARCH}", "linux-headers-6.1.0-12-common"])
    assert "rc=0" in p.stdout
    assert links == {"build": f"/usr/src/linux-headers-6.1.0-12-{ARCH}",
                     "source": "/usr/src/linux-headers-6.1.0-12-common"}


def test_ubuntu_newest_generic_tree():
    p, links = link_in(["linux-headers-6.8.0-31", "linux-headers-6.8.0-31-generic",
                        "linux-headers-6.8.0-45", "linux-headers-6.8.0-45-generic"])
    assert "rc=0" in p.stdout
    assert links == {"build": "/usr/src/linux-headers-6.8.0-45-generic"}


def test_no_headers_names_the_packages_to_install():
    p, links = link_in([])
    assert "rc=1" in p.stdout and not links
    assert (f"install linux-headers-{platform.release()}, or the newest: "
            f"linux-headers-{ARCH} (Debian) or linux-headers-generic (Ubuntu)") in p.stderr
