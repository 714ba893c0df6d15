"""DNS-name destinations of the policy: ``dns:NAME`` and ``dns:*.SUFFIX``. Pure.

``dns:github.com`` matches that name only; ``dns:*.githubusercontent.com``
matches every name ending in ``.githubusercontent.com``, at any depth, but
not ``githubusercontent.com`` itself (list it too for that). Names compare
case-insensitively; Unicode names are kept as IDNA A-labels (``xn--...``,
the form DNS answers carry); one trailing dot is dropped.

A rule never allows a name as such: the addresses a DNS answer gives for a
matching name are allowed, for the rule's services, until the answer
expires (see docs/dns.md).
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
from functools import lru_cache
from typing import NamedTuple

PREFIX = "dns:"
NAME_MAX = 253           # RFC 1035: a name's text, without the trailing dot
LABEL_MAX = 63
_LDH_RE = re.compile(r"[a-z0-9-]+\Z")
# Full stops IDNA takes as label separators (RFC 3490, 3.1).
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


class DnsPattern(NamedTuple):
    """A name destination: ``name`` is the A-label name (for a wildcard,
    the suffix without ``*.``)."""
    name: str
    wildcard: bool

    def matches(self, qname: str) -> bool:
        """Whether a queried name (any case, trailing dot or not) is this
        name, or for a wildcard lies under it."""
        q = normalize_qname(qname)
        if not self.wildcard:
            return q == self.name
        return len(q) > len(self.name) + 1 and q.endswith("." + self.name)

    def __str__(self) -> str:
        return f"{PREFIX}*.{self.name}" if self.wildcard else PREFIX + self.name


def normalize_qname(qname: str) -> str:
    """A queried name as patterns compare it: lower case, no trailing dot."""
    q = qname.lower()
    return q[:-1] if q.endswith(".") else q


def is_dns_destination(text: object) -> bool:
    """Whether a destination entry is meant as a name (``dns:`` in any case)."""
    return isinstance(text, str) and text.lstrip()[:len(PREFIX)].lower() == PREFIX


def parse_dns_destination(text: str) -> DnsPattern:
    """``dns:NAME`` or ``dns:*.SUFFIX`` -> its pattern. Raises ValueError
    with a message that says what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"a destination must be a string, not {type(text).__name__}")
    return _parse(text)


@lru_cache(maxsize=65536)
def _parse(text: str) -> DnsPattern:
    if not is_dns_destination(text):
        raise ValueError(f"{text!r} is not a DNS name destination; write dns:NAME or dns:*.SUFFIX")
    raw = text.strip()[len(PREFIX):].strip().translate(_DOTS)
    if not raw:
        raise ValueError(f"{text!r} names no DNS name; write dns:NAME or dns:*.SUFFIX")
    try:
        ipaddress.ip_network(raw, strict=False)
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r} is an address, not a name: write {raw} without dns:")
    name = raw[:-1] if raw.endswith(".") else raw
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if "*" in name:
        raise ValueError(f"{text!r}: '*' is allowed only as the whole first label "
                         "(dns:*.example.com)")
    labels = name.split(".")
    if any(not label for label in labels):
        raise ValueError(f"{text!r} has an empty label (two dots in a row, or a leading dot)")
    ascii_labels = [_label(text, label) for label in labels]
    if ascii_labels[-1].isdigit():
        raise ValueError(f"{text!r}: the last label {ascii_labels[-1]!r} is all digits, "
                         "which no DNS name has; write an address or a CIDR without dns:")
    name = ".".join(ascii_labels)
    length = len(name) + (2 if wildcard else 0)
    if length > NAME_MAX:
        raise ValueError(f"{text!r} is {length} characters long as a DNS name; "
                         f"at most {NAME_MAX} are allowed")
    if wildcard and len(ascii_labels) < 2:
        raise ValueError(f"{text!r} would match every name under the top-level domain "
                         f"{name!r}; a wildcard needs at least two labels after '*.' "
                         "(dns:*.example.com)")
    return DnsPattern(name, wildcard)


def _label(text: str, label: str) -> str:
    """One label as its lower-case A-label, checked."""
    if label.isascii():
        out = label.lower()
    else:
        try:
            out = encodings.idna.ToASCII(label).decode("ascii").lower()
        except UnicodeError as exc:
            raise ValueError(f"{text!r}: the label {label!r} is not a valid "
                             f"internationalized name ({exc})") from None
    if len(out) > LABEL_MAX:
        raise ValueError(f"{text!r}: the label {out[:20]!r}... is {len(out)} characters long; "
                         f"at most {LABEL_MAX} are allowed")
    if not _LDH_RE.match(out):
        bad = sorted({c for c in out if not _LDH_RE.match(c)})
        raise ValueError(f"{text!r}: the label {label!r} contains {''.join(bad)!r}; "
                         "a label holds letters, digits and hyphens only")
    if out.startswith("-") or out.endswith("-"):
        raise ValueError(f"{text!r}: the label {label!r} starts or ends with a hyphen")
    if out.startswith("xn--"):
        try:
            back = encodings.idna.ToASCII(encodings.idna.ToUnicode(out)).decode("ascii")
        except UnicodeError:
            back = None
        if back != out:
            raise ValueError(f"{text!r}: the label {label!r} is not a valid IDNA A-label")
    return out
