"""Reading a BPF ring buffer by mmap, without bcc or libbpf.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours
to write), page 1 the producer position, and the data area follows,
mapped twice in a row so a record that wraps reads as one slice. Each
record starts with an 8-byte header: a 32-bit length whose top bits say
BUSY (still being written) or DISCARD, then the page offset. Records are
8-byte aligned. The map's fd is readable (epoll) while data is waiting.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Callable

from . import bpfsys

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBuffer:
    def __init__(self, path: str):
        self.fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.map_info(self.fd, path)
            self.size = info["max_entries"]
            page = mmap.PAGESIZE
            self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._prod = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        except BaseException:
            os.close(self.fd)
            raise
        self._data = page
        self._mask = self.size - 1

    def fileno(self) -> int:
        return self.fd

    def drain(self, handle: Callable[[bytes], None], limit: int = 100_000) -> int:
        """Hand every complete record to ``handle``; how many there were."""
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        n = 0
        while cons < prod and n < limit:
            at = self._data + (cons & self._mask)
            length, _ = struct.unpack_from("<II", self._prod, at)
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                handle(self._prod[at + _HDR: at + _HDR + size])
            cons += (size + _HDR + 7) & ~7
            struct.pack_into("<Q", self._cons, 0, cons)
            n += 1
            if cons >= prod:
                prod = struct.unpack_from("<Q", self._prod, 0)[0]
        return n

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
        os.close(self.fd)
