"""A stale profile never makes the kernel slower (issue 14): a profile of another
build is applied only where its functions match with confidence; elsewhere the
compiler's layout stays. Measured on the kernel itself: the hardened lab kernel's
profile (another config of the same source: almost every function compiles
differently) applied to the regular one."""

from __future__ import annotations

import pytest

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.profile.stale import shapes_for
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

pytestmark = [pytest.mark.qemu, pytest.mark.xdist_group("stale-profiles")]

ITERATIONS = 3


def recorded(vmlinux, initrd):
    """The files workload's exact profile, with its functions' shapes (as `profile
    record` writes it)."""
    profile = qemu.record(vmlinux, initrd, workload="files", iterations=ITERATIONS,
                          kaslr=False, vmlinux=vmlinux)
    model = BinaryModel.open(vmlinux)
    profile.kernel = model.version.release
    profile.shapes = shapes_for(model, build_cfg(model), profile)
    return model, profile


def taken(model, profile) -> int:
    return measured_taken_branches(model, attach(model, profile))["taken_branches"]


def test_profile_of_another_config_never_costs_taken_jumps(tmp_path):
    hardened, regular = lab_kernel("6.12-hardened"), lab_kernel("6.12-regular")
    _, theirs = recorded(hardened.vmlinux, hardened.initramfs)
    model, own = recorded(regular.vmlinux, regular.initramfs)
    out = tmp_path / "vmlinux"
    result = rewrite(regular.vmlinux, out, RewriteOptions(
        profile=theirs, reorder_blocks="ext-tsp", reorder_functions="cdsort",
        split_functions=True, progress=False))
    assert result.verify_summary.startswith("verify: ok")
    # Most changed functions were left as compiled, and the report says so.
    assert "changed and left as compiled" in result.profile_applied
    assert result.profile_used < 0.2
    after_model, after = recorded(out, regular.initramfs)
    before_taken, after_taken = taken(model, own), taken(after_model, after)
    # (the workload itself moves by a few tenths of a percent from run to run;
    # the old matching measured +14% here)
    assert after_taken <= 1.01 * before_taken, (before_taken, after_taken)
