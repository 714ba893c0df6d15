"""The man pages and shell completions made from the three commands'
parsers: each page names every subcommand and option its parser has, also
ones added later and documented nowhere; man and groff render it without a
warning; the bash completion loads and completes every subcommand and a
choice; the zsh completion registers itself; ``python3 -m aus.manual``
writes them where Debian keeps them."""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aus.manual import roff
from aus.manual.__main__ import installed_paths
from aus.manual.completion import script
from aus.manual.pages import PAGES
from tests.support.manual import bash_complete, groff_warnings, listed, sections

REPO = Path(__file__).resolve().parents[2]
COMMANDS = sorted(PAGES)


def man(path: Path) -> str:
    """``man -l`` as a reader sees it, with man-db's own warnings on."""
    p = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "MANWIDTH": "100",
                                                   "MANPAGER": "cat", "PAGER": "cat"})
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr
    return p.stdout


def extended_ausctl() -> argparse.ArgumentParser:
    """ausctl's parser with what a later change might add, undocumented:
    an option on an existing command, and a new nested command."""
    parser = PAGES["ausctl"].load_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["flows"].add_argument("--brand-new-filter")
    group = sub.add_parser("frobnicate")
    nested = group.add_subparsers(dest="what", required=True).add_parser("twice")
    nested.add_argument("target")
    nested.add_argument("--very-undocumented", type=int)
    return parser


# ---- man pages ------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_page_lists_every_subcommand_and_option_of_the_parser(command):
    page = PAGES[command]
    parser = page.load_parser()
    source = roff.render(page, parser)
    assert source.startswith(f".TH {command.upper()} {page.section} ")
    assert listed(source, parser) == []
    # The tree was walked: ausd has no subcommands, the others have some.
    assert (len(list(roff.commands(parser))) > 1) == (command != "ausd")
    assert {"NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILES", "SEE ALSO"} <= set(
        sections(source))


def test_a_new_undocumented_option_and_nested_command_appear_on_the_page():
    parser = extended_ausctl()
    source = roff.render(PAGES["ausctl"], parser)
    assert listed(source, parser) == []
    parts = sections(source)
    assert roff.escape("--brand-new-filter") in parts["flows"]
    assert roff.escape("--very-undocumented") in parts["frobnicate twice"]
    assert "target" in parts["frobnicate twice"]
    # ... and so in what man shows.
    assert "ausctl frobnicate twice" in render_text(source)
    # The check itself catches a page that leaves something out.
    assert listed(source.replace(roff.escape("--brand-new-filter"), "x"), parser) == [
        "--brand-new-filter of flows"]
    assert listed(source.replace('.SS "frobnicate twice"', ".PP"), parser) == [
        "command 'frobnicate twice'"]


