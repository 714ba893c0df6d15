"""YAML loading that remembers where every value came from.

Both configuration files (the policy and ``ausd.yaml``) are validated by
pydantic, whose errors carry a ``loc`` path such as ``('rules', 2,
'destinations', 0)``. To tell the operator *where* the problem is, the
document is composed into a node tree first (SafeLoader) and each path is
mapped back to its node's line.

Public helpers:

* :func:`load_yaml_with_lines` - parse text, return ``(data, line_of)``;
* :func:`format_path` - ``('rules', 2, 'name')`` -> ``rules[2].name``;
* :func:`describe_validation_errors` - pydantic errors -> ``(path, line,
  text)`` tuples with readable reasons;
* :func:`render_problem` - ``line N: path: reason``.

Errors in the YAML itself raise :class:`YamlSourceError`; callers translate
it into their own error type (``PolicyError``, ``ConfigError``).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .yamlevents import SLOW, fast_load

Path_ = tuple[Any, ...]
LineOf = Callable[[Sequence[Any]], "int | None"]


class YamlSourceError(Exception):
    """The text is not acceptable YAML. ``problems`` are formatted as
    ``line N, column M: <problem>`` (position omitted when unknown)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# --------------------------------------------------------------------------
# Loading


def _mark_text(mark: yaml.Mark | None) -> str:
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "


