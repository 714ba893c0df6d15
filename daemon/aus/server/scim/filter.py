"""SCIM filter and PATCH path parsing (RFC 7644 §3.4.2.2, §3.5.2), pure.

A small recursive-descent parser turns the text into an AST; the AST knows
nothing of schemas or storage. ``query.py`` compiles it to SQL and
``patch.py`` evaluates value filters (``emails[type eq "work"]``) on a
resource in memory with :func:`evaluate`.

Grammar, precedence ``not`` > ``and`` > ``or``, keywords and operators in
any case::

    FILTER    = OR
    OR        = AND *("or" AND)
    AND       = UNARY *("and" UNARY)
    UNARY     = "not" "(" FILTER ")" / "(" FILTER ")" / ATTREXP
    ATTREXP   = attrPath "pr" / attrPath compareOp compValue
              / attrPath "[" FILTER "]" [ "." subAttr ( "pr" / compareOp compValue ) ]
    PATH      = attrPath [ "[" FILTER "]" [ "." subAttr ] ]

Two departures from the ABNF, both for what Microsoft Entra ID sends or
documents: ``emails[type eq "work"].value eq "x"`` (a sub-attribute after
a value filter, read as ``emails[type eq "work" and value eq "x"]``), and
an unquoted word as a value (``externalId eq jyoung``), read as a string.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import INVALID_FILTER, INVALID_PATH, ScimError

OPERATORS = ("eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le")
KEYWORDS = {"and", "or", "not"}
_LITERALS = {"true": True, "false": False, "null": None}
_NAME = re.compile(r"^\$?[A-Za-z][A-Za-z0-9_\-]*$")
_URN_PREFIX = "urn:"
MAX_LENGTH = 8192       # characters of a filter or path
MAX_TERMS = 100         # comparisons in one filter (Entra ID sends one or two)
MAX_NESTING = 16        # "(" and "not (" inside each other
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
MAX_NUMBER_DIGITS = 18  # an integer of more digits would not fit a 64-bit column


class FilterError(ScimError):
    """A filter or path that does not parse; ``pos`` is the 0-based offset."""

    def __init__(self, message: str, text: str, pos: int, scim_type: str = INVALID_FILTER):
        what = "filter" if scim_type == INVALID_FILTER else "path"
        pos = max(0, min(pos, len(text)))
        shown = text if len(text) <= 200 else text[:200] + "…"
        super().__init__(400, f"invalid {what} at position {pos + 1}: {message} "
                              f"(in {what} {shown!r})", scim_type)
        self.message = message
        self.pos = pos


# --------------------------------------------------------------------------
# AST


@dataclass(frozen=True)
class AttrPath:
    """``[uri ":"] name ["." sub]`` as written; names keep their case here
    and are matched case-insensitively by the resolver."""

    uri: str | None
    name: str
    sub: str | None = None
    pos: int = 0

    def __str__(self) -> str:
        head = f"{self.uri}:{self.name}" if self.uri else self.name
        return f"{head}.{self.sub}" if self.sub else head


@dataclass(frozen=True)
class Compare:
    attr: AttrPath
    op: str                     # one of OPERATORS, lower case
    value: Any                  # str, bool, None, int or float
    pos: int = 0


@dataclass(frozen=True)
class Present:
    attr: AttrPath
    pos: int = 0


@dataclass(frozen=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    expr: Node


@dataclass(frozen=True)
class Match:
    """``attr[filter]``: some value of the multi-valued ``attr`` matches
    ``filter``, whose attribute paths are relative to that value."""

    attr: AttrPath
    filter: Node
    pos: int = 0


Node = Compare | Present | And | Or | Not | Match


@dataclass(frozen=True)
class PatchPath:
    """A PATCH ``path``: an attribute, optionally narrowed to the values
    matching ``filter``, optionally down to their sub-attribute ``sub``."""

    attr: AttrPath
    filter: Node | None = None
    sub: str | None = None


# --------------------------------------------------------------------------
# Lexer

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![A-Za-z_]))
  | (?P<word>[A-Za-z_$][A-Za-z0-9_$:.\-]*)
  | (?P<sub>\.[A-Za-z_$][A-Za-z0-9_$\-]*)
  | (?P<punct>[()\[\]])
""", re.VERBOSE)


@dataclass(frozen=True)
class _Tok:
    kind: str      # str num word sub punct end
    text: str
    pos: int


