"""Member offsets and sizes read from the running kernel's BTF.

Why this exists: bcc compiles our eBPF programs against the Debian 6.1
kernel headers, whose ``struct task_struct`` (and friends) lay out
differently from the kernel actually running. An offset taken from those
headers reads the wrong bytes. Kernel-internal offsets such as
``task_struct.loginuid`` must therefore come from the running kernel's own
type information, ``/sys/kernel/btf/vmlinux``, and be handed to the programs
as constants.

This is a small, dependency-free reader of that blob (format: the kernel's
Documentation/bpf/btf.rst). It understands base BTF only (IDs from 1), not
the split BTF of modules. The file is parsed once per path and cached.
"""

from __future__ import annotations

import functools
import os
import struct as _struct

from ..core.errors import ProbeError

DEFAULT_VMLINUX = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
_HDR = "HBBIIIII"  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len

# BTF_KIND_*: (kind -> (fixed trailing bytes, trailing bytes per vlen item))
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM = 1, 2, 3, 4, 5, 6
_TYPEDEF, _VOLATILE, _CONST, _RESTRICT = 8, 9, 10, 11
_FLOAT, _TYPE_TAG, _ENUM64 = 16, 18, 19
_TRAILER = {
    1: (4, 0),    # INT: encoding word
    2: (0, 0),    # PTR
    3: (12, 0),   # ARRAY: type, index_type, nelems
    4: (0, 12),   # STRUCT: members (name_off, type, offset)
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM: (name_off, val)
    7: (0, 0),    # FWD
    8: (0, 0),    # TYPEDEF
    9: (0, 0),    # VOLATILE
    10: (0, 0),   # CONST
    11: (0, 0),   # RESTRICT
    12: (0, 0),   # FUNC
    13: (0, 8),   # FUNC_PROTO: params (name_off, type)
    14: (4, 0),   # VAR: linkage
    15: (0, 12),  # DATASEC: (type, offset, size)
    16: (0, 0),   # FLOAT
    17: (4, 0),   # DECL_TAG: component_idx
    18: (0, 0),   # TYPE_TAG
    19: (0, 12),  # ENUM64: (name_off, val_lo32, val_hi32)
}
_SKIP = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)
_MAX_DEPTH = 64  # bounds typedef chains and anonymous nesting in a bad blob


class _Malformed(Exception):
    """Internal: the blob is not valid BTF; the reason is the message."""


