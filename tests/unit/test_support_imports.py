"""Imports among the test suites, their shared support and the benchmarks
point one way: a suite (tests/<suite>/) imports from tests.support and from
itself, never from another suite and never a test module (test_*.py);
bench/ may import tests.support and nothing else of tests/; tests.support
imports nothing from bench/ or from a suite. Every import counts, also one
inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``, relative ones made
    absolute; ``from pkg import name`` counts as ``pkg`` and ``pkg.name``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def wrong(module: str, target: str) -> str | None:
    """Why ``module`` may not import ``target``, or None when it may."""
    here, t = module.split("."), target.split(".")
    if t[0] == "bench":
        return "tests never import bench" if here[0] == "tests" else None
    if t[0] != "tests" or len(t) < 2 or t[1] == "support":
        return None
    if here[0] != "tests":
        return "bench uses tests.support only"
    if here[1] == "support":
        return "tests.support imports no suite"
    if t[1] != here[1]:
        return "another suite"
    if any(p.startswith("test_") for p in t[2:]):
        return "a test module"
    return None


def violations() -> list[str]:
    bad = []
    for path in sorted([*(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]):
        module = module_name(path)
        for line, target in imports_of(path.read_text(), module, path.name == "__init__.py"):
            why = wrong(module, target)
            if why:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target} ({why})")
    return bad


def test_imports_point_from_suites_and_bench_to_support():
    assert violations() == []


def test_each_crossing_is_named():
    src = ("from ..server.test_cli import CLI\n"
           "from .test_other import helper\n"
           "from .conftest import lab_policy\n"
           "from tests.support import lab\n"
           "def f():\n    from bench import common\n")
    found = {t: wrong("tests.kernel.test_x", t) for _, t in imports_of(src, "tests.kernel.test_x")}
    assert found["tests.server.test_cli"] == "another suite"
    assert found["tests.kernel.test_other"] == "a test module"
    assert found["tests.kernel.conftest.lab_policy"] is None
    assert found["tests.support.lab"] is None
    assert found["bench"] == "tests never import bench"
    assert wrong("tests.support.lab", "tests.kernel.conftest") == "tests.support imports no suite"
    assert wrong("tests.support.lab", "bench.common") == "tests never import bench"
    assert wrong("bench.common", "tests.support.netns") is None
    assert wrong("bench.common", "tests.kernel.conftest") == "bench uses tests.support only"
