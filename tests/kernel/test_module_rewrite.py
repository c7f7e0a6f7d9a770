"""Loadable modules rewritten (issue 15): random layouts of the I/O path's
modules (ext4, jbd2, mbcache, loop), blocks and whole functions, load in the
lab kernel and run the disk workload clean, KASLR on and off; the disk
workload's profile lays ext4 and loop out (blocks, function order, hot/cold
splitting) so that re-profiling measures at most 0.45x the taken branches in
module code, and ext4's hot code on half the pages or fewer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kbuild_bolt.kbuild.modules import check_modules
from kbuild_bolt.lab.initramfs import build_lab_initramfs
from kbuild_bolt.lab.kernels import LAB_MODULES, lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.context import RewriteOptions
from kbuild_bolt.rewrite.module import (
    measured_module_footprint, measured_module_taken, rewrite_module,
)

pytestmark = pytest.mark.xdist_group("modules")

IO_PATH = ("ext4", "jbd2", "mbcache", "loop")


@pytest.fixture(scope="module")
def kernel():
    return lab_kernel("6.12-modules")


def module_tree(kernel, tmp: Path) -> Path:
    """A copy of the kernel's modules tree (INSTALL_MOD_PATH) to put rewritten
    modules in."""
    root = tmp / "modules"
    shutil.copytree(kernel.modules_root, root, symlinks=True)
    return root


def ko(root: Path, name: str) -> Path:
    return next(root.rglob(f"{name}.ko"))


def initramfs_with(kernel, root: Path, tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "initramfs.cpio.gz"
    build_lab_initramfs(out, modules_root=root, release=kernel.release, modules=LAB_MODULES)
    return out


@pytest.mark.parametrize("seed,functions", [(11, "none"), (12, "random")])
def test_random_module_layouts_load_and_run_clean(kernel, tmp_path, seed, functions):
    """Blocks at random, and (functions=random) functions too, split at random
    into hot and cold parts: the cold parts are named name.cold in the module's
    symbol table (what the loader makes its kallsyms from)."""
    from kbuild_bolt.elf.image import STT_FUNC, ElfImage

    root = module_tree(kernel, tmp_path)
    cold = moved = 0
    for name in IO_PATH:
        path = ko(root, name)
        result = rewrite_module(path, path, RewriteOptions(
            reorder_blocks="random", reorder_functions=functions,
            split_functions=functions != "none", seed=seed, progress=False))
        assert result.rewritten > 0 and "verify: ok" in result.verify_summary
        cold += result.fragments
        moved += result.moved_functions
    assert cold > 100                  # (cold parts placed in the room given to .text)
    assert (moved > 1000) == (functions != "none"), moved
    initrd = initramfs_with(kernel, root, tmp_path)
    with ElfImage(ko(root, "ext4")) as image:
        symbols = image.symbols
        named = sum(1 for i in range(len(symbols.value)) if symbols.type[i] == STT_FUNC
                    and symbols.names[i].endswith(".cold") and symbols.bind[i] == 0)
    assert named > 100, named
    for kaslr in (True, False):
        result = boot(kernel.bzimage, initrd, workload="disk", iterations=2, kaslr=kaslr)
        assert result.ok, result.summary()
        assert any(line.startswith("/sys/module/ext4/sections/.text:")
                   for line in result.log_lines)


def test_profile_lays_modules_out_measured(kernel, tmp_path):
    before = qemu.record(kernel.bzimage, kernel.initramfs, "disk", 3, kaslr=True,
                         vmlinux=kernel.vmlinux, modules_tree=kernel.modules_root)
    assert {"ext4", "loop"} <= set(before.modules)
    root = module_tree(kernel, tmp_path)
    for name in before.modules:
        path = ko(root, name)
        result = rewrite_module(path, path, RewriteOptions(
            reorder_blocks="ext-tsp", reorder_functions="cdsort", split_functions=True,
            profile=before, progress=False))
        assert result.profile_used > 0.99 and "verify: ok" in result.verify_summary
    # vermagic, CRCs and depmod: as the package flows check them
    report = check_modules(kernel.vmlinux, root / "lib/modules" / kernel.release)
    assert report.ok, report.summary()
    after = qemu.record(kernel.bzimage, initramfs_with(kernel, root, tmp_path), "disk", 3,
                        kaslr=True, vmlinux=kernel.vmlinux, modules_tree=root)
    was = sum(measured_module_taken(ko(kernel.modules_root, m), before)["taken_branches"]
              for m in before.modules)
    now = sum(measured_module_taken(ko(root, m), after)["taken_branches"]
              for m in before.modules)
    assert was > 1_000_000
    assert now <= 0.45 * was, f"taken branches in modules {now:,} of {was:,}"
    # Functions the run used packed together: the 4-KiB pages of ext4 that hold
    # 99% of its instruction fetches.
    pages = [measured_module_footprint(ko(r, "ext4"), p)["pages99"]
             for r, p in ((kernel.modules_root, before), (root, after))]
    assert pages[1] <= 0.5 * pages[0], pages


def needed_modules(tree: Path, names) -> list[Path]:
    """The .ko files of ``names`` and of what they need (their .modinfo
    ``depends=``: a package's tree has no modules.dep, depmod makes it at
    install). Those the kernel has built in (modules.builtin) are left out."""
    from kbuild_bolt.elf.image import ElfImage
    from kbuild_bolt.profile.modules import module_files, read_module_bytes

    files = module_files(tree)
    builtin = built_in_modules(tree)
    out, todo = [], list(names)
    while todo:
        name = todo.pop()
        if name in builtin and name not in files:
            continue
        if files[name] in out:
            continue
        out.append(files[name])
        with ElfImage.from_bytes(read_module_bytes(files[name])) as image:
            info = bytes(image.section_data(image.section(".modinfo"))).split(b"\0")
        for entry in info:
            if entry.startswith(b"depends="):
                todo += [d.replace("-", "_") for d in entry[8:].decode().split(",") if d]
    return out


def built_in_modules(tree: Path) -> set[str]:
    """The modules a kernel has built in (its tree's modules.builtin), by name."""
    listed = tree / "modules.builtin"
    if not listed.exists():
        return set()
    return {Path(line.strip()).name.split(".ko")[0].replace("-", "_")
            for line in listed.read_text().splitlines() if line.strip()}


def test_distro_modules_with_random_layouts_run_in_the_distro_kernel(distro, tmp_path):
    """Debian's own loop, ext4 and what ext4 needs, from its image package, each
    laid out at random, loaded by Debian's kernel booted in QEMU: the disk
    workload runs clean, KASLR on and off."""
    import subprocess

    from kbuild_bolt.profile.modules import read_module_bytes

    tree = distro.modules_root / "lib/modules" / distro.release
    root = tmp_path / "modules"
    dest = root / "lib/modules" / distro.release
    rewritten = []
    # (ext4 asks the crypto API for crc32c when it mounts: its soft dependency)
    for path in needed_modules(tree, ("loop", "ext4", "crc32c_generic")):
        rel = str(path.relative_to(tree)).split(".ko")[0] + ".ko"
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read_module_bytes(path))     # (decompressed, if it was)
        result = rewrite_module(out, out, RewriteOptions(
            reorder_blocks="random", reorder_functions="random", split_functions=True,
            seed=21, progress=False))
        assert "verify: ok" in result.verify_summary
        rewritten.append((out.name, result.rewritten))
    # (Debian's cloud flavor has ext4, jbd2 and crc32c built in)
    modular = {"ext4", "loop", "jbd2"} - built_in_modules(tree)
    assert "loop" in modular
    assert {f"{m}.ko" for m in modular} <= {n for n, _ in rewritten}
    assert all(n > 0 for name, n in rewritten if name in ("ext4.ko", "jbd2.ko", "loop.ko"))
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (tree / name).exists():
            shutil.copy(tree / name, dest / name)
    subprocess.run(["depmod", "-b", str(root), distro.release], check=True)
    initrd = tmp_path / "initramfs.cpio.gz"
    build_lab_initramfs(initrd, modules_root=root, release=distro.release, modules=("loop",))
    for kaslr in (True, False):
        result = boot(distro.vmlinuz, initrd, workload="disk", iterations=2, kaslr=kaslr,
                      timeout=600)
        assert result.ok, result.summary()


