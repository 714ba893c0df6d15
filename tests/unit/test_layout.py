"""The walls between the packages, read from the imports of every module.

aus.core is pure and shared: it imports nothing of the agent, the CLI, the
server, bcc or anything that talks to the system. The server never touches
the kernel: it imports nothing of the agent or the CLI. The agent imports
nothing of the server or the CLI. The CLI reaches pinned maps through
aus.agent.pins only, and bcc is imported by the loader alone. Every import
counts, also one inside a function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parents[2] / "daemon"

# Standard-library modules that talk to the system in ways the pure core
# must not (processes, sockets, locks, threads, signals, raw syscalls).
SYSTEM = {"subprocess", "socket", "fcntl", "selectors", "signal", "threading",
          "mmap", "ctypes.util", "multiprocessing"}
KERNEL_THIRD_PARTY = {"bcc", "pyroute2", "psutil"}
SERVER_THIRD_PARTY = {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic",
                      "psycopg", "scim2_models"}


@dataclass(frozen=True)
class Import:
    module: str   # the importing module, e.g. aus.agent.ausd
    target: str   # what it imports, e.g. aus.core.policy or bcc
    line: int


def module_name(path: Path, root: Path = SOURCE_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in a module's source, relative ones made absolute;
    ``from pkg import name`` counts as importing ``pkg.name`` (it may be a
    module) as well as ``pkg``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append(Import(module, target, node.lineno))
            out += [Import(module, f"{target}.{a.name}", node.lineno) for a in node.names]
    return out


def all_imports() -> list[Import]:
    out = []
    for path in sorted((SOURCE_ROOT / "aus").rglob("*.py")):
        name = module_name(path)
        out += imports_of(path.read_text(), name, path.name == "__init__.py")
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(imports: list[Import]) -> list[str]:
    """Each import that crosses a wall, as 'module:line imports target (why)'."""
    bad = []

    def refuse(i: Import, why: str) -> None:
        bad.append(f"{i.module}:{i.line} imports {i.target} ({why})")

    for i in imports:
        if _under(i.module, ["aus.core"]):
            if _under(i.target, ["aus.agent", "aus.cli", "aus.server"]):
                refuse(i, "the core is shared and imports no role")
            elif _under(i.target, KERNEL_THIRD_PARTY | SERVER_THIRD_PARTY | SYSTEM):
                refuse(i, "the core is pure")
        if _under(i.module, ["aus.server"]):
            if _under(i.target, ["aus.agent", "aus.cli"] + sorted(KERNEL_THIRD_PARTY)):
                refuse(i, "the server never touches the kernel")
        if _under(i.module, ["aus.agent"]):
            if _under(i.target, ["aus.server", "aus.cli"] + sorted(SERVER_THIRD_PARTY)):
                refuse(i, "the agent ships without the server and the CLI")
        if _under(i.module, ["aus.cli"]):
            if _under(i.target, ["aus.server"] + sorted(SERVER_THIRD_PARTY)):
                refuse(i, "the CLI ships with the agent")
            elif _under(i.target, ["aus.agent.bpfsys", "aus.agent.loader", "aus.agent.btf",
                                   "aus.agent.mapsync", "bcc"]):
                refuse(i, "the CLI reaches pinned maps through aus.agent.pins only")
        if _under(i.target, ["bcc"]) and i.module != "aus.agent.loader":
            refuse(i, "only the loader compiles with bcc")
    return bad


def map_openers() -> list[str]:
    """Modules that open a pinned map themselves (a call to ``Map.open``)
    instead of through aus.agent.pins."""
    out = []
    for path in sorted((SOURCE_ROOT / "aus").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "open"
                    and isinstance(node.value, (ast.Name, ast.Attribute))
                    and getattr(node.value, "id", getattr(node.value, "attr", "")) == "Map"):
                out.append(f"{module_name(path)}:{node.lineno}")
    return out


def test_every_role_is_a_package():
    for role in ("core", "agent", "cli", "server"):
        assert (SOURCE_ROOT / "aus" / role / "__init__.py").is_file(), role


def test_no_import_crosses_a_wall():
    imports = all_imports()
    assert len(imports) > 200      # the modules were found and read
    assert violations(imports) == []


def test_only_pins_opens_pinned_maps():
    assert [m for m in map_openers() if not m.startswith("aus.agent.pins:")] == []
    assert any(m.startswith("aus.agent.pins:") for m in map_openers())


# The checker itself: each wall refuses what crosses it.
@pytest.mark.parametrize("module,source,why", [
    ("aus.core.policy", "from ..agent import loader", "imports no role"),
    ("aus.core.compiler", "import subprocess", "the core is pure"),
    ("aus.core.state", "def f():\n    from bcc import BPF", "the core is pure"),
    ("aus.server.api", "from ..agent.pins import open_map", "never touches the kernel"),
    ("aus.server.scim.store", "from ...agent import mapview", "never touches the kernel"),
    ("aus.agent.ausd", "from aus.server import app", "ships without the server"),
    ("aus.cli.ausctl", "from ..agent import bpfsys", "through aus.agent.pins only"),
    ("aus.cli.ausctl", "from ..agent.loader import uninstall", "through aus.agent.pins only"),
    ("aus.agent.mapview", "import bcc", "only the loader"),
])
def test_the_checker_refuses(module, source, why):
    found = violations(imports_of(source, module))
    assert any(why in v for v in found), found


def test_the_checker_lets_the_walls_be_used():
    assert violations(imports_of("from ..core import contract\nfrom . import pins\n",
                                 "aus.agent.loader")) == []
    assert violations(imports_of("from ..agent import control, mapview, pins\n",
                                 "aus.cli.ausctl")) == []
    assert violations(imports_of("from ...core.policy import Policy\n",
                                 "aus.server.scim.store")) == []
