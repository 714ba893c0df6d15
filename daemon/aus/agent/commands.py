"""The control commands ausd accepts, and the validation of a request.

A request is one line of JSON: an object with a ``cmd`` string and the
command's fields, nothing else. Every field has a type and a range; a
bool is not an int, numbers are finite and bounded, and an unknown
command or field is refused. :func:`parse` turns any line a local user
can send into a :class:`Request` or a :class:`RequestError` that says
what was wrong and where; nothing it is given makes it raise anything
else. :func:`run` calls a handler so that whatever it raises becomes an
error reply and a log line: a request never ends the daemon.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core import contract as C
from ..core import explain
from ..core.errors import AusError
from ..core.flowrecord import VERDICTS
from .flowrecords import parse_network

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024     # bytes of one request line
MAX_FLOWS = 10_000          # flow events one request may ask for
MAX_INT_DIGITS = 20         # an int literal longer than this is refused unparsed


class RequestError(ValueError):
    """A request ausd refuses; the text goes back to the caller as is."""


@dataclass(frozen=True)
class Field:
    """One field of a command: its type, its range, its default."""
    kind: type                 # int, bool or str
    default: Any = None        # None: absent means "not given"
    low: int | None = None     # ints: inclusive bounds
    high: int | None = None
    max_len: int = 256         # strings: at most this many characters
    choices: tuple[str, ...] = ()                  # strings: one of these, if given
    valid: Callable[[str], Any] | None = None      # strings: raises ValueError if bad

    def check(self, cmd: str, name: str, value: Any) -> Any:
        where = f"{cmd}: field {name!r}"
        if self.kind is bool:
            if type(value) is not bool:
                raise RequestError(f"{where} must be true or false, not {_shown(value)}")
            return value
        if self.kind is int:
            if type(value) is not int:   # bool is an int to Python, not here
                raise RequestError(f"{where} must be an integer, not {_shown(value)}")
            if not self.low <= value <= self.high:
                raise RequestError(f"{where} must be {self.low}..{self.high}, not {value}")
            return value
        if type(value) is not str:
            raise RequestError(f"{where} must be a string, not {_shown(value)}")
        if len(value) > self.max_len:
            raise RequestError(f"{where} is longer than {self.max_len} characters")
        if self.choices and value not in self.choices:
            raise RequestError(f"{where} must be one of {', '.join(self.choices)}, "
                               f"not {_shown(value)}")
        if self.valid is not None:
            try:
                self.valid(value)
            except ValueError as exc:
                raise RequestError(f"{where}: {exc}") from None
        return value


@dataclass(frozen=True)
class Spec:
    """A command: its fields and whether only root may send it (the peer
    is judged by SO_PEERCRED)."""
    fields: Mapping[str, Field] = field(default_factory=dict)
    root_only: bool = False
    root_because: str = "change ausd"   # "only root may ..." when refused


# The one table of what a request may say.
COMMANDS: dict[str, Spec] = {
    "status": Spec(),
    "users": Spec(),
    "rules": Spec({"login_uid": Field(int, low=0, high=C.LOGINUID_UNSET - 1)}),
    "flows": Spec({"limit": Field(int, default=100, low=0, high=MAX_FLOWS),
                   "follow": Field(bool, default=False),
                   # filters (flowrecords.Filter); "since" is a Unix time
                   "user": Field(str, max_len=256),
                   "verdict": Field(str, choices=VERDICTS),
                   "to": Field(str, max_len=64, valid=parse_network),
                   "port": Field(int, low=0, high=65535),
                   "since": Field(int, low=0, high=1 << 40),
                   # the aggregated records instead of the events
                   "records": Field(bool, default=False)}),
    "reload": Spec(root_only=True),
    # what the policy in force decides for a user (logged in or not) or
    # for groups; root only: it shows any user's rules
    "explain": Spec({"user": Field(str, max_len=256), "groups": Field(str, max_len=4096),
                     "to": Field(str, max_len=300, valid=explain.parse_target),
                     "proto": Field(str, choices=("tcp", "udp", "icmp")),
                     "port": Field(int, default=0, low=0, high=65535)},
                    root_only=True, root_because="see what another user's rules allow"),
    "session_open": Spec(root_only=True),
    "session_close": Spec(root_only=True),
}


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]       # every field of the command; None: not given
    spec: Spec


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    kind = {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "integer", float: "number", type(None): "null"}[type(value)]
    return f"{kind} {text[:40]}{'...' if len(text) > 40 else ''}"


def _no_constant(name: str):
    raise RequestError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"an integer of {len(text)} digits is out of range")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"{text[:40]} is out of range")
    return value


def decode(line: bytes) -> dict:
    """The JSON object of one request line."""
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request larger than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not UTF-8 (byte {exc.start})") from exc
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int,
                         parse_float=_finite_float)
    except RequestError as exc:
        raise RequestError(f"bad request: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RequestError(f"bad request: not JSON: {exc.msg} at character {exc.pos}") from exc
    except RecursionError as exc:
        raise RequestError("bad request: nested too deeply") from exc
    if not isinstance(obj, dict):
        raise RequestError(f'a request is a JSON object with a "cmd" string, not {_shown(obj)}')
    return obj


def parse(line: bytes) -> Request:
    """A validated request, or RequestError saying what is wrong."""
    obj = decode(line)
    cmd = obj.get("cmd")
    if type(cmd) is not str:
        raise RequestError('a request is a JSON object with a "cmd" string')
    spec = COMMANDS.get(cmd)
    if spec is None:
        raise RequestError(f"unknown command {cmd[:64]!r} (known: {', '.join(COMMANDS)})")
    unknown = [k for k in obj if k != "cmd" and k not in spec.fields]
    if unknown:
        raise RequestError(f"{cmd}: unknown field {unknown[0][:64]!r}"
                           + (f" (known: {', '.join(spec.fields)})" if spec.fields else
                              " (it takes none)"))
    args = {name: f.check(cmd, name, obj[name]) if name in obj else f.default
            for name, f in spec.fields.items()}
    return Request(cmd, args, spec)


def error(text: str) -> dict:
    return {"ok": False, "error": text}


def run(handler: Callable[[], dict], what: str) -> dict:
    """The handler's reply; whatever it raises becomes an error reply (and
    a log line with the traceback when it was not one of ours)."""
    try:
        reply = handler()
    except RequestError as exc:
        return error(str(exc))
    except AusError as exc:
        log.warning("%s: %s", what, exc)
        return error(str(exc))
    except Exception as exc:  # a bug must cost one reply, never the daemon
        log.exception("%s failed", what)
        return error(f"{what}: internal error ({type(exc).__name__}); see ausd's log")
    if not isinstance(reply, dict):
        log.error("%s: handler returned %r", what, type(reply).__name__)
        return error(f"{what}: internal error; see ausd's log")
    return reply