def test_stale_module_profile_never_makes_it_slower(kernel, tmp_path):
    """A profile of one build's ext4, with its functions' shapes, applied to
    another build of ext4 (here: the same source laid out at random, so most
    functions changed): what matches confidently is applied, the rest keeps
    the compiler's layout, and re-profiling measures no more taken branches in
    ext4, per instruction executed there, than that build unoptimized."""
    from kbuild_bolt.rewrite.module import module_shapes

    profile = qemu.record(kernel.bzimage, kernel.initramfs, "disk", 2, kaslr=True,
                          vmlinux=kernel.vmlinux, modules_tree=kernel.modules_root)
    profile.shapes = module_shapes(profile, kernel.modules_root)
    assert any(name.startswith("ext4:") for name in profile.shapes)
    other = module_tree(kernel, tmp_path / "b")
    path = ko(other, "ext4")
    rewrite_module(path, path, RewriteOptions(reorder_blocks="random", seed=31,
                                              progress=False))
    optimized = module_tree(kernel, tmp_path / "c")
    shutil.copy(path, ko(optimized, "ext4"))
    result = rewrite_module(ko(optimized, "ext4"), ko(optimized, "ext4"), RewriteOptions(
        reorder_blocks="ext-tsp", profile=profile, progress=False))
    assert "changed and left as compiled" in result.profile_applied
    assert "verify: ok" in result.verify_summary
    # Taken jumps per instruction executed in ext4. How much work the disk
    # workload does in ext4 moves from run to run (writeback and the journal run
    # on timers: the same ext4 measured 6.68 M and 6.80 M taken jumps in two
    # runs); the share of that work spent jumping does not (within 0.2%). A
    # layout that jumps more raises it: every taken jump it adds is an
    # instruction executed too.
    rate = {}
    for label, root in (("B", other), ("B with A's profile", optimized)):
        after = qemu.record(kernel.bzimage, initramfs_with(kernel, root, tmp_path / label),
                            "disk", 2, kaslr=True, vmlinux=kernel.vmlinux, modules_tree=root)
        measured = measured_module_taken(ko(root, "ext4"), after)
        assert measured["executed_instructions"] > 1_000_000, measured
        rate[label] = measured["taken_branches"] / measured["executed_instructions"]
    assert rate["B with A's profile"] <= 1.01 * rate["B"], rate


