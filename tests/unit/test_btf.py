"""aus.agent.btf: offsets from the running kernel's BTF, and from synthetic blobs."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from aus.agent import btf
from aus.core.errors import ProbeError

VMLINUX = btf.DEFAULT_VMLINUX


# -- real kernel BTF, checked against bpftool ---------------------------------

needs_vmlinux = pytest.mark.skipif(not os.path.exists(VMLINUX), reason=f"{VMLINUX} absent")


@pytest.fixture(scope="module")
def bpftool_raw() -> str:
    tool = shutil.which("bpftool")
    if tool is None or not os.path.exists(VMLINUX):
        pytest.skip("bpftool or vmlinux BTF absent")
    return subprocess.run(
        [tool, "btf", "dump", "file", VMLINUX, "format", "raw"],
        check=True, capture_output=True, text=True,
    ).stdout


def bpftool_offset(raw: str, struct_name: str, member: str) -> int:
    """Byte offset of a direct member, read from `bpftool ... format raw`."""
    head = re.search(rf"^\[\d+\] STRUCT '{re.escape(struct_name)}' size=\d+ vlen=\d+\n", raw, re.M)
    assert head, f"bpftool shows no STRUCT {struct_name}"
    block = raw[head.end():].split("\n[", 1)[0]
    line = re.search(rf"^\s*'{re.escape(member)}' type_id=\d+ bits_offset=(\d+)$", block, re.M)
    assert line, f"bpftool shows no member {struct_name}.{member}"
    bits = int(line.group(1))
    assert bits % 8 == 0
    return bits // 8


@pytest.mark.parametrize("struct_name, member", [
    ("task_struct", "loginuid"),
    ("task_struct", "tgid"),
    ("task_struct", "comm"),
    ("sock", "sk_mark"),
])
def test_offsets_match_bpftool(bpftool_raw, struct_name, member):
    expected = bpftool_offset(bpftool_raw, struct_name, member)
    assert btf.member_offset(struct_name, member) == expected


@needs_vmlinux
def test_real_sizes():
    assert btf.member_size("task_struct", "loginuid") == 4
    assert btf.member_size("task_struct", "comm") == 16


@needs_vmlinux
def test_real_errors_name_struct_and_member():
    with pytest.raises(ProbeError, match=r"task_struct\.no_such_member.*vmlinux"):
        btf.member_offset("task_struct", "no_such_member")
    with pytest.raises(ProbeError, match=r"no_such_struct"):
        btf.member_offset("no_such_struct", "x")


# -- synthetic blobs -----------------------------------------------------------

INT, PTR, ARRAY, STRUCT, UNION, TYPEDEF, CONST = 1, 2, 3, 4, 5, 8, 10


class Builder:
    """Assembles a little-endian BTF blob; add_* return the new type ID."""

    def __init__(self):
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, name, kind, vlen, size_or_type, trailer=b"", kflag=0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + trailer
        self.count += 1
        return self.count

    def int(self, name, size):
        return self.add(name, INT, 0, size, struct.pack("<I", size * 8))

    def composite(self, kind, name, size, members, kflag=0):
        """members: (name, type_id, offset word) tuples."""
        trailer = b"".join(struct.pack("<III", self.s(n), t, o) for n, t, o in members)
        return self.add(name, kind, len(members), size, trailer, kflag)

    def blob(self, magic=0xEB9F) -> bytes:
        hdr = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


def synthetic() -> Builder:
    b = Builder()
    u32 = b.int("u32", 4)                                                 # 1
    char = b.int("char", 1)                                               # 2
    inner = b.composite(STRUCT, "", 8, [("pad", u32, 0), ("deep", u32, 32)])  # 3
    anon = b.composite(UNION, "", 8, [("alias", u32, 0), ("target", u32, 0), ("", inner, 0)])  # 4
    ptr = b.add("", PTR, 0, u32)                                          # 5
    arr = b.add("", ARRAY, 0, 0, struct.pack("<III", char, u32, 16))      # 6
    cptr = b.add("", CONST, 0, ptr)                                       # 7
    tdef = b.add("name_t", TYPEDEF, 0, arr)                               # 8
    b.composite(STRUCT, "outer", 40, [
        ("head", u32, 0),
        ("", anon, 64),
        ("p", cptr, 128),
        ("name", tdef, 192),
    ])                                                                    # 9
    b.composite(STRUCT, "flags", 4, [("whole", u32, 0), ("bit", u32, (3 << 24) | 32)], kflag=1)
    return b


@pytest.fixture
def blob_path(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(synthetic().blob())
    return str(path)


def test_anonymous_members_add_offsets(blob_path):
    assert btf.member_offset("outer", "head", blob_path) == 0
    assert btf.member_offset("outer", "target", blob_path) == 8
    assert btf.member_offset("outer", "deep", blob_path) == 8 + 4
    assert btf.member_offset("outer", "name", blob_path) == 24
    assert btf.member_offset("flags", "whole", blob_path) == 0


def test_sizes_resolve_modifiers(blob_path):
    assert btf.member_size("outer", "target", blob_path) == 4
    assert btf.member_size("outer", "p", blob_path) == 8
    assert btf.member_size("outer", "name", blob_path) == 16


@pytest.mark.parametrize("struct_name, member, pattern", [
    ("missing", "target", r"missing\.target.*no struct 'missing'"),
    ("outer", "missing", r"outer\.missing.*no member 'missing'"),
    ("flags", "bit", r"flags\.bit.*bitfield"),
    ("name_t", "x", r"no struct 'name_t'"),  # a typedef is not a struct
])
def test_lookup_errors(blob_path, struct_name, member, pattern):
    with pytest.raises(ProbeError, match=pattern) as info:
        btf.member_offset(struct_name, member, blob_path)
    assert blob_path in str(info.value)


def test_truncated_file(tmp_path):
    data = synthetic().blob()
    for cut in (10, 24 + 20, len(data) - 5):
        path = tmp_path / f"cut{cut}"
        path.write_bytes(data[:cut])
        with pytest.raises(ProbeError, match=rf"outer\.target.*{re.escape(str(path))}"):
            btf.member_offset("outer", "target", str(path))


def test_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(synthetic().blob(magic=0x1234))
    with pytest.raises(ProbeError, match=r"outer\.target.*bad magic"):
        btf.member_offset("outer", "target", str(path))


def test_unknown_kind(tmp_path):
    b = synthetic()
    b.add("odd", 25, 0, 0)
    path = tmp_path / "odd"
    path.write_bytes(b.blob())
    with pytest.raises(ProbeError, match=r"unknown kind 25"):
        btf.member_offset("outer", "target", str(path))


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent")
    with pytest.raises(ProbeError, match=rf"task_struct\.loginuid.*{re.escape(path)}"):
        btf.member_offset("task_struct", "loginuid", path)
