"""A command's argparse parser -> its bash and zsh completion scripts.

shtab writes both from the parser (subcommands, options, choices); it runs
when the packages are built and is not needed where they are installed:
the scripts it writes are plain shell. Arguments that name a file complete
with file names; which ones do is decided here, by their destination or
metavar, so the parsers stay free of completion hints.
"""

from __future__ import annotations

import argparse
import copy

from .roff import commands

SHELLS = ("bash", "zsh")
# Arguments whose value is a path on this host.
FILE_DESTS = frozenset({"config", "policy", "file", "tls_cert", "tls_key", "credentials"})
FILE_METAVARS = frozenset({"FILE", "PATH", "PEM"})


def names_a_file(action: argparse.Action) -> bool:
    return action.nargs != 0 and (action.dest in FILE_DESTS or (
        isinstance(action.metavar, str) and action.metavar.upper() in FILE_METAVARS))


def prepared(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A copy of the parser whose path arguments complete file names, and
    whose subcommands all complete: shtab, like argparse's help, leaves out
    a subcommand added without help=, which the man page still lists."""
    import shtab

    parser = copy.deepcopy(parser)
    for command in commands(parser):
        for action in command.parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {choice.dest for choice in action._choices_actions}
                for name in action.choices:
                    if name not in listed:
                        action._choices_actions.append(
                            action._ChoicesPseudoAction(name, (), help=""))
            elif names_a_file(action):
                action.complete = shtab.FILE
    return parser


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh), for the command
    named by the parser's prog."""
    import shtab

    if shell not in SHELLS:
        raise ValueError(f"no completion for shell {shell!r}; one of {', '.join(SHELLS)}")
    return shtab.complete(prepared(parser), shell=shell)
