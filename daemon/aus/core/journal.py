"""The systemd journal's native protocol: one datagram per entry, made of
``KEY=value`` lines (a value holding a newline goes in the binary form),
sent to the journal's socket. Used by the log setup (aus.logs.setup) and the
flow-record export (agent/flowlog.py)."""

from __future__ import annotations

from pathlib import Path

SOCKET = Path("/run/systemd/journal/socket")


def field(name: str, value: object) -> bytes:
    """One field of an entry; ``name`` is upper case, digits and _."""
    data = str(value).encode("utf-8", "replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    # The binary form: name, newline, 64-bit LE length, data.
    return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"


def entry(fields) -> bytes:
    """A datagram of (name, value) pairs."""
    return b"".join(field(k, v) for k, v in fields)


def parse(datagram: bytes) -> dict[str, str]:
    """The fields of a datagram (the inverse of :func:`entry`; tests and
    tools read what was sent with it)."""
    out, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode("utf-8", "replace")
            i = nl + 1
        else:
            size = int.from_bytes(datagram[nl + 1:nl + 9], "little")
            out[line.decode()] = datagram[nl + 9:nl + 9 + size].decode("utf-8", "replace")
            i = nl + 9 + size + 1
    return out