def render_text(source: str) -> str:
    p = subprocess.run(["groff", "-man", "-Tutf8", "-P-c", "-rLL=200n"], input=source,
                       capture_output=True, text=True, timeout=60, check=True)
    return re.sub(r".\x08", "", p.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_page_renders_without_warnings_in_groff_and_man(command, tmp_path):
    page = PAGES[command]
    source = roff.render(page)
    assert groff_warnings(source) == ""
    path = tmp_path / page.filename
    path.write_text(source)
    shown = man(path)
    assert f"{command} - {page.summary}" in " ".join(shown.split())
    for c in list(roff.commands(page.load_parser()))[1:]:
        assert re.search(rf"^\s+{re.escape(' '.join(c.path))}$", shown, re.M), c.path
    assert "/etc/aus/ausd.yaml" in shown or command == "aus-server"


def test_text_from_a_parser_is_printed_literally():
    parser = argparse.ArgumentParser(prog="ausctl")
    parser.add_argument("--odd", help=".starts like a request \\fB and has é and --dashes")
    parser.add_argument("--pct", default=7, help="default %(default)s, from %(prog)s")
    source = roff.render(PAGES["ausctl"], parser)
    assert groff_warnings(source) == ""
    text = render_text(source)
    assert ".starts like a request \\fB and has é and --dashes" in text
    assert "default 7, from ausctl" in text


# ---- completions ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bash_scripts(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for command in COMMANDS:
        path = tmp_path_factory.mktemp("bash") / command
        path.write_text(script(PAGES[command].load_parser(), "bash"))
        out[command] = path
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_bash_completion_loads_and_registers_the_command(command, bash_scripts):
    p = subprocess.run(["bash", "--norc", "-c", f'source "$1" && complete -p {command}',
                        "bash", str(bash_scripts[command])],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert re.fullmatch(rf"complete .*-F \S+ {re.escape(command)}\n", p.stdout), p.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_bash_completes_every_subcommand_and_option(command, bash_scripts):
    parser = PAGES[command].load_parser()
    for c in roff.commands(parser):
        if c.path:
            *before, name = c.path
            assert name in bash_complete(bash_scripts[command], [command, *before, name[:2]]), c.path
        options = [o for a in roff.arguments(c.parser) for o in a.option_strings
                   if o.startswith("--")]
        offered = bash_complete(bash_scripts[command], [command, *c.path, "--"])
        assert set(options) <= set(offered), (c.path, set(options) - set(offered))


def test_bash_completes_a_new_undocumented_option_and_nested_command(tmp_path):
    path = tmp_path / "ausctl"
    path.write_text(script(extended_ausctl(), "bash"))
    assert bash_complete(path, ["ausctl", "frob"]) == ["frobnicate"]
    assert bash_complete(path, ["ausctl", "frobnicate", ""]) == ["twice"]
    assert "--very-undocumented" in bash_complete(path, ["ausctl", "frobnicate", "twice", "--"])
    assert "--brand-new-filter" in bash_complete(path, ["ausctl", "flows", "--br"])


def test_bash_completes_choices_and_file_names(bash_scripts, tmp_path):
    ausctl = bash_scripts["ausctl"]
    by_path = {c.path: c.parser for c in roff.commands(PAGES["ausctl"].load_parser())}
    proto = next(a for a in roff.arguments(by_path[("check",)]) if "--proto" in a.option_strings)
    assert bash_complete(ausctl, ["ausctl", "check", "--proto", ""]) == list(proto.choices)
    assert bash_complete(ausctl, ["ausctl", "session", ""]) == ["open", "close"]
    assert {"create", "revoke"} <= set(
        bash_complete(bash_scripts["aus-server"], ["aus-server", "api-key", ""]))
    (tmp_path / "ausd-test.yaml").write_text("{}\n")
    assert bash_complete(bash_scripts["ausd"], ["ausd", "--config", str(tmp_path / "ausd-t")]) == [
        str(tmp_path / "ausd-test.yaml")]
    # No file names where the argument is not a path.
    assert bash_complete(ausctl, ["ausctl", "flows", "--user", str(tmp_path / "ausd-t")]) == []


def test_bash_completes_file_names_for_an_argument_shown_as_a_file(tmp_path):
    parser = argparse.ArgumentParser(prog="ausctl")
    check = parser.add_subparsers(dest="command").add_parser("lint")
    check.add_argument("source", metavar="FILE")
    check.add_argument("--name")
    path = tmp_path / "ausctl"
    path.write_text(script(parser, "bash"))
    (tmp_path / "policy.yaml").write_text("{}\n")
    assert bash_complete(path, ["ausctl", "lint", str(tmp_path / "pol")]) == [
        str(tmp_path / "policy.yaml")]
    assert bash_complete(path, ["ausctl", "lint", "--name", str(tmp_path / "pol")]) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_zsh_completion_parses_and_registers_through_compinit(command, tmp_path):
    path = tmp_path / f"_{command}"
    path.write_text(script(PAGES[command].load_parser(), "zsh"))
    syntax = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    # As Debian's zsh finds it: a #compdef file in a directory on $fpath.
    p = subprocess.run(["zsh", "-f", "-c", f'fpath=("$1" $fpath); autoload -Uz compinit; '
                        f'compinit -u -D; print -r -- "${{_comps[{command}]}}"',
                        "zsh", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"_{command}"


# ---- what the package build runs -----------------------------------------------------

def test_module_writes_pages_and_completions_where_debian_keeps_them(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}", "SOURCE_DATE_EPOCH": "0"}
    p = subprocess.run([sys.executable, "-m", "aus.manual", str(tmp_path), *COMMANDS],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    written = {str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file()}
    expected = {path for c in COMMANDS for path in installed_paths(PAGES[c]).values()}
    assert written == expected == {
        "usr/share/man/man8/ausd.8.gz", "usr/share/man/man1/ausctl.1.gz",
        "usr/share/man/man8/aus-server.8.gz",
        "usr/share/bash-completion/completions/ausd", "usr/share/bash-completion/completions/ausctl",
        "usr/share/bash-completion/completions/aus-server",
        "usr/share/zsh/vendor-completions/_ausd", "usr/share/zsh/vendor-completions/_ausctl",
        "usr/share/zsh/vendor-completions/_aus-server"}
    page = gzip.decompress((tmp_path / "usr/share/man/man1/ausctl.1.gz").read_bytes()).decode()
    assert page.startswith('.TH AUSCTL 1 "1970-01-01" ')
    # Compressed without a timestamp: the same input gives the same bytes.
    again = tmp_path / "again"
    again.mkdir()
    subprocess.run([sys.executable, "-m", "aus.manual", str(again), "ausctl"], check=True,
                   env=env, timeout=120)
    assert ((again / "usr/share/man/man1/ausctl.1.gz").read_bytes()
            == (tmp_path / "usr/share/man/man1/ausctl.1.gz").read_bytes())
    assert all(oct(f.stat().st_mode & 0o777) == "0o644"
               for f in tmp_path.rglob("*") if f.is_file() and "again" not in f.parts)


def test_module_refuses_an_unknown_command_and_a_missing_root(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}"}
    p = subprocess.run([sys.executable, "-m", "aus.manual", str(tmp_path), "ausctl", "austl"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert "no manual page for austl" in p.stderr and "ausctl" in p.stderr
    assert not any(tmp_path.iterdir())
    p = subprocess.run([sys.executable, "-m", "aus.manual", str(tmp_path / "nope"), "ausd"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "nope: not a directory" in p.stderr
