"""Reading what the man page and completion generators (aus.manual) made:
which parts of a parser a page leaves out, groff's warnings, and what bash
offers for a command line through a completion script."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from aus.manual import roff


def sections(source: str) -> dict[str, str]:
    """The page's source split at .SH and .SS headings, by heading text."""
    out, name = {}, ""
    for line in source.splitlines():
        m = re.match(r'\.S[HS] "?(.*?)"?$', line)
        if m:
            name = m.group(1)
            out[name] = ""
        else:
            out[name] = out.get(name, "") + line + "\n"
    return out


def listed(source: str, parser: argparse.ArgumentParser) -> list[str]:
    """What of the parser's tree the page does not show: a subcommand
    without its heading, or an argument missing under its command (an
    option the root has may be listed under OPTIONS only)."""
    parts = sections(source)
    top = {o for a in roff.arguments(parser) for o in a.option_strings}
    missing = []
    for command in roff.commands(parser):
        heading = roff.escape(" ".join(command.path)) if command.path else "OPTIONS"
        if heading not in parts:
            missing.append(f"command {' '.join(command.path)!r}")
            continue
        for action in roff.arguments(command.parser):
            where = parts["OPTIONS"] if set(action.option_strings) & top else parts[heading]
            for shown in action.option_strings or [roff.metavar(action)]:
                if roff.escape(shown) not in where:
                    missing.append(f"{shown} of {' '.join(command.path) or 'the root'}")
    return missing


def groff_warnings(source: str) -> str:
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=source,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stderr


def bash_complete(path: Path, words: list[str]) -> list[str]:
    """What bash offers after ``words`` (the last one being completed),
    through the function the script registers with ``complete``."""
    line = " ".join(words)
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = """
source "$1"
spec=$(complete -p "$2") || exit 9
fn=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<<"$spec")
COMP_WORDS=(%s)
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE=$3
COMP_POINT=${#COMP_LINE}
"$fn" "$2" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%%s\\n' "${COMPREPLY[@]}"
""" % quoted
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog, "bash", str(path), words[0],
                        line], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, (p.returncode, p.stderr)
    return [w for w in p.stdout.splitlines() if w]
