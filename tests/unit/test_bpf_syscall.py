"""bpf(2)'s syscall number comes from the machine's architecture."""

from __future__ import annotations

import errno
import os
import platform

import pytest

from aus.agent import bpfsys
from aus.core.errors import BpfError, ProbeError


@pytest.mark.parametrize("machine, number", [("x86_64", 321), ("aarch64", 280)])
def test_known_architectures(machine, number):
    assert bpfsys.bpf_syscall_number(machine) == number


@pytest.mark.parametrize("machine", ["riscv64", "armv7l", "i686", ""])
def test_unknown_architecture_is_refused_by_name(machine):
    with pytest.raises(ProbeError) as exc:
        bpfsys.bpf_syscall_number(machine)
    text = str(exc.value)
    assert f"architecture {machine!r}" in text
    assert "known: aarch64, x86_64" in text


def test_this_machine_defaults_to_its_own_architecture():
    assert bpfsys.bpf_syscall_number() == bpfsys.BPF_SYSCALL_NUMBERS[platform.machine()]


@pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root")
def test_the_number_in_use_reaches_bpf():
    # BPF_OBJ_GET of a path that does not exist: bpf(2) answers ENOENT; a
    # wrong syscall number would answer ENOSYS or do something else.
    with pytest.raises(BpfError) as exc:
        bpfsys.obj_get(f"/sys/fs/bpf/aus-no-such-pin-{os.getpid()}")
    assert exc.value.errno == errno.ENOENT, exc.value
