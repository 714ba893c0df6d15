"""The bpf(2) system call, for pinned maps and cgroup links.

bcc compiles and loads the programs; everything after that (map reads and
writes, pins, links) goes through these few wrappers so that ausctl can
read the pinned maps without a compiler and every failure becomes a
:class:`~aus.core.errors.BpfError` naming the object and errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from functools import lru_cache
from typing import Iterator

from ..core.errors import BpfError, ProbeError

# bpf(2)'s number in each architecture's syscall table, by platform.machine()
# (arch/x86/entry/syscalls/syscall_64.tbl; aarch64 uses the generic table,
# include/uapi/asm-generic/unistd.h).
BPF_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_ENABLE_STATS = 32
BPF_LINK_DETACH = 34
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_REPLACE = 1 << 2
# A kernel or map type without batch operations answers one of these.
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)   # 524: ENOTSUPP

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf_syscall_number(machine: str | None = None) -> int:
    """bpf(2)'s number on ``machine`` (default: this one's); ProbeError
    for an architecture not in BPF_SYSCALL_NUMBERS."""
    machine = platform.machine() if machine is None else machine
    try:
        return BPF_SYSCALL_NUMBERS[machine]
    except KeyError:
        known = ", ".join(sorted(BPF_SYSCALL_NUMBERS))
        raise ProbeError(f"the bpf(2) system call number of architecture {machine!r} is "
                         f"not known to aus (known: {known}); this machine is not "
                         "supported") from None


@lru_cache(maxsize=1)
def _nr_bpf() -> int:
    return bpf_syscall_number()


def _bpf(cmd: int, attr: ctypes.Array, op: str, obj: str,
         ok_errnos: tuple[int, ...] = ()) -> int:
    ret = _libc.syscall(_nr_bpf(), cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err in ok_errnos:
            return -err
        raise BpfError(op, obj, err)
    return ret


def _attr() -> ctypes.Array:
    return (ctypes.c_uint8 * 128)()


def _put(attr, fmt: str, offset: int, *values) -> None:
    struct.pack_into(fmt, attr, offset, *values)


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def obj_get(path: str) -> int:
    attr = _attr()
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    _put(attr, "Q", 0, ctypes.addressof(cpath))
    return _bpf(BPF_OBJ_GET, attr, "open pinned", path)


def obj_pin(fd: int, path: str) -> None:
    attr = _attr()
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    _put(attr, "QI", 0, ctypes.addressof(cpath), fd)
    _bpf(BPF_OBJ_PIN, attr, "pin", path)


def _info(fd: int, what: str) -> bytes:
    buf = (ctypes.c_uint8 * 256)()
    attr = _attr()
    _put(attr, "IIQ", 0, fd, ctypes.sizeof(buf), ctypes.addressof(buf))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "get info of", what)
    return bytes(buf)


def map_info(fd: int, what: str = "map") -> dict:
    raw = _info(fd, what)
    mtype, mid, ksize, vsize, maxent, flags = struct.unpack_from("6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return {"type": mtype, "id": mid, "key_size": ksize, "value_size": vsize,
            "max_entries": maxent, "flags": flags, "name": name}


def prog_info(fd: int, what: str = "program") -> dict:
    raw = _info(fd, what)
    ptype, pid = struct.unpack_from("II", raw, 0)
    tag = raw[8:16].hex()
    name = raw[64:80].split(b"\0", 1)[0].decode()
    # run_time_ns and run_cnt follow the name (kernel.bpf_stats_enabled).
    run_time_ns, run_cnt = struct.unpack_from("QQ", raw, 192)
    return {"type": ptype, "id": pid, "tag": tag, "name": name,
            "run_time_ns": run_time_ns, "run_cnt": run_cnt}


def link_info(fd: int, what: str = "link") -> dict:
    raw = _info(fd, what)
    ltype, lid, prog_id = struct.unpack_from("III", raw, 0)
    cgroup_id, attach_type = struct.unpack_from("QI", raw, 16)
    return {"type": ltype, "id": lid, "prog_id": prog_id,
            "cgroup_id": cgroup_id, "attach_type": attach_type}


def link_create(prog_fd: int, cgroup_fd: int, attach_type: int, what: str) -> int:
    attr = _attr()
    _put(attr, "IIII", 0, prog_fd, cgroup_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr, "attach", what)


def link_update(link_fd: int, new_prog_fd: int, what: str) -> None:
    """Swap the program behind a link in one step: no packet goes unjudged."""
    attr = _attr()
    _put(attr, "IIII", 0, link_fd, new_prog_fd, 0, 0)
    _bpf(BPF_LINK_UPDATE, attr, "replace program of", what)


def link_detach(link_fd: int, what: str) -> None:
    attr = _attr()
    _put(attr, "I", 0, link_fd)
    _bpf(BPF_LINK_DETACH, attr, "detach", what, ok_errnos=(errno.ENOLINK,))


def enable_stats() -> int:
    """Turn on run_time_ns/run_cnt accounting while the returned fd is open."""
    attr = _attr()
    _put(attr, "I", 0, 0)  # BPF_STATS_RUN_TIME
    return _bpf(BPF_ENABLE_STATS, attr, "enable", "bpf stats")


class Map:
    """A map reached by fd, with ctypes key and value types from contract.

    Per-CPU maps are read as a list of values, one per possible CPU, and
    written with the same value on every CPU.
    """

    def __init__(self, fd: int, name: str, key_type, value_type, percpu=False):
        self.fd = fd
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        vsize = ctypes.sizeof(value_type)
        self._stride = (vsize + 7) // 8 * 8
        self._ncpu = possible_cpus() if percpu else 1
        self._vbuf_size = self._stride * self._ncpu if percpu else vsize
        self._no_batch = False

    @classmethod
    def open(cls, path: str, key_type, value_type, percpu=False) -> "Map":
        fd = obj_get(path)
        m = cls(fd, os.path.basename(path), key_type, value_type, percpu)
        info = map_info(fd, path)
        ksize = ctypes.sizeof(key_type) if key_type is not None else 0
        vsize = ctypes.sizeof(value_type) if value_type is not None else 0
        if (info["key_size"], info["value_size"]) != (ksize, vsize):
            m.close()
            raise BpfError("open pinned", path, errno.EPROTO,
                           f"key/value sizes {info['key_size']}/{info['value_size']}"
                           f" differ from this version's {ksize}/{vsize}")
        m.max_entries = info["max_entries"]
        return m

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, cmd, key, value_buf, flags, op, ok=()):
        attr = _attr()
        _put(attr, "IIQQQ", 0, self.fd, 0, _addr(key), _addr(value_buf), flags)
        return _bpf(cmd, attr, op, self.name, ok)

    def lookup(self, key):
        buf = (ctypes.c_uint8 * self._vbuf_size)()
        if self._elem(BPF_MAP_LOOKUP_ELEM, key, buf, 0, "lookup in",
                      (errno.ENOENT,)) < 0:
            return None
        return self._decode(buf)

    def _decode(self, buf):
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf)
        return [self.value_type.from_buffer_copy(buf, i * self._stride)
                for i in range(self._ncpu)]

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if self.percpu:
            buf = (ctypes.c_uint8 * self._vbuf_size)()
            raw = bytes(value)
            for i in range(self._ncpu):
                ctypes.memmove(ctypes.addressof(buf) + i * self._stride, raw, len(raw))
            value = buf
        self._elem(BPF_MAP_UPDATE_ELEM, key, value, flags, "update")

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        """Write ``count`` entries in one system call: ``keys`` and
        ``values`` hold them packed back to back (BPF_MAP_UPDATE_BATCH, the
        kernel's loop instead of one call per entry). Where the kernel has
        no batch update for this map, one update per entry does the same."""
        if count <= 0:
            return
        ksize, vsize = len(keys) // count, len(values) // count
        if ksize * count != len(keys) or vsize * count != len(values):
            raise ValueError(f"update_batch: {len(keys)}/{len(values)} bytes of keys/values "
                             f"are not {count} entries")
        kbuf = (ctypes.c_uint8 * len(keys)).from_buffer_copy(keys)
        vbuf = (ctypes.c_uint8 * len(values)).from_buffer_copy(values)
        if not self.percpu and not self._no_batch:
            attr = _attr()
            _put(attr, "QQQQIIQQ", 0, 0, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf),
                 count, self.fd, BPF_ANY, 0)
            if _bpf(BPF_MAP_UPDATE_BATCH, attr, "update", self.name, _NO_BATCH) >= 0:
                return
            # Nothing was written when the command itself is refused.
            self._no_batch = True
        for i in range(count):
            key = (ctypes.c_uint8 * ksize).from_buffer(kbuf, i * ksize)
            value = self.value_type.from_buffer(vbuf, i * vsize)
            self.update(key, value)

    def delete_batch(self, keys: bytes, count: int) -> None:
        """Remove ``count`` keys packed back to back in one system call
        (BPF_MAP_DELETE_BATCH). A key that is not there stops the kernel's
        loop, so then, as on a kernel without it, the keys are deleted one
        by one, absent ones passing (deleting is idempotent)."""
        if count <= 0:
            return
        ksize = len(keys) // count
        if ksize * count != len(keys):
            raise ValueError(f"delete_batch: {len(keys)} bytes of keys are not {count} keys")
        kbuf = (ctypes.c_uint8 * len(keys)).from_buffer_copy(keys)
        if not self._no_batch:
            attr = _attr()
            _put(attr, "QQQQIIQQ", 0, 0, 0, ctypes.addressof(kbuf), 0, count, self.fd, 0, 0)
            if _bpf(BPF_MAP_DELETE_BATCH, attr, "delete from", self.name,
                    _NO_BATCH + (errno.ENOENT,)) >= 0:
                return
        for i in range(count):
            self.delete((ctypes.c_uint8 * ksize).from_buffer(kbuf, i * ksize))

    def delete(self, key) -> bool:
        """Remove key; False when it was not there (deleting is idempotent)."""
        return self._elem(BPF_MAP_DELETE_ELEM, key, None, 0, "delete from",
                          (errno.ENOENT,)) >= 0

    def keys(self) -> Iterator:
        key = None
        while True:
            nxt = self.key_type()
            attr = _attr()
            _put(attr, "IIQQ", 0, self.fd, 0, _addr(key), ctypes.addressof(nxt))
            if _bpf(BPF_MAP_GET_NEXT_KEY, attr, "iterate", self.name,
                    (errno.ENOENT,)) < 0:
                return
            yield nxt
            key = nxt

    def items(self) -> Iterator:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
