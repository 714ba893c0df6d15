"""bpf/aus.h and its Python mirror (aus.core.contract) describe the same bytes.

Structs and enums are compared with the BTF that bcc produced when it
compiled the header (sizes, every field's name and offset, every enum
value); #define constants are compared with the header's text; the map
and program tables with what the kernel holds once ausd has loaded the
real programs.
"""

import ctypes
import dataclasses
import json
import os
import re
import subprocess

import pytest

from aus.agent import bpfsys, loader, pins
from aus.core import contract as C
from aus.core.errors import BpfError
from tests.support import lab

pytestmark = pytest.mark.kernel

HEADER = loader.default_bpf_dir() / "aus.h"
ENUMS = {"aus_reason": (C.Reason, "AUS_REASON_"), "aus_hook": (C.Hook, "AUS_HOOK_"),
         "aus_event_verdict": (C.EventVerdict, "AUS_EV_"), "aus_stat": (C.Stat, "AUS_STAT_")}


@pytest.fixture(scope="module")
def btf_types():
    """Compile the header with bcc into a program whose maps use every
    contract type, load it, and read its BTF back with bpftool."""
    from bcc import BPF

    decls = "\n".join(f"BPF_ARRAY(t_{i}, struct {name}, 1);"
                      for i, name in enumerate(C.STRUCTS))
    decls += "\n" + "\n".join(f"BPF_ARRAY(e_{i}, enum {name}, 1);" for i, name in enumerate(ENUMS))
    uses = "\n".join(f"t_{i}.lookup(&k);" for i in range(len(C.STRUCTS)))
    uses += "\n" + "\n".join(f"e_{i}.lookup(&k);" for i in range(len(ENUMS)))
    text = f'#include "aus.h"\n{decls}\nint probe(struct __sk_buff *skb) {{ u32 k = 0;\n{uses}\nreturn 1; }}\n'
    b = BPF(text=text.encode(), cflags=[f"-I{HEADER.parent}"])
    try:
        fn = b.load_func(b"probe", 8)  # BPF_PROG_TYPE_CGROUP_SKB
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id",
                                          str(_prog_id(fn.fd))], capture_output=True,
                                         text=True, check=True).stdout)
        dump = json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "id",
                                          str(info["btf_id"])], capture_output=True,
                                         text=True, check=True).stdout)
    finally:
        b.cleanup()
    return {t["name"]: t for t in dump["types"] if t.get("name")}


def _prog_id(fd):
    return bpfsys.prog_info(fd)["id"]


@pytest.mark.parametrize("name", sorted(C.STRUCTS))
def test_struct_layout_matches(btf_types, name):
    mirror = C.STRUCTS[name]
    t = btf_types[name]
    assert t["kind"] == "STRUCT"
    assert t["size"] == ctypes.sizeof(mirror), f"{name}: size"
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
    py_fields = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
    assert py_fields == c_fields


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values_match(btf_types, name):
    py_enum, prefix = ENUMS[name]
    t = btf_types[name]
    c_values = {v["name"].removeprefix(prefix): v["val"] for v in t["values"]}
    maxes = {k: v for k, v in c_values.items() if k == "MAX"}
    c_values = {k: v for k, v in c_values.items() if k != "MAX"}
    assert c_values == {m.name: m.value for m in py_enum}
    if maxes:
        const = {"aus_reason": C.REASON_MAX, "aus_hook": C.HOOK_MAX, "aus_stat": C.STAT_MAX}[name]
        assert maxes["MAX"] == const


def test_defines_match():
    text = HEADER.read_text()
    defines = dict(re.findall(r"^#define AUS_(\w+)\s+(.+?)\s*(?:/\*.*)?$", text, re.M))
    checked = 0
    for cname, raw in defines.items():
        if cname.startswith("MAX_") or cname == "H":
            continue  # sizes come from the config as -D flags
        assert hasattr(C, cname), f"AUS_{cname} has no mirror in aus.core.contract"
        value = raw.strip()
        if value.startswith('"'):
            parsed = value.strip('"')
        else:
            expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)U\b", r"\1", value)
            parsed = eval(re.sub(r"\bAUS_(\w+)", r"C.\1", expr), {"C": C})
        assert getattr(C, cname) == parsed, f"AUS_{cname}"
        checked += 1
    assert checked >= 25


@pytest.fixture(scope="module")
def installed(cg):
    """ausd with the real programs attached to a test cgroup, for its pins."""
    with lab.ausd(cg, {}) as d:
        d.start()
        yield pins.PinLayout(d.pin_dir)


def _info(path, get):
    fd = bpfsys.obj_get(str(path))
    try:
        return get(fd, str(path))
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", sorted(C.MAPS))
def test_pinned_map_is_the_table_entry(installed, name):
    """Every map the kernel holds has the type and key/value sizes that
    contract.MAPS gives it (what pins.open_map checks before reading)."""
    spec = C.MAPS[name]
    info = _info(installed.map(name), bpfsys.map_info)
    assert info["type"] == spec.map_type
    assert info["name"] == name[:15]          # the kernel keeps 15 characters
    size = (lambda t: ctypes.sizeof(t) if t is not None else 0)
    if spec.map_type != C.MAP_TYPE_RINGBUF:   # a ring has no key or value
        assert (info["key_size"], info["value_size"]) == (size(spec.key), size(spec.value))


@pytest.mark.parametrize("prog", C.PROGRAMS, ids=lambda p: p.link)
def test_attached_program_is_the_table_entry(installed, prog):
    assert _info(installed.prog(prog.link), bpfsys.prog_info)["type"] == prog.prog_type
    assert _info(installed.link(prog.link), bpfsys.link_info)["attach_type"] == prog.attach_type


def test_opening_a_map_of_another_type_or_size_is_refused(installed):
    spec = C.MAPS[C.MAP_USER_STATS]
    with pins.open_map(installed, spec) as m:        # the real layout opens
        assert m.percpu
    with pytest.raises(BpfError, match="map type 6 differs from this version's 1"):
        pins.open_map(installed, dataclasses.replace(spec, map_type=C.MAP_TYPE_HASH))
    with pytest.raises(BpfError, match="key/value sizes 4/32 differ"):
        pins.open_map(installed, dataclasses.replace(spec, value=ctypes.c_uint64))
