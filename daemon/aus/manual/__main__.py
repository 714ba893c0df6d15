"""``python3 -m aus.manual ROOT COMMAND...``: write each command's man page
and bash and zsh completions into the package tree ROOT, where Debian
keeps them:

    ROOT/usr/share/man/man<section>/<command>.<section>.gz
    ROOT/usr/share/bash-completion/completions/<command>
    ROOT/usr/share/zsh/vendor-completions/_<command>

Run with the package's own Python path, so each parser is the one that
ships. The man pages are compressed without a timestamp, for builds that
can be reproduced.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

from .completion import script
from .pages import PAGES, Page
from .roff import render

MAN_DIR = "usr/share/man"
BASH_DIR = "usr/share/bash-completion/completions"
ZSH_DIR = "usr/share/zsh/vendor-completions"


def installed_paths(page: Page) -> dict[str, str]:
    """What the page's command installs, by kind: man, bash, zsh."""
    return {
        "man": f"{MAN_DIR}/man{page.section}/{page.filename}.gz",
        "bash": f"{BASH_DIR}/{page.command}",
        "zsh": f"{ZSH_DIR}/_{page.command}",
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def write(root: Path, page: Page) -> list[Path]:
    parser = page.load_parser()
    paths = {kind: root / rel for kind, rel in installed_paths(page).items()}
    _write(paths["man"], gzip.compress(render(page, parser).encode(), compresslevel=9, mtime=0))
    for shell in ("bash", "zsh"):
        _write(paths[shell], script(parser, shell).encode())
    return list(paths.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m aus.manual",
                                 description="Write man pages and shell completions into a package tree.")
    ap.add_argument("root", type=Path, help="the package tree")
    ap.add_argument("commands", nargs="+", metavar="COMMAND", help=", ".join(PAGES))
    args = ap.parse_args(argv)
    unknown = [c for c in args.commands if c not in PAGES]
    if unknown:
        print(f"aus.manual: no manual page for {', '.join(unknown)}; "
              f"known: {', '.join(PAGES)}", file=sys.stderr)
        return 2
    if not args.root.is_dir():
        print(f"aus.manual: {args.root}: not a directory", file=sys.stderr)
        return 2
    for command in args.commands:
        write(args.root, PAGES[command])
    return 0


if __name__ == "__main__":
    sys.exit(main())
