"""Offline validation of a policy file (``ausctl policy check``): no
daemon, no root, nothing but the file read.

A file passes when ausd would take it: it loads as ausd loads it
(:func:`aus.core.policy.load_policy`: YAML, the model, the cross
references) and compiles with the compiler ausd runs, with the same
``max_rules`` and baseline. Every problem is reported with its file,
line (when known), path and message.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .compiler import Network, compile_policy
from .errors import PolicyError
from .policy import load_policy
from .yamlsource import YamlSourceError, format_path, load_yaml_with_lines


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str           # rules[2].destinations[0]; "" for the whole file
    message: str

    def text(self) -> str:
        """``file:line: path: message`` (the parts that are known), the
        format compilers and linters use, so editors jump to the line."""
        head = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{head}: " + (f"{self.path}: " if self.path else "") + self.message

    def wire(self) -> dict:
        return {"file": self.file, "line": self.line, "path": self.path,
                "message": self.message}


@dataclass(frozen=True)
class Report:
    file: str
    errors: tuple[Problem, ...]
    rules: int                  # 0 when the file is refused
    groups: tuple[str, ...]     # the declared user groups, in file order

    @property
    def ok(self) -> bool:
        return not self.errors

    def wire(self) -> dict:
        """The stable shape of ``ausctl policy check --json``."""
        return {"ok": self.ok, "file": self.file, "errors": [e.wire() for e in self.errors],
                "rules": self.rules, "groups": list(self.groups)}


def _line_of(path: str | os.PathLike, where: tuple) -> int | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return load_yaml_with_lines(fh.read(), str(path))[1](where)
    except (OSError, UnicodeDecodeError, YamlSourceError):
        return None


def check_file(path: str | os.PathLike, *, baseline: Iterable[Network] = (),
               max_rules: int = 4096) -> Report:
    """What ausd would say of the policy file at ``path``."""
    source = str(path)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return Report(source, tuple(Problem(source, line, where, message)
                                    for line, where, message in exc.located), 0, ())
    try:
        compile_policy(policy, baseline, max_rules=max_rules)
    except ValueError as exc:   # what ausd turns into a refusal (compiler limits)
        where = ("rules",)
        return Report(source, (Problem(source, _line_of(path, where), format_path(where),
                                       str(exc)),), 0, ())
    return Report(source, (), len(policy.rules), tuple(g.name for g in policy.user_groups))