def _lex(text: str, scim_type: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            ch = text[i]
            if ch == '"':
                raise FilterError("unterminated string", text, i, scim_type)
            if ch == "'":
                raise FilterError("strings are quoted with \" not '", text, i, scim_type)
            raise FilterError(f"unexpected character {ch!r}", text, i, scim_type)
        kind = m.lastgroup
        if kind != "ws":
            toks.append(_Tok(kind, m.group(), i))
        i = m.end()
    toks.append(_Tok("end", "", len(text)))
    return toks


# --------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str, scim_type: str):
        self.text = text
        self.scim_type = scim_type
        self.toks = _lex(text, scim_type)
        self.i = 0
        self.depth = 0      # inside [...]
        self.nesting = 0    # inside ( ... )
        self.terms = 0

    def fail(self, message: str, tok: _Tok | None = None):
        tok = tok or self.peek()
        raise FilterError(message, self.text, tok.pos, self.scim_type)

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def is_word(self, *words: str) -> bool:
        tok = self.peek()
        return tok.kind == "word" and tok.text.lower() in words

    def expect_punct(self, ch: str, context: str) -> _Tok:
        tok = self.peek()
        if tok.kind != "punct" or tok.text != ch:
            self.fail(f"expected {ch!r} {context}, found {self.describe(tok)}")
        return self.next()

    @staticmethod
    def describe(tok: _Tok) -> str:
        return "the end" if tok.kind == "end" else repr(tok.text)

    # FILTER
    def parse_or(self) -> Node:
        node = self.parse_and()
        while self.is_word("or"):
            self.next()
            node = Or(node, self.parse_and())
        return node

    def parse_and(self) -> Node:
        node = self.parse_unary()
        while self.is_word("and"):
            self.next()
            node = And(node, self.parse_unary())
        return node

    def parse_unary(self) -> Node:
        tok = self.peek()
        if self.is_word("not") or (tok.kind == "punct" and tok.text == "("):
            if self.nesting >= MAX_NESTING:
                self.fail(f"parentheses nest deeper than {MAX_NESTING} levels")
            self.nesting += 1
            try:
                return self._parse_group()
            finally:
                self.nesting -= 1
        return self.parse_attr_exp()

    def _parse_group(self) -> Node:
        tok = self.peek()
        if self.is_word("not"):
            self.next()
            self.expect_punct("(", "after 'not'")
            node = self.parse_or()
            self.expect_punct(")", "to close 'not ('")
            return Not(node)
        if tok.kind == "punct" and tok.text == "(":
            self.next()
            node = self.parse_or()
            self.expect_punct(")", "to close '('")
            return node
        self.fail(f"expected 'not' or '(', found {self.describe(tok)}")

    def parse_attr_path(self) -> AttrPath:
        tok = self.peek()
        self.terms += 1
        if self.terms > MAX_TERMS:
            self.fail(f"more than {MAX_TERMS} attribute comparisons in one filter")
        if tok.kind != "word" or tok.text.lower() in KEYWORDS:
            self.fail(f"expected an attribute name, found {self.describe(tok)}")
        self.next()
        return split_attr_path(tok.text, tok.pos, self.text, self.scim_type)

    def parse_attr_exp(self) -> Node:
        attr = self.parse_attr_path()
        tok = self.peek()
        if tok.kind == "punct" and tok.text == "[":
            if self.depth:
                self.fail("a value filter cannot contain another '['")
            if attr.sub:
                self.fail(f"a value filter applies to an attribute, not to the "
                          f"sub-attribute {str(attr)!r}", tok)
            self.next()
            self.depth += 1
            inner = self.parse_or()
            self.depth -= 1
            self.expect_punct("]", "to close '['")
            sub = self.peek()
            if sub.kind == "sub":
                self.next()
                name = sub.text[1:]
                rel = AttrPath(None, name, None, sub.pos + 1)
                inner = And(inner, self.parse_condition(rel))
            return Match(attr, inner, attr.pos)
        return self.parse_condition(attr)

    def parse_condition(self, attr: AttrPath) -> Node:
        tok = self.peek()
        op = tok.text.lower() if tok.kind == "word" else ""
        if op == "pr":
            self.next()
            return Present(attr, attr.pos)
        if op not in OPERATORS:
            self.fail(f"expected an operator (eq, ne, co, sw, ew, gt, ge, lt, le or pr) "
                      f"after {str(attr)!r}, found {self.describe(tok)}")
        self.next()
        value_tok = self.peek()
        value = self.parse_value(str(attr), op)
        if op in ("co", "sw", "ew") and not isinstance(value, str):
            self.fail(f"'{op}' compares strings; {value_tok.text!r} is not a string", value_tok)
        if op in ("gt", "ge", "lt", "le") and (value is None or isinstance(value, bool)):
            self.fail(f"'{op}' cannot compare with {value_tok.text!r}", value_tok)
        return Compare(attr, op, value, attr.pos)

    def parse_value(self, attr: str, op: str) -> Any:
        tok = self.peek()
        if tok.kind == "str":
            self.next()
            try:
                value = json.loads(tok.text)
            except ValueError:
                self.fail("invalid escape in string", tok)
            if _BAD_CHARS.search(value):
                self.fail("a string may not contain NUL or an unpaired surrogate", tok)
            return value
        if tok.kind == "num":
            self.next()
            return self.number(tok)
        if tok.kind == "word":
            low = tok.text.lower()
            if low in _LITERALS:
                self.next()
                return _LITERALS[low]
            if low not in KEYWORDS and low not in OPERATORS and low != "pr":
                self.next()
                return tok.text          # an unquoted word, as Entra's examples show
        self.fail(f"expected a value after {attr!r} {op}, found {self.describe(tok)}")

    def number(self, tok: _Tok) -> int | float:
        """A JSON number: no leading zeros, an integer within 64 bits, a
        finite float."""
        if not _JSON_NUMBER.fullmatch(tok.text):
            self.fail(f"{tok.text!r} is not a number (JSON numbers have no leading zeros)", tok)
        integer = tok.text.lstrip("-")
        if integer.isdigit():
            if len(integer) > MAX_NUMBER_DIGITS:
                self.fail(f"the number has more than {MAX_NUMBER_DIGITS} digits", tok)
            return int(tok.text)
        value = float(tok.text[:64]) if len(tok.text) <= 64 else float("inf")
        if value in (float("inf"), float("-inf")):
            self.fail(f"the number {tok.text[:24]!r} is out of range", tok)
        return value

    def finish(self) -> None:
        tok = self.peek()
        if tok.kind != "end":
            if tok.kind == "punct" and tok.text in ")]":
                self.fail(f"unbalanced {tok.text!r}")
            self.fail(f"expected 'and', 'or' or the end, found {self.describe(tok)}")


def split_attr_path(word: str, pos: int, text: str, scim_type: str) -> AttrPath:
    """``urn:...:User:manager.value`` -> uri, name, sub."""
    uri = None
    rest = word
    if word.lower().startswith(_URN_PREFIX):
        if ":" not in word[len(_URN_PREFIX):]:
            raise FilterError(f"{word!r} is not a schema URN followed by an attribute",
                              text, pos, scim_type)
        uri, rest = word.rsplit(":", 1)
    parts = rest.split(".")
    if len(parts) > 2:
        raise FilterError(f"{word!r} goes deeper than attribute.subAttribute",
                          text, pos, scim_type)
    for part in parts:
        if not _NAME.match(part):
            raise FilterError(f"{part!r} is not a valid attribute name", text, pos, scim_type)
    return AttrPath(uri, parts[0], parts[1] if len(parts) == 2 else None, pos)


def parse_filter(text: str) -> Node:
    if text is None or not text.strip():
        raise FilterError("the filter is empty", text or "", 0)
    if len(text) > MAX_LENGTH:
        raise FilterError(f"the filter is longer than {MAX_LENGTH} characters", text, MAX_LENGTH)
    p = _Parser(text, INVALID_FILTER)
    node = p.parse_or()
    p.finish()
    return node


def parse_path(text: str) -> PatchPath:
    """A PATCH operation's ``path`` (RFC 7644 §3.5.2, ``PATH`` ABNF)."""
    if text is None or not str(text).strip():
        raise FilterError("the path is empty", text or "", 0, INVALID_PATH)
    if not isinstance(text, str) or len(text) > MAX_LENGTH:
        raise FilterError(f"the path is not a string of at most {MAX_LENGTH} characters",
                          str(text)[:200], 0, INVALID_PATH)
    p = _Parser(text, INVALID_PATH)
    attr = p.parse_attr_path()
    flt = None
    sub = None
    tok = p.peek()
    if tok.kind == "punct" and tok.text == "[":
        if attr.sub:
            p.fail(f"a value filter applies to an attribute, not to {str(attr)!r}", tok)
        p.next()
        p.depth = 1
        flt = p.parse_or()
        p.expect_punct("]", "to close '['")
        tok = p.peek()
        if tok.kind == "sub":
            p.next()
            sub = tok.text[1:]
            if not _NAME.match(sub):
                p.fail(f"{sub!r} is not a valid attribute name", tok)
    tok = p.peek()
    if tok.kind != "end":
        p.fail(f"unexpected {p.describe(tok)} after the path")
    return PatchPath(attr, flt, sub)


# --------------------------------------------------------------------------
# Evaluation in memory (value filters of PATCH paths)


def _fold(v: Any) -> Any:
    return v.casefold() if isinstance(v, str) else v


def _as_datetime(v: Any) -> dt.datetime | None:
    if not isinstance(v, str):
        return None
    try:
        d = dt.datetime.fromisoformat(v)
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=dt.UTC)