def test_modules_signed_again_with_a_given_key(kernel, tmp_path):
    """A rewritten module signed as modules_install signs it (the kernel tree's
    sign-file, a key made as certs/Makefile makes one); rewriting a signed
    module without a key says that its signature is dropped."""
    import subprocess

    from module_signing import SIGNER, build_sign_file, make_signing_key

    from kbuild_bolt.rewrite.module import SIGNATURE_MAGIC, Signing

    sign_file = build_sign_file(tmp_path / "sign-file")
    key = make_signing_key(tmp_path)
    signed = tmp_path / "loop.ko"
    result = rewrite_module(ko(kernel.modules_root, "loop"), signed,
                            RewriteOptions(reorder_blocks="random", seed=3, progress=False),
                            signing=Signing(str(key), str(key), "sha256", str(sign_file)))
    assert any("signed with" in note for note in result.module_notes)
    assert signed.read_bytes().endswith(SIGNATURE_MAGIC)
    signer = subprocess.run(["modinfo", "-F", "signer", str(signed)], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert signer == SIGNER == "kbuild-bolt test signing key"
    again = rewrite_module(signed, tmp_path / "again.ko",
                           RewriteOptions(reorder_blocks="random", seed=4, progress=False))
    assert any("signature is dropped" in note for note in again.module_notes)
    assert not (tmp_path / "again.ko").read_bytes().endswith(SIGNATURE_MAGIC)


def test_random_module_layouts_on_every_lab_kernel(lab, tmp_path):
    """Every module of each lab kernel (test_static_keys checks its static keys
    when it loads; the hardened one has IBT, retpolines and return thunks in
    module code) laid out at random: loaded at boot, KASLR on and off, with
    every trace event's static key switched on and off around the workload."""
    root = module_tree(lab, tmp_path)
    for path in root.rglob("*.ko"):
        result = rewrite_module(path, path, RewriteOptions(
            reorder_blocks="random", reorder_functions="random", split_functions=True,
            seed=5, progress=False))
        assert "verify: ok" in result.verify_summary
    initrd = initramfs_with(lab, root, tmp_path)
    for kaslr in (True, False):
        result = boot(lab.bzimage, initrd, workload="files", iterations=1, kaslr=kaslr,
                      append="kbb.events=1")
        assert result.ok and not result.problems, result.summary()
        assert "module:test_static_keys" in result.markers
