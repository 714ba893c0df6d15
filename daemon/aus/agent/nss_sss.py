"""SSSD's NSS module asked directly, for its status as well as its answer.

glibc's ``getgrouplist()`` hides why a module gave no groups: with SSSD
down (and its initgroups fast cache off or expired) it silently returns the
primary group only. ``libnss_sss.so.2`` itself says SUCCESS, NOTFOUND,
UNAVAIL or TRYAGAIN, which tells "the directory says these groups" from
"the directory cannot answer". Only the calls ausd needs are bound.
"""

from __future__ import annotations

import ctypes
import errno
from typing import NamedTuple

# enum nss_status (glibc nss.h)
TRYAGAIN, UNAVAIL, NOTFOUND, SUCCESS = -2, -1, 0, 1
STATUS_NAMES = {TRYAGAIN: "TRYAGAIN", UNAVAIL: "UNAVAIL", NOTFOUND: "NOTFOUND",
                SUCCESS: "SUCCESS"}
LIBRARY = "libnss_sss.so.2"
MAX_BUFFER = 1 << 24   # a group's member list larger than 16 MiB is not waited for


class _Passwd(ctypes.Structure):
    _fields_ = [("pw_name", ctypes.c_char_p), ("pw_passwd", ctypes.c_char_p),
                ("pw_uid", ctypes.c_uint32), ("pw_gid", ctypes.c_uint32),
                ("pw_gecos", ctypes.c_char_p), ("pw_dir", ctypes.c_char_p),
                ("pw_shell", ctypes.c_char_p)]


class _Group(ctypes.Structure):
    _fields_ = [("gr_name", ctypes.c_char_p), ("gr_passwd", ctypes.c_char_p),
                ("gr_gid", ctypes.c_uint32), ("gr_mem", ctypes.POINTER(ctypes.c_char_p))]


class Reply(NamedTuple):
    status: int
    value: object          # what SUCCESS carries, else None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    @property
    def unavailable(self) -> bool:
        return self.status in (UNAVAIL, TRYAGAIN)

    def __str__(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))


class SssNss:
    """The sss NSS module, or ``None`` from :func:`load` where it is not
    installed (then every user takes glibc's ordinary path)."""

    def __init__(self, lib: ctypes.CDLL):
        self._libc = ctypes.CDLL(None)
        self._libc.malloc.restype = ctypes.c_void_p
        self._libc.malloc.argtypes = [ctypes.c_size_t]
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._pw = lib._nss_sss_getpwuid_r
        self._pw.restype = ctypes.c_int
        self._pw.argtypes = [ctypes.c_uint32, ctypes.POINTER(_Passwd), ctypes.c_char_p,
                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
        self._gr = lib._nss_sss_getgrgid_r
        self._gr.restype = ctypes.c_int
        self._gr.argtypes = [ctypes.c_uint32, ctypes.POINTER(_Group), ctypes.c_char_p,
                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
        self._init = lib._nss_sss_initgroups_dyn
        self._init.restype = ctypes.c_int
        self._init.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_long),
                               ctypes.POINTER(ctypes.c_long),
                               ctypes.POINTER(ctypes.POINTER(ctypes.c_uint32)),
                               ctypes.c_long, ctypes.POINTER(ctypes.c_int)]

    def _with_buffer(self, call, struct, key):
        """Run a ``*_r`` call, growing its buffer while it reports ERANGE.
        The struct points into the buffer: both are returned, so that the
        buffer lives as long as the struct is read."""
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            out, err = struct(), ctypes.c_int(0)
            status = call(key, ctypes.byref(out), buf, size, ctypes.byref(err))
            if status == TRYAGAIN and err.value == errno.ERANGE and size < MAX_BUFFER:
                size *= 4
                continue
            return status, out, buf

    def user(self, uid: int) -> Reply:
        """(name, primary GID) of a UID SSSD serves."""
        status, pw, _buf = self._with_buffer(self._pw, _Passwd, uid)
        if status != SUCCESS:
            return Reply(status, None)
        return Reply(status, (pw.pw_name.decode(errors="replace"), pw.pw_gid))

    def group_name(self, gid: int) -> Reply:
        status, gr, _buf = self._with_buffer(self._gr, _Group, gid)
        if status != SUCCESS:
            return Reply(status, None)
        return Reply(status, gr.gr_name.decode(errors="replace"))

    def groups(self, name: str, primary_gid: int) -> Reply:
        """The GIDs SSSD gives ``name`` besides ``primary_gid``."""
        start, size = ctypes.c_long(0), ctypes.c_long(64)
        arr = self._libc.malloc(size.value * ctypes.sizeof(ctypes.c_uint32))
        if not arr:
            raise MemoryError("malloc for the group list")
        gids = ctypes.cast(arr, ctypes.POINTER(ctypes.c_uint32))
        err = ctypes.c_int(0)
        try:
            # the module reallocs the array when it needs more room
            status = self._init(name.encode(), primary_gid, ctypes.byref(start),
                                ctypes.byref(size), ctypes.byref(gids), 0, ctypes.byref(err))
            if status != SUCCESS:
                return Reply(status, None)
            return Reply(status, tuple(gids[i] for i in range(start.value)))
        finally:
            self._libc.free(ctypes.cast(gids, ctypes.c_void_p))


def load() -> SssNss | None:
    try:
        return SssNss(ctypes.CDLL(LIBRARY))
    except (OSError, AttributeError):
        return None