def compare(actual: Any, op: str, expected: Any, case_exact: bool) -> bool:
    """One comparison of RFC 7644 §3.4.2.2 on plain JSON values."""
    if isinstance(actual, list):
        return any(compare(a, op, expected, case_exact) for a in actual)
    if op == "eq" and expected is None:
        return actual is None
    if op == "ne" and expected is None:
        return actual is not None
    if actual is None:
        return op == "ne"
    if isinstance(expected, bool) or isinstance(actual, bool):
        if isinstance(actual, str) and actual.lower() in ("true", "false"):
            actual = actual.lower() == "true"
        if isinstance(expected, str) and expected.lower() in ("true", "false"):
            expected = expected.lower() == "true"
        if op == "eq":
            return actual == expected
        if op == "ne":
            return actual != expected
        return False
    if isinstance(actual, str) and isinstance(expected, str):
        da, de = _as_datetime(actual), _as_datetime(expected)
        if da is not None and de is not None and op in ("gt", "ge", "lt", "le", "eq", "ne"):
            a, e = da, de
        elif case_exact:
            a, e = actual, expected
        else:
            a, e = actual.casefold(), expected.casefold()
    elif isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        a, e = actual, expected
    else:
        a, e = str(actual), str(expected)
        if not case_exact:
            a, e = a.casefold(), e.casefold()
    if op == "eq":
        return a == e
    if op == "ne":
        return a != e
    if op == "co":
        return isinstance(a, str) and e in a
    if op == "sw":
        return isinstance(a, str) and a.startswith(e)
    if op == "ew":
        return isinstance(a, str) and a.endswith(e)
    try:
        return {"gt": a > e, "ge": a >= e, "lt": a < e, "le": a <= e}[op]
    except TypeError:
        return False


