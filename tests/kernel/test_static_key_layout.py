"""Static-key sites laid out by their real state (issue 13): a site whose key the
profile saw enabled is reversed (the enabled side falls through, the entry's
branch bit and the site's initial form flip), and the kernel still switches the
key both ways at run time. Real keys are switched by turning every trace event
on and off around the workload (each tracepoint is a static key)."""

from __future__ import annotations

import pytest

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

# (profiles recorded and kernels booted: one worker)
pytestmark = pytest.mark.xdist_group("static-keys")

EVENTS = "kbb.events=1"
SWITCHED = ("module:test_static_keys", "events-on", "workload-end:files", "events-off")


def reversed_keys(before, after) -> list[str]:
    """Names of the keys whose __jump_table entries flipped their branch sense
    (entries keep their rows: the table is not sorted in the file)."""
    a, b = BinaryModel.open(before), BinaryModel.open(after)
    ta, tb = a.tables["__jump_table"], b.tables["__jump_table"]
    fa, fb = ta.flags("key") & 1, tb.flags("key") & 1
    assert len(fa) == len(fb)
    keys = ta.targets("key")[fa != fb]
    return [a.symbolize(int(k)) for k in keys.tolist()]


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """6.12 lab kernel: the files workload profiled with trace events on, and off."""
    kernel = lab_kernel("6.12-regular")
    return {events: qemu.record(kernel.vmlinux, kernel.initramfs, workload="files",
                                iterations=(1, 4), kaslr=False, append=EVENTS if events else "")
            for events in (True, False)}


def laid_out(profile, tmp_path, **options):
    """The 6.12 lab kernel laid out by ext-TSP with ``profile``, verified: (lab
    kernel, output, result, names of the keys whose sites were reversed)."""
    kernel = lab_kernel("6.12-regular")
    out = tmp_path / "vmlinux"
    result = rewrite(kernel.vmlinux, out, RewriteOptions(
        reorder_blocks="ext-tsp", profile=profile, progress=False, strip_debug=True, **options))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    flipped = reversed_keys(kernel.vmlinux, out)
    assert result.static_keys_reversed == len(flipped), result.summary()
    return kernel, out, result, flipped


def test_enabled_keys_are_reversed_and_still_switch(profiles, tmp_path):
    kernel, out, result, flipped = laid_out(profiles[True], tmp_path)
    assert len(flipped) > 10, result.summary()
    # the keys the profile saw enabled: tracepoints (events were on)
    tracepoints = [k for k in flipped if k.startswith("__tracepoint_")]
    assert len(tracepoints) > 10, flipped
    bzimage = rebuild_bzimage(kernel.build_dir, out, tmp_path / "bzImage")
    for kaslr, append in ((True, EVENTS), (False, "")):
        outcome = boot(bzimage, kernel.initramfs, workload="files", iterations=3, kaslr=kaslr,
                       append=append)
        assert outcome.ok, outcome.summary()
        for marker in (SWITCHED if append else SWITCHED[:1]):
            assert marker in outcome.markers, outcome.summary()


def test_disabled_keys_stay_as_they_are(profiles, tmp_path):
    """A profile where the events stayed off: no tracepoint site is reversed."""
    _kernel, _out, _result, flipped = laid_out(profiles[False], tmp_path)
    assert not [k for k in flipped if k.startswith("__tracepoint_")], flipped


def test_reversal_can_be_turned_off(profiles, tmp_path):
    _kernel, _out, result, flipped = laid_out(profiles[True], tmp_path,
                                              reverse_static_keys=False)
    assert result.static_keys_reversed == 0 and flipped == []
