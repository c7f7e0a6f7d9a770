"""The rewrite engine on real kernels: reverse and random layouts (which move nearly
every block and so exercise every fixup; every indirect call that may be is
promoted too) must verify, keep x86's relocs tool happy
(bzImage rebuilt from the output), and boot clean with KASLR on and off; `none`
changes no loadable byte; bisect finds a planted fault."""

import subprocess

import pytest

from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.qemu.runner import DEFAULT_TEXT, boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

LAYOUTS = [("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]
FLAVORS = ["6.12-regular", "6.12-hardened", "6.1-regular"]


def assert_clean(result, markers=("module:test_static_keys",)):
    assert result.ok, result.summary() + "\n" + "\n".join(result.log_lines[-30:])
    for marker in markers:
        assert marker in result.markers


def loadable(path):
    image = ElfImage(path)
    return [(s.name, image.read(s.addr, s.size)) for s in image.sections
            if s.is_alloc and s.has_bits and s.size]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_none_changes_no_loadable_byte(flavor, tmp_path):
    kernel = lab_kernel(flavor)
    out = tmp_path / "vmlinux"
    result = rewrite(kernel.vmlinux, out, RewriteOptions(reorder_blocks="none", progress=False))
    assert result.rewritten == 0
    assert loadable(out) == loadable(kernel.vmlinux)


@pytest.mark.parametrize("layout,seed", LAYOUTS, ids=[f"{l}{s or ''}" for l, s in LAYOUTS])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_layout_boots_clean(flavor, layout, seed, tmp_path):
    kernel = lab_kernel(flavor)
    out = tmp_path / "vmlinux"
    result = rewrite(kernel.vmlinux, out,
                     RewriteOptions(reorder_blocks=layout, seed=seed, progress=False,
                                    icp_every_site=True))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.rewritten > 5000
    # Every indirect call that may be promoted is, to some function it (almost)
    # never calls: every call runs its fallback (the original call, its retpoline
    # site entry with it) and jumps back; the cmp immediates are relocated.
    assert result.calls_promoted[0] > 1000, result.summary()
    assert result.text_coverage >= 0.95, result.summary()
    # Reordering grows many functions past their slot: their cold end runs from free
    # room in .text (the split path is part of what boots here).
    assert result.fragments > 1000, result.summary()
    # Static-key sites whose jump side landed right after them are reversed; the
    # second boot switches every tracepoint's key on and off around the workload.
    assert result.static_keys_reversed > 10, result.summary()
    # x86's relocs tool derives vmlinux.relocs from the output (bzImage rebuilt).
    bzimage = rebuild_bzimage(kernel.build_dir, out, tmp_path / "bzImage")
    workload = "files" if seed % 2 == 0 else "server"
    kaslr = boot(bzimage, kernel.initramfs, workload=workload, kaslr=True, iterations=3)
    assert_clean(kaslr)
    nokaslr = boot(bzimage, kernel.initramfs, workload="server" if workload == "files" else "files",
                   kaslr=False, iterations=3, append="kbb.events=1")
    assert_clean(nokaslr, ("module:test_static_keys", "events-on", "events-off"))
    assert nokaslr.text_base == DEFAULT_TEXT


@pytest.mark.distro
@pytest.mark.parametrize("layout,seed", LAYOUTS, ids=[f"{l}{s or ''}" for l, s in LAYOUTS])
def test_distro_layout_boots_clean(distro, layout, seed, tmp_path):
    from kbuild_bolt.lab.initramfs import build_lab_initramfs

    out = tmp_path / "vmlinux"
    result = rewrite(distro.vmlinux, out,
                     RewriteOptions(reorder_blocks=layout, seed=seed, progress=False,
                                    strip_debug=True))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.text_coverage >= 0.95, result.summary()
    assert result.stripped  # --strip-debug (the DWARF is judged in test_debuginfo)
    # x86's relocs tool (from the 6.1 lab build) accepts it: the same number of KASLR
    # relocations as the input, at new places where code moved.
    relocs = str(lab_kernel("6.1-regular").build_dir / "arch/x86/tools/relocs")
    before = subprocess.run([relocs, str(distro.vmlinux)], capture_output=True)
    after = subprocess.run([relocs, str(out)], capture_output=True)
    assert before.returncode == 0 and after.returncode == 0, after.stderr[-500:]
    assert len(after.stdout) == len(before.stdout) and after.stdout != before.stdout
    initrd = build_lab_initramfs(tmp_path / "initrd.gz")
    outcome = boot(out, initrd, workload="files" if seed % 2 == 0 else "server", iterations=3,
                   memory="1G")
    assert_clean(outcome, markers=())


def test_bisect_finds_a_planted_fault(tmp_path):
    """A .return_sites entry left stale on purpose makes apply_returns() warn
    ("missing return thunk", what BOLT 22's output does); bisect names the function."""
    from kbuild_bolt.binary.cfg import build_cfg
    from kbuild_bolt.binary.model import BinaryModel
    from kbuild_bolt.rewrite.bisect import Bisector

    kernel = lab_kernel("6.12-hardened")
    model = BinaryModel.open(kernel.vmlinux)
    cfg = build_cfg(model)
    # 24 simple functions with several blocks and a return site each.
    sites = model.tables[".return_sites"].targets("site")
    rows = sorted(set(model.functions.rows_containing(sites).tolist()) - {-1})
    chosen = [model.functions.names[r] for r in rows
              if cfg.func_reason[r] == 0 and len(cfg.blocks_of(r)) >= 6][:24]
    assert len(chosen) == 24
    faulty = chosen[10]
    options = RewriteOptions(reorder_blocks="reverse", funcs=set(chosen), verify=False,
                             plant_fault=f"return@{faulty}", progress=False)
    bisector = Bisector(kernel.vmlinux, kernel.initramfs, options,
                        dict(workload="files", iterations=1, timeout=90), log=lambda m: None)
    result = bisector.bisect()
    assert not result.full_run_ok
    assert result.culprits == [faulty]
    assert any("return thunk" in line or "WARNING" in line for line in result.failing_lines)
    assert result.boots <= 12
    del model
