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


@pytest.mark.parametrize("flavor", ["6.12-hardened", "6.12-regular", "6.1-regular"])
def test_promoted_calls_go_the_direct_way_with_kaslr(flavor, tmp_path):
    """The layout ``make CONFIG_BOLT=y`` uses, with the promotion on (its default):
    the bzImage is rebuilt by the tree's own relocs tool from the output (the cmp
    immediates carry R_X86_64_32S), it boots clean with KASLR, and profiled
    again (KASLR on: a cmp left at its link-time value would never match) its
    indirect calls have fallen."""
    from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
    from kbuild_bolt.profile.attach import executed_indirect_calls
    from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

    kernel = lab_kernel(flavor)
    profile, outcome = qemu.record_run(kernel.bzimage, kernel.initramfs, "files", 2,
                                       kaslr=True, vmlinux=kernel.vmlinux)
    assert outcome.ok, outcome.summary()
    model = BinaryModel.open(kernel.vmlinux)
    before = executed_indirect_calls(model, attach(model, profile))
    out = tmp_path / "vmlinux"
    result = rewrite(kernel.vmlinux, out, RewriteOptions(
        profile=profile, reorder_functions="cdsort", split_functions=True, strip_debug=True,
        progress=False, dyno_stats=True))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    sites, calls, hits = result.calls_promoted
    assert sites >= 5 and hits >= 0.8 * calls, result.summary()
    bzimage = rebuild_bzimage(kernel.build_dir, out, tmp_path / "bzImage")
    again, outcome = qemu.record_run(bzimage, kernel.initramfs, "files", 2, kaslr=True,
                                     vmlinux=out)
    assert outcome.ok and outcome.text_base != 0xFFFFFFFF81000000, outcome.summary()
    optimized = BinaryModel.open(out)
    after = executed_indirect_calls(optimized, attach(optimized, again))
    # the promoted calls' hits no longer run indirectly (the workload varies a little;
    # boot is in these profiles, with sort_r's calls of jump_label_cmp at 70%: not
    # promoted. The workloads alone: benchmarks/bench_icp.py)
    assert after <= before - 0.8 * hits, (before, after, result.calls_promoted)
    assert (after <= 0.6 * before if flavor == "6.12-hardened" else after < before), \
        (before, after, result.calls_promoted, result.icp_skipped)
