"""Each Debian package ships the man pages and bash and zsh completions of
its own commands, and only those: the agent's (``aus``) ausd(8) and
ausctl(1), aus-server's aus-server(8). The pages in the packages render
without a warning and name every subcommand and option of the parser that
ships beside them; the packaged bash completion completes a subcommand."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from aus.manual.__main__ import installed_paths
from aus.manual.pages import PAGES
from tests.support.debpkg import files
from tests.support.manual import bash_complete, groff_warnings, listed

pytestmark = pytest.mark.kernel
SHIPPED = {"aus": ("ausd", "ausctl"), "aus-server": ("aus-server",)}


def manual_files(command: str) -> set[str]:
    return {"/" + p for p in installed_paths(PAGES[command]).values()}


@pytest.fixture(scope="module")
def extracted(debs):
    roots = {name: Path(tempfile.mkdtemp(prefix=f"{name}-manual-")) for name in SHIPPED}
    try:
        for name, root in roots.items():
            subprocess.run(["dpkg-deb", "-x", str(debs[name]), str(root)], check=True)
        yield roots
    finally:
        for root in roots.values():
            shutil.rmtree(root)


@pytest.mark.parametrize("package", sorted(SHIPPED))
def test_each_package_ships_its_own_commands_pages_and_completions(debs, package):
    listing = files(debs[package])
    for command in PAGES:
        for path in manual_files(command):
            if command in SHIPPED[package]:
                assert listing.get(path) == "-rw-r--r--", (path, listing.get(path))
            else:
                assert path not in listing, path
    expected = {"ausd": "/usr/share/man/man8/ausd.8.gz", "ausctl": "/usr/share/man/man1/ausctl.1.gz",
                "aus-server": "/usr/share/man/man8/aus-server.8.gz"}
    for command in SHIPPED[package]:
        assert expected[command] in listing
        assert f"/usr/share/bash-completion/completions/{command}" in listing
        assert f"/usr/share/zsh/vendor-completions/_{command}" in listing


@pytest.mark.parametrize("command", sorted(PAGES))
def test_packaged_page_renders_and_names_every_subcommand_and_option(extracted, command):
    package = next(p for p, commands in SHIPPED.items() if command in commands)
    page = PAGES[command]
    gz = extracted[package] / installed_paths(page)["man"]
    source = gzip.decompress(gz.read_bytes()).decode()
    assert source.startswith(f".TH {command.upper()} {page.section} ")
    assert groff_warnings(source) == ""
    assert listed(source, page.load_parser()) == []


def test_packaged_bash_completion_completes_subcommands(extracted):
    ausctl = extracted["aus"] / installed_paths(PAGES["ausctl"])["bash"]
    assert bash_complete(ausctl, ["ausctl", "che"]) == ["check"]
    server = extracted["aus-server"] / installed_paths(PAGES["aus-server"])["bash"]
    assert bash_complete(server, ["aus-server", "mig"]) == ["migrate"]
    ausd = extracted["aus"] / installed_paths(PAGES["ausd"])["bash"]
    assert "--config" in bash_complete(ausd, ["ausd", "--"])