def _yaml_error_text(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "invalid YAML"
        mark = exc.problem_mark or exc.context_mark
        if exc.context and problem.startswith("but "):
            # "expected a single document in the stream" / "but found ..."
            return f"{_mark_text(mark)}{exc.context}, {problem}"
        text = _mark_text(mark) + problem
        if exc.context and exc.problem and exc.context_mark is not None:
            text += f" ({exc.context} at line {exc.context_mark.line + 1})"
        elif exc.context and exc.problem:
            text += f" ({exc.context})"
        return text
    if isinstance(exc, yaml.reader.ReaderError):
        return (
            f"character {exc.character!r} at position {exc.position}: "
            f"{exc.reason}"
        )
    return str(exc) or type(exc).__name__


def _duplicate_keys(root: yaml.Node) -> list[str]:
    """Duplicate keys in any mapping. PyYAML silently keeps the last one,
    which in a firewall policy would silently drop a list or a rule."""
    problems: list[str] = []
    seen_nodes: set[int] = set()
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for key, value in node.value:
                stack.append(value)
                if not isinstance(key, yaml.ScalarNode):
                    continue
                if key.tag == "tag:yaml.org,2002:merge":
                    continue
                ident = (key.tag, key.value)
                if ident in first:
                    problems.append(
                        f"{_mark_text(key.start_mark)}duplicate key "
                        f"{key.value!r} (first given on line "
                        f"{first[ident].start_mark.line + 1})"
                    )
                else:
                    first[ident] = key
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    problems.sort(key=_problem_sort_key)
    return problems


def _problem_sort_key(text: str) -> tuple[int, str]:
    m = re.match(r"line (\d+)", text)
    return (int(m.group(1)) if m else 0, text)


def load_yaml_with_lines(text: str, source: str) -> tuple[Any, LineOf]:
    """Parse one YAML document with the safe loader.

    Returns ``(data, line_of)``: ``data`` is the plain Python value (None
    for an empty document) and ``line_of(path)`` gives the 1-based line of
    the deepest node along ``path`` that exists (the key's line for a
    mapping entry, the item's line for a list item), or None when the
    document is empty. Raises :class:`YamlSourceError` on invalid YAML or
    duplicate keys. ``source`` only names the text in messages of
    unexpected errors.

    The common document (plain mappings, lists and scalars) is read by
    :func:`fast_load` from libyaml's events, and its lines are found only
    when ``line_of`` is first asked, i.e. when validation failed: a
    10,000-rule policy is read in a fraction of the time the node tree
    takes. Anything else takes the node tree at once, as do all errors.
    """
    data = fast_load(text)
    if data is not SLOW:
        root: list[yaml.Node | None] = []

        def lazy_line_of(path: Sequence[Any]) -> int | None:
            if not root:
                try:
                    root.append(load_with_nodes(text, source)[1])
                except YamlSourceError:   # libyaml took what PyYAML refuses
                    root.append(None)
            return _line_in(root[0], path)

        return data, lazy_line_of
    data, node = load_with_nodes(text, source)
    return data, lambda path: _line_in(node, path)


def load_with_nodes(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The slow path: compose the node tree (every value's position), check
    it for duplicate keys, construct the data. ``(data, root node)``."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
            if root is None:
                return None, None
            dups = _duplicate_keys(root)
            if dups:
                raise YamlSourceError(dups)
            data = loader.construct_document(root)
        except yaml.YAMLError as exc:
            raise YamlSourceError([_yaml_error_text(exc)]) from exc
        except RecursionError as exc:  # absurdly nested or self-referencing
            raise YamlSourceError([f"{source}: document nested too deeply"]) from exc
    finally:
        loader.dispose()
    return data, root


def _line_in(root: yaml.Node | None, path: Sequence[Any]) -> int | None:
    """The line of the deepest node along ``path`` (see load_yaml_with_lines)."""
    if root is None:
        return None
    node: yaml.Node = root
    line = node.start_mark.line + 1
    for elem in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(elem):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode):
            if isinstance(elem, int) and not isinstance(elem, bool) \
                    and 0 <= elem < len(node.value):
                node = node.value[elem]
                line = node.start_mark.line + 1
            else:
                return line
        else:
            return line
    return line


# --------------------------------------------------------------------------
# Paths and messages

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def format_path(path: Sequence[Any]) -> str:
    """``('rules', 2, 'destinations', 0)`` -> ``rules[2].destinations[0]``;
    keys that are not identifier-like are quoted: ``ip_lists['a b']``."""
    out = ""
    for elem in path:
        if isinstance(elem, int) and not isinstance(elem, bool):
            out += f"[{elem}]"
        elif isinstance(elem, str) and _IDENT.match(elem):
            out += f".{elem}" if out else elem
        else:
            out += f"[{elem!r}]"
    return out


def render_problem(line: int | None, path: Sequence[Any], reason: str) -> str:
    """``line N: path: reason`` (parts omitted when unknown/empty)."""
    text = ""
    if line is not None:
        text += f"line {line}: "
    where = format_path(path)
    if where:
        text += f"{where}: "
    return text + reason


def describe_value(value: Any) -> str:
    """A short description of a YAML value for messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, (_dt.date, _dt.datetime)):
        return f"the date {value.isoformat()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_EXPECTED = {
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "path_type": "a path",
}

_SCALARS_YAML_RETYPES = (bool, int, float, _dt.date, type(None))


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional to the interesting type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _model_at(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class that holds the mapping at ``loc`` (None if unknown)."""
    tp: Any = root
    for elem in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(elem) if isinstance(elem, str) else None
            if field is None:
                return None
            tp = field.annotation
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (list, tuple, Sequence) and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return None


def _error_reason(err: dict[str, Any], model: type[BaseModel]) -> str:
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    value = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
        owner = _model_at(model, loc[:-1])
        text = f"unknown key {key!r}"
        if owner is not None:
            allowed = list(owner.model_fields)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            if close:
                text += f"; did you mean {close[0]!r}?"
            text += f" (allowed keys: {', '.join(allowed)})"
        return text
    if kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {describe_value(value)}"
        if kind == "string_type" and isinstance(value, _SCALARS_YAML_RETYPES):
            text += " (put it in quotes to make it a string)"
        return text
    if kind in ("value_error", "assertion_error"):
        ctx_err = (err.get("ctx") or {}).get("error")
        if ctx_err is not None and str(ctx_err):
            return str(ctx_err)
        msg = err.get("msg", "")
        return re.sub(r"^(Value|Assertion) error, ", "", msg)
    msg = err.get("msg", "invalid value")
    msg = msg[:1].lower() + msg[1:]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        msg += f" (got {value!r})"
    elif isinstance(value, bool):
        msg += f" (got {str(value).lower()})"
    return msg


def describe_validation_errors(
    exc: ValidationError, model: type[BaseModel], line_of: LineOf
) -> list[tuple[Path_, int | None, str]]:
    """Turn a pydantic ValidationError into ``(path, line, reason)``.

    ``[key]`` markers that pydantic adds for dict-key errors are dropped
    from the path (the line is the key's line either way)."""
    out: list[tuple[Path_, int | None, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(e for e in err.get("loc", ()) if e != "[key]")
        out.append((loc, line_of(loc), _error_reason(err, model)))
    return out


def located_problems(items: list[tuple[Path_, int | None, str]]
                     ) -> list[tuple[int | None, str, str]]:
    """``(line, formatted path, reason)``, de-duplicated and ordered by
    line (unknown last): the problems of :func:`sorted_problems`, not yet
    rendered."""
    seen: set[str] = set()
    keyed: list[tuple[int, int, tuple[int | None, str, str]]] = []
    for index, (path, line, reason) in enumerate(items):
        text = render_problem(line, path, reason)
        if text in seen:
            continue
        seen.add(text)
        keyed.append((line if line is not None else 1 << 30, index,
                      (line, format_path(path), reason)))
    keyed.sort()
    return [item for _, _, item in keyed]


def sorted_problems(items: list[tuple[Path_, int | None, str]]) -> list[str]:
    """Render, de-duplicate and order problems by line (unknown last)."""
    return [render_located(*item) for item in located_problems(items)]


def render_located(line: int | None, where: str, reason: str) -> str:
    """``line N: path: reason`` from an already formatted path."""
    return (f"line {line}: " if line is not None else "") + (f"{where}: " if where else "") + reason


_LINE_PREFIX = re.compile(r"line (\d+)(, column \d+)?: (.*)\Z", re.S)


def locate(text: str) -> tuple[int | None, str, str]:
    """A problem of :class:`YamlSourceError` (``line N, column M: ...``)
    as ``(N, "", "column M: ...")``: YAML errors have a position, no path."""
    m = _LINE_PREFIX.match(text)
    if m is None:
        return None, "", text
    return int(m.group(1)), "", (f"{m.group(2)[2:]}: " if m.group(2) else "") + m.group(3)
