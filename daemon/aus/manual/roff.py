"""A command's argparse parser and its hand-written page -> man(7) source.

The sections follow man-pages(7): NAME, SYNOPSIS, DESCRIPTION, OPTIONS
(the parser's own), COMMANDS (every subcommand, nested ones under their
full name, each with its arguments and options), then the page's FILES,
ENVIRONMENT, SIGNALS, EXIT STATUS, EXAMPLES and SEE ALSO. A subcommand's
copy of an option its parent already lists (ausctl's --config and --json)
is named once, at the parent.

Only the plain man(7) macros are used (no groff extensions), so man-db,
mandoc and groff render it alike.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .. import __version__
from .pages import Page

SECTION_TITLES = {1: "User Commands", 8: "System Administration"}


def escape(text: str) -> str:
    """Text as roff prints it literally: backslashes, ASCII hyphen-minus
    (a bare '-' may print as a typographic hyphen, which breaks a copied
    option), non-ASCII characters, and a control character at a line's start."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    out = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in out.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


@dataclass(frozen=True)
class Command:
    """One parser in the tree: the root (path ()) or a subcommand."""
    path: tuple[str, ...]         # ("api-key", "create")
    parser: argparse.ArgumentParser
    help: str | None              # the help its parent gives it


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
             help: str | None = None) -> Iterator[Command]:
    """The parser and every subcommand below it, depth first, in the order
    they were added; an alias is not a command of its own."""
    yield Command(path, parser, help)
    sub = _subparsers(parser)
    if sub is None:
        return
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    seen = set()
    for name, child in sub.choices.items():
        if id(child) in seen:
            continue
        seen.add(id(child))
        yield from commands(child, path + (name,), helps.get(name))


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's arguments and options, without its subcommands."""
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


def metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _value(action: argparse.Action) -> str:
    """The value an argument takes, as roff: FOO, [FOO], FOO [FOO ...]."""
    meta = italic(metavar(action))
    if action.nargs == "?":
        return f"[{meta}]"
    if action.nargs == "*":
        return f"[{meta} ...]"
    if action.nargs == "+":
        return f"{meta} [{meta} ...]"
    if isinstance(action.nargs, int) and action.nargs > 1:
        return " ".join([meta] * action.nargs)
    return meta


def invocation(action: argparse.Action) -> str:
    """How the argument is written: "-f, --follow", "--limit LIMIT", "KEY_ID"."""
    if not action.option_strings:
        return _value(action)
    value = f" {_value(action)}" if _takes_value(action) else ""
    return ", ".join(bold(o) + value for o in action.option_strings)


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help with argparse's %(...)s expanded, as argparse
    itself expands it; "" when it has none."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = parser.prog
    for k, v in params.items():
        if hasattr(v, "__name__"):
            params[k] = v.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return action.help % params if "%" in action.help else action.help


def _usage_item(action: argparse.Action) -> str:
    if not action.option_strings:
        return _value(action)
    item = bold(action.option_strings[-1])
    if _takes_value(action):
        item += " " + _value(action)
    return item if action.required else f"[{item}]"


def _shown(action: argparse.Action, inherited: set[str]) -> bool:
    """Whether a command lists this argument: not help or version in a
    subcommand, nor an option its parent lists already."""
    return not (set(action.option_strings) & inherited)


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        if all(line.startswith("  ") for line in lines):
            out += [".PP", ".RS", ".nf"] + [escape(line[2:]) for line in lines] + [".fi", ".RE"]
        else:
            out += [".PP", escape(" ".join(line.strip() for line in lines))]
    return out


def _date() -> str:
    # Reproducible: the date a build is made for (SOURCE_DATE_EPOCH), else today.
    stamp = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%d", time.gmtime(int(stamp) if stamp else None))


def _tagged(rows: tuple[tuple[str, str], ...], tag=bold) -> list[str]:
    out = []
    for key, text in rows:
        out += [".TP", tag(key), escape(text)]
    return out


def render(page: Page, parser: argparse.ArgumentParser | None = None) -> str:
    """The page's man(7) source, from ``parser`` (default: the page's own)."""
    parser = parser or page.load_parser()
    tree = list(commands(parser))
    root, subs = tree[0], tree[1:]
    top_level = {o for a in arguments(parser) for o in a.option_strings}
    global_options = top_level - {"-h", "--help", "--version"}
    out = [
        f'.TH {page.command.upper()} {page.section} "{_date()}" "aus {__version__}" '
        f'"{SECTION_TITLES[page.section]}"',
        ".SH NAME",
        f"{escape(page.command)} \\- {escape(page.summary)}",
        ".SH SYNOPSIS",
    ]
    # One line per command a user can run: the root without subcommands,
    # else each subcommand that has none of its own.
    leaves = [c for c in tree if _subparsers(c.parser) is None]
    for i, command in enumerate(leaves):
        if i:
            out.append(".br")
        items = [bold(" ".join((page.command,) + command.path))]
        if command.path and global_options:
            items.insert(1, f"[{italic('options')}]")
        items += [_usage_item(a) for a in arguments(command.parser)
                  if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
                  and (not command.path or _shown(a, top_level))]
        out.append(" ".join(items))
    out += [".SH DESCRIPTION"] + _paragraphs(page.description)

    out.append(".SH OPTIONS")
    for action in arguments(root.parser):
        out += [".TP", invocation(action)]
        if text := help_text(root.parser, action):
            out.append(escape(text))

    if subs:
        out.append(".SH COMMANDS")

        def takes_global(command: Command) -> bool:
            return any(set(a.option_strings) & global_options for a in arguments(command.parser))

        # Said once when every command takes them (ausctl), else per command.
        every = all(takes_global(c) for c in subs)
        if every:
            out += [f"Every command takes {bold(page.command)}'s options as well, "
                    "before or after its name."]
        for command in subs:
            out.append(f'.SS "{escape(" ".join(command.path))}"')
            about = command.parser.description or command.help
            if about:
                out += [escape(about[:1].upper() + about[1:]) + ("" if about.endswith(".") else ".")]
            for action in arguments(command.parser):
                if not _shown(action, top_level | {"-h", "--help"}):
                    continue
                out += [".TP", invocation(action)]
                text = help_text(command.parser, action)
                if action.option_strings and action.required:
                    text = f"{text} (required)" if text else "Required."
                if text:
                    out.append(escape(text))
            if not every and takes_global(command):
                out += [".PP", f"It takes {bold(page.command)}'s options as well."]

    if page.files:
        out += [".SH FILES"] + _tagged(page.files, italic)
    if page.environment:
        out += [".SH ENVIRONMENT"] + _tagged(page.environment)
    if page.signals:
        out += [".SH SIGNALS"] + _tagged(page.signals)
    if page.exit_status:
        out += [".SH EXIT STATUS"] + _tagged(page.exit_status)
    if page.examples:
        out.append(".SH EXAMPLES")
        for what, command in page.examples:
            out += [".PP", escape(what), ".RS", ".nf", escape(command), ".fi", ".RE"]
    if page.see_also:
        out.append(".SH SEE ALSO")
        refs = [ref.partition("(") for ref in page.see_also]
        for i, (name, _, section) in enumerate(refs):
            out.append(f".BR {escape(name)} ({section}{',' if i < len(refs) - 1 else ''}")
    return "\n".join(out) + "\n"