class _Btf:
    """Parsed index: per type ID (info, size_or_type, trailer position)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise _Malformed("file shorter than the BTF header")
        if data[:2] == b"\x9f\xeb":
            self.e = "<"
        elif data[:2] == b"\xeb\x9f":
            self.e = ">"
        else:
            raise _Malformed(f"bad magic 0x{data[0]:02x}{data[1]:02x}")
        _, _, _, hdr_len, t_off, t_len, s_off, s_len = _struct.unpack_from(self.e + _HDR, data)
        t_start, s_start = hdr_len + t_off, hdr_len + s_off
        if hdr_len < 24 or t_start + t_len > len(data) or s_start + s_len > len(data):
            raise _Malformed("header sections run past the end of the file")
        self.data = memoryview(data)
        self.strings = bytes(self.data[s_start:s_start + s_len])
        self.types: list[tuple[int, int, int]] = [(0, 0, 0)]  # ID 0 is void
        self.structs: dict[str, int] = {}
        unpack = _struct.Struct(self.e + "III").unpack_from
        pos, end = t_start, t_start + t_len
        types, structs, trailer = self.types, self.structs, _TRAILER
        while pos < end:
            if pos + 12 > end:
                raise _Malformed(f"type record at byte {pos} is truncated")
            name_off, info, size_or_type = unpack(self.data, pos)
            kind = (info >> 24) & 0x1F
            try:
                fixed, per = trailer[kind]
            except KeyError:
                raise _Malformed(f"unknown kind {kind} for type {len(types)}") from None
            types.append((info, size_or_type, pos + 12))
            if kind == _STRUCT and name_off:
                structs.setdefault(self.name(name_off), len(types) - 1)
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise _Malformed("type section is truncated")

    def name(self, off: int) -> str:
        stop = self.strings.find(b"\0", off)
        if off >= len(self.strings) or stop < 0:
            raise _Malformed(f"name offset {off} is outside the string section")
        return self.strings[off:stop].decode("utf-8", "replace")

    def get(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type, trailer position) of a type."""
        if not 0 < tid < len(self.types):
            raise _Malformed(f"type ID {tid} is out of range")
        info, sot, pos = self.types[tid]
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, sot, pos

    def strip(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the real type."""
        for _ in range(_MAX_DEPTH):
            kind, _, _, sot, _ = self.get(tid)
            if kind not in _SKIP:
                return tid
            tid = sot
        raise _Malformed(f"type chain at type {tid} is too deep")

    def find(self, tid: int, member: str, depth: int = 0):
        """(bit offset, bitfield size or 0, member type) of `member`, or None."""
        if depth > _MAX_DEPTH:
            raise _Malformed("anonymous members nest too deep")
        _, vlen, kflag, _, pos = self.get(tid)
        for i in range(vlen):
            name_off, mtype, off = _struct.unpack_from(self.e + "III", self.data, pos + 12 * i)
            bits, bsize = (off & 0xFFFFFF, off >> 24) if kflag else (off, 0)
            if name_off and self.name(name_off) == member:
                return bits, bsize, mtype
            if not name_off:
                inner = self.strip(mtype)
                if self.get(inner)[0] in (_STRUCT, _UNION):
                    hit = self.find(inner, member, depth + 1)
                    if hit:
                        return bits + hit[0], hit[1], hit[2]
        return None

    def size(self, tid: int) -> int:
        kind, _, _, sot, pos = self.get(self.strip(tid))
        if kind in (_STRUCT, _UNION, _INT, _ENUM, _ENUM64, _FLOAT):
            return sot
        if kind == _PTR:
            return 8
        if kind == _ARRAY:
            elem, _, nelems = _struct.unpack_from(self.e + "III", self.data, pos)
            return self.size(elem) * nelems
        raise _Malformed(f"type kind {kind} has no size")

    def int_bitfield(self, tid: int) -> bool:
        """Old-style bitfield: an INT member whose encoding narrows it."""
        kind, _, _, size, pos = self.get(self.strip(tid))
        if kind != _INT:
            return False
        (enc,) = _struct.unpack_from(self.e + "I", self.data, pos)
        return (enc >> 16) & 0xFF != 0 or enc & 0xFF != size * 8


@functools.lru_cache(maxsize=8)
def _load(path: str) -> _Btf:
    with open(path, "rb") as f:
        return _Btf(f.read())


def _member(struct: str, member: str, path) -> tuple[_Btf, int, int]:
    """(index, byte offset, member type ID); every failure is a ProbeError."""
    path = os.fspath(path)
    what = f"{struct}.{member}"
    try:
        btf = _load(path)
        tid = btf.structs.get(struct)
        if tid is None:
            raise ProbeError(f"Cannot find {what} in {path}: there is no struct {struct!r}.")
        hit = btf.find(tid, member)
        if hit is None:
            raise ProbeError(
                f"Cannot find {what} in {path}: struct {struct} has no member {member!r}.")
        bits, bsize, mtype = hit
        if bsize or bits % 8 or btf.int_bitfield(mtype):
            raise ProbeError(
                f"Cannot use {what} from {path}: it is a bitfield, not a byte-addressable member.")
        return btf, bits // 8, mtype
    except OSError as exc:
        raise ProbeError(f"Cannot read {what} from {path}: {exc.strerror or exc}.") from exc
    except _Malformed as exc:
        raise ProbeError(f"Cannot read {what} from {path}: malformed BTF ({exc}).") from exc


def member_offset(struct: str, member: str, path: str = DEFAULT_VMLINUX) -> int:
    """Byte offset of `member` inside `struct` (a STRUCT, not a typedef), following
    anonymous struct/union members recursively (offsets add up). Raises
    aus.core.errors.ProbeError with one sentence naming the struct/member and the file
    when the file is missing/unreadable/malformed or the member is not found, or
    when the member is a bitfield."""
    return _member(struct, member, path)[1]


def member_size(struct: str, member: str, path: str = DEFAULT_VMLINUX) -> int:
    """Size in bytes of that member's type (resolve typedef/const/volatile/restrict/type_tag; STRUCT/UNION/INT/ENUM/PTR(8)/ARRAY(elem*nelems))."""
    btf, _, mtype = _member(struct, member, path)
    try:
        return btf.size(mtype)
    except _Malformed as exc:
        raise ProbeError(
            f"Cannot size {struct}.{member} from {path}: malformed BTF ({exc}).") from exc