def _present(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, (str, list, dict)):
        return len(v) > 0
    return True


def _get(obj: Any, name: str) -> Any:
    """A member of a JSON object, the name matched case-insensitively."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    low = name.casefold()
    for k, v in obj.items():
        if k.casefold() == low:
            return v
    return None


def evaluate(node: Node, obj: dict, case_exact: Callable[[AttrPath], bool] = lambda a: False) -> bool:
    """Whether the JSON object ``obj`` (a resource, or one value of a
    multi-valued attribute) matches ``node``. ``case_exact`` says how a
    path's strings compare."""
    if isinstance(node, And):
        return evaluate(node.left, obj, case_exact) and evaluate(node.right, obj, case_exact)
    if isinstance(node, Or):
        return evaluate(node.left, obj, case_exact) or evaluate(node.right, obj, case_exact)
    if isinstance(node, Not):
        return not evaluate(node.expr, obj, case_exact)
    if isinstance(node, Match):
        values = _resolve(obj, node.attr)
        if isinstance(values, dict):
            values = [values]
        if not isinstance(values, list):
            return False
        return any(isinstance(v, dict) and evaluate(node.filter, v, case_exact) for v in values)
    value = _resolve(obj, node.attr)
    if isinstance(node, Present):
        return _present(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        # a comparison on a multi-valued complex attribute is on its "value"
        value = [_get(v, "value") for v in value]
    elif isinstance(value, dict) and node.attr.sub is None:
        value = _get(value, "value")
    return compare(value, node.op, node.value, case_exact(node.attr))


def _resolve(obj: dict, attr: AttrPath) -> Any:
    base = obj
    if attr.uri:
        base = _get(obj, attr.uri)
    value = _get(base, attr.name)
    if attr.sub is None:
        return value
    if isinstance(value, list):
        return [_get(v, attr.sub) for v in value if isinstance(v, dict)]
    return _get(value, attr.sub)
