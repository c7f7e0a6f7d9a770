"""The whole loop on real kernels: record an exact QEMU profile of a workload,
rewrite with ext-TSP, boot the result clean, record again and compare the
*measured* taken branches of the workload (boot excluded)."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.model import write_profile
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

# The tests share recorded profiles and rewritten kernels (_CACHE): one worker.
pytestmark = pytest.mark.xdist_group("profile-loop")

ITERATIONS = (2, 10)
_CACHE = {}


def measured(vmlinux, kernel, initrd, workload):
    profile = qemu.record(kernel, initrd, workload=workload, iterations=ITERATIONS, kaslr=False)
    model = BinaryModel.open(vmlinux)
    return measured_taken_branches(model, attach(model, profile)), profile


def optimized(flavor, workload, tmp_path_factory):
    """(lab kernel, its profile, the ext-TSP kernel, measured before) — once per pair."""
    key = (flavor, workload)
    if key not in _CACHE:
        kernel = lab_kernel(flavor)
        before, profile = measured(kernel.vmlinux, kernel.vmlinux, kernel.initramfs, workload)
        out = tmp_path_factory.mktemp(f"opt-{flavor}-{workload}") / "vmlinux"
        result = rewrite(kernel.vmlinux, out, RewriteOptions(
            reorder_blocks="ext-tsp", profile=profile, progress=False, dyno_stats=True))
        assert result.verify_summary.startswith("verify: ok"), result.verify_summary
        _CACHE[key] = (kernel, profile, out, before, result)
    return _CACHE[key]


@pytest.mark.parametrize("workload", ["files", "server"])
@pytest.mark.parametrize("flavor", ["6.12-regular", "6.12-hardened"])
def test_ext_tsp_cuts_measured_taken_branches(flavor, workload, tmp_path_factory, tmp_path):
    kernel, _profile, out, before, result = optimized(flavor, workload, tmp_path_factory)
    assert result.rewritten > 300
    assert result.profile_used > 0.99
    # Predicted by dyno-stats ...
    dyno_before, dyno_after = result.dyno
    assert dyno_after["ALL_TAKEN"] < 0.6 * dyno_before["ALL_TAKEN"]
    # ... and measured on the rewritten kernel, booted as a bzImage with KASLR.
    bzimage = rebuild_bzimage(kernel.build_dir, out, tmp_path / "bzImage")
    outcome = boot(bzimage, kernel.initramfs, workload=workload, iterations=3, kaslr=True)
    assert outcome.ok, outcome.summary()
    after, _ = measured(out, out, kernel.initramfs, workload)
    reduction = 1 - after["taken_branches"] / before["taken_branches"]
    assert reduction >= 0.56, (before, after)
    # dyno-stats tell the truth: the predicted change of the whole run's taken
    # jumps (the profile's own count, which is the measured "before") is within
    # 5 points of the measured one, on the hardened kernel too (its return
    # thunks run as plain returns on the lab CPU)
    assert result.taken_prediction[0] == before["taken_branches"]
    predicted = result.predicted_taken_change()
    assert abs(predicted + reduction) <= 0.05, (predicted, -reduction)
    # The workload did the same work: executed instructions within a few percent.
    assert abs(after["executed_instructions"] / before["executed_instructions"] - 1) < 0.05


def test_profile_of_one_workload_does_not_hurt_the_other(tmp_path_factory):
    """files-profile layout, measured on the server workload: not worse than as built."""
    kernel, _p, out, _b, _r = optimized("6.12-regular", "files", tmp_path_factory)
    before, _ = measured(kernel.vmlinux, kernel.vmlinux, kernel.initramfs, "server")
    after, _ = measured(out, out, kernel.initramfs, "server")
    assert after["taken_branches"] <= before["taken_branches"]


@pytest.mark.skipif(shutil.which("llvm-bolt-22") is None, reason="bolt-22 not installed")
def test_fdata_round_trip_with_llvm_bolt(tmp_path_factory, tmp_path):
    kernel, profile, _out, _b, _r = optimized("6.12-regular", "files", tmp_path_factory)
    from kbuild_bolt.profile.fdata import read_fdata, write_fdata

    model = BinaryModel.open(kernel.vmlinux)
    cfg = build_cfg(model)
    write_fdata(profile, model, tmp_path / "ours.fdata")
    proc = subprocess.run(["llvm-bolt-22", str(kernel.vmlinux), "-o", str(tmp_path / "bolt.out"),
                           f"-data={tmp_path / 'ours.fdata'}", "-reorder-blocks=ext-tsp"],
                          capture_output=True, text=True)
    m = re.search(r"BOLT-INFO: (\d+) out of \d+ functions in the binary .* have non-empty "
                  r"execution profile", proc.stdout + proc.stderr)
    assert m and int(m.group(1)) > 500, proc.stdout[-2000:] + proc.stderr[-2000:]
    # BOLT's own converter on the same data (pre-aggregated), read back by us.
    with open(tmp_path / "p.pa", "w") as f:
        for s, d, c in zip(profile.src.tolist(), profile.dst.tolist(), profile.count.tolist()):
            f.write(f"B {s:x} {d:x} {c} 0\n")
        for s, l, c in zip(profile.range_start.tolist(), profile.range_last.tolist(),
                           profile.range_count.tolist()):
            f.write(f"F {s:x} {l:x} {c}\n")
    proc = subprocess.run(["perf2bolt-22", "-pa", "-p", str(tmp_path / "p.pa"),
                           str(kernel.vmlinux), "-o", str(tmp_path / "perf2bolt.fdata")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = attach(model, read_fdata(tmp_path / "perf2bolt.fdata", model))
    ours = attach(model, profile)
    a, b = ours.block_counts(cfg), theirs.block_counts(cfg)
    hot = a > 1000
    assert hot.sum() > 1000
    assert np.median(np.abs(a[hot] - b[hot]) / a[hot]) < 0.01


def test_stale_profile_on_another_build(tmp_path_factory, tmp_path):
    """The regular kernel's profile on the hardened build of the same source: what
    still matches with confidence is used (the functions whose code is the same),
    the changed functions keep the compiler's layout (and the summary says so),
    the rewrite verifies. (What that does to the kernel is measured in
    test_stale_profiles.py.)"""
    _k, profile, _o, _b, _r = optimized("6.12-regular", "files", tmp_path_factory)
    regular = lab_kernel("6.12-regular")
    from kbuild_bolt.profile.stale import shapes_for

    model = BinaryModel.open(regular.vmlinux)
    profile.shapes = shapes_for(model, build_cfg(model), profile)
    write_profile(profile, tmp_path / "regular.kbb")
    hardened = lab_kernel("6.12-hardened")
    result = rewrite(hardened.vmlinux, tmp_path / "vmlinux", RewriteOptions(
        reorder_blocks="ext-tsp", profile=str(tmp_path / "regular.kbb"), progress=False))
    assert result.verify_summary.startswith("verify: ok")
    assert result.rewritten >= 10
    assert "changed and left as compiled" in result.profile_applied
    assert 0.0 < result.profile_used < 0.2


def test_kept_orders_give_the_same_kernel(tmp_path_factory, tmp_path):
    """ext-TSP orders kept in the cache directory: a second rewrite of the same
    kernel finds every hot function's order and writes the same bytes as a
    rewrite without a cache; the hardened build of the same source, given the
    regular kernel's profile, finds the orders of the functions whose code and
    counts are the same there, and writes what it writes without a cache."""
    _k, profile, out, _b, first = optimized("6.12-regular", "files", tmp_path_factory)
    regular = lab_kernel("6.12-regular")
    from kbuild_bolt.profile.stale import shapes_for

    model = BinaryModel.open(regular.vmlinux)
    profile.shapes = shapes_for(model, build_cfg(model), profile)
    path = tmp_path / "regular.kbb"
    write_profile(profile, path)
    cache = tmp_path / "cache"

    def run(vmlinux, name, cache_dir):
        result = rewrite(vmlinux, tmp_path / name, RewriteOptions(
            reorder_blocks="ext-tsp", profile=str(path), progress=False, cache_dir=cache_dir))
        assert result.verify_summary.startswith("verify: ok"), result.verify_summary
        return result, (tmp_path / name).read_bytes()

    made, made_bytes = run(regular.vmlinux, "made", str(cache))
    found, found_bytes = run(regular.vmlinux, "found", str(cache))
    assert made.orders_kept[0] == 0 and made.orders_kept[1] > 1000
    assert found.orders_kept == (made.orders_kept[1], made.orders_kept[1])
    assert made_bytes == found_bytes == out.read_bytes()
    hardened = lab_kernel("6.12-hardened")
    kept, kept_bytes = run(hardened.vmlinux, "hardened", str(cache))
    fresh, fresh_bytes = run(hardened.vmlinux, "hardened-fresh", None)
    assert kept_bytes == fresh_bytes
    assert 0 < kept.orders_kept[0] < kept.orders_kept[1] == fresh.orders_kept[1]
