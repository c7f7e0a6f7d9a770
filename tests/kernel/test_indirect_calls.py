"""Indirect-call targets in exact QEMU profiles (issue 13): calls through a
register or memory, and calls of retpoline thunks followed through the thunk
to the function they reach, with KASLR on."""

from __future__ import annotations

import numpy as np
import pytest

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach, indirect_calls
from kbuild_bolt.x86 import decode as x86

pytestmark = pytest.mark.xdist_group("indirect-calls")


def recorded(flavor):
    kernel = lab_kernel(flavor)
    profile, outcome = qemu.record_run(kernel.bzimage, kernel.initramfs, "files", 2, kaslr=True,
                                       vmlinux=kernel.vmlinux)
    assert outcome.ok and outcome.text_base != 0xFFFFFFFF81000000, outcome.summary()
    model = BinaryModel.open(kernel.vmlinux)
    return model, attach(model, profile)


def at_entries(model, targets: np.ndarray) -> np.ndarray:
    row = model.functions.rows_containing(targets)
    return (row >= 0) & (targets == model.functions.start[np.maximum(row, 0)])


def test_retpoline_calls_are_followed_to_their_targets():
    """The hardened kernel calls through retpoline thunks (live on the lab CPU):
    every call into a thunk has its real target, a function entry."""
    model, cp = recorded("6.12-hardened")
    insns = model.insns
    sites = model.tables[".retpoline_sites"].targets("site")
    thunk_site = np.isin(insns.addr[cp.call_src], sites) & (insns.flow[cp.call_src] == x86.CALL)
    into_thunk = thunk_site & (cp.call_dst == insns.ref[cp.call_src])
    entered = int(cp.call_count[into_thunk].sum())
    calls = indirect_calls(model, cp)
    through = insns.flow[calls.site] == x86.CALL
    followed = int(calls.count[through].sum())
    assert entered > 10000 and followed == entered, (entered, followed)
    good = int(calls.count[through][at_entries(model, calls.target[through])].sum())
    assert good >= 0.999 * followed, (good, followed)
    by_site = calls.by_site()
    # r8-r15 thunk calls carry a CS prefix (6 bytes): followed too
    assert any(model.insns.length[site] == 6 for site, _, _ in by_site)
    hottest_site, n, targets = by_site[0]
    assert n > 1000 and targets[0][1] >= 0.5 * n


def test_register_and_memory_calls_have_targets():
    """Without retpolines (the regular kernel), indirect calls are plain
    ``call *%reg`` / ``call *mem`` (paravirt): their transfers are the targets."""
    model, cp = recorded("6.12-regular")
    calls = indirect_calls(model, cp)
    assert int(calls.count.sum()) > 10000
    assert (model.insns.flow[calls.site] == x86.IND_CALL).all()
    good = int(calls.count[at_entries(model, calls.target)].sum())
    assert good >= 0.99 * int(calls.count.sum())
