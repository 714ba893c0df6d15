"""A command's argparse parser -> its bash and zsh completion scripts.

shtab writes both from the parser (subcommands, options, choices); it runs
when the packages are built and is not needed where they are installed:
the scripts it writes are plain shell. Arguments that name a file complete
with file names; which ones do is decided here, by their destination name,
so the parsers stay free of completion hints.
"""

from __future__ import annotations

import argparse
import copy

from .roff import arguments, commands

SHELLS = ("bash", "zsh")
# Arguments whose value is a path on this host.
FILE_DESTS = frozenset({"config", "policy", "file", "tls_cert", "tls_key", "credentials"})


def with_file_hints(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A copy of the parser whose path arguments complete file names."""
    import shtab

    parser = copy.deepcopy(parser)
    for command in commands(parser):
        for action in arguments(command.parser):
            if action.dest in FILE_DESTS and action.nargs != 0:
                action.complete = shtab.FILE
    return parser


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh), for the command
    named by the parser's prog."""
    import shtab

    if shell not in SHELLS:
        raise ValueError(f"no completion for shell {shell!r}; one of {', '.join(SHELLS)}")
    return shtab.complete(with_file_hints(parser), shell=shell)
