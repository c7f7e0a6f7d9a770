"""Benchmark: modules laid out with the same profile as vmlinux (issue 15).

    .venv/bin/python benchmarks/bench_modules.py [--iterations 3]

On the 6.12-modules lab kernel, the `disk` workload (ext4 on a loop device
backed by tmpfs; both are modules) is recorded exactly under QEMU, with KASLR,
module code kept as (module, section, offset). Then:

1. vmlinux alone is rewritten as `make CONFIG_BOLT=y` does (ext-TSP blocks,
   cdsort functions, hot/cold split, indirect-call promotion);
2. vmlinux and every module the profile saw are rewritten, the modules with
   ext-TSP blocks only (cold blocks in the room the rewrite gives their .text);
3. the same with the modules' functions ordered too (cdsort) and split into hot
   and cold parts, as `make CONFIG_BOLT=y modules_install` does.

Each is booted as a bzImage with KASLR (checked for warnings) and re-recorded.
Counted from the recordings: taken jmp/jcc in vmlinux, in module code and in
both (the whole kernel), the share of instructions in modules, and the module
code's footprint (64-byte lines and 4-KiB pages holding 99% of its fetches,
at the offsets the loader gives each code section). Also the time
each module's rewrite takes, and its size before and after.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.lab.initramfs import build_lab_initramfs
from kbuild_bolt.lab.kernels import LAB_MODULES, lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.profile.modules import module_shares
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.context import RewriteOptions
from kbuild_bolt.rewrite.engine import rewrite
from kbuild_bolt.rewrite.module import (
    measured_module_footprint, measured_module_taken, rewrite_module,
)


def ko(root: Path, name: str) -> Path:
    return next(root.rglob(f"{name}.ko"))


def counted(vmlinux, modules_root, profile, names) -> dict:
    model = BinaryModel.open(vmlinux)
    kernel = measured_taken_branches(model, attach(model, profile))["taken_branches"]
    modules = sum(measured_module_taken(ko(modules_root, m), profile)["taken_branches"]
                  for m in names)
    footprints = [measured_module_footprint(ko(modules_root, m), profile) for m in names]
    return dict(vmlinux=kernel, modules=modules, whole=kernel + modules,
                share=module_shares(profile)[1],
                lines99=sum(f["lines99"] for f in footprints),
                pages99=sum(f["pages99"] for f in footprints))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    kernel = lab_kernel("6.12-modules")
    work = Path(tempfile.mkdtemp(prefix="kbb-bench-modules-"))
    try:
        def record(bzimage, vmlinux, initrd, tree):
            return qemu.record(bzimage, initrd, "disk", args.iterations, kaslr=True,
                               vmlinux=vmlinux, modules_tree=tree)

        before = record(kernel.bzimage, kernel.vmlinux, kernel.initramfs, kernel.modules_root)
        names = before.modules
        rows = [("original", counted(kernel.vmlinux, kernel.modules_root, before, names),
                 "clean")]
        out = work / "vmlinux"
        rewrite(kernel.vmlinux, out, RewriteOptions(
            profile=before, progress=False, reorder_blocks="ext-tsp",
            reorder_functions="cdsort", split_functions=True))
        bzimage = rebuild_bzimage(kernel.build_dir, out, work / "bzImage")
        kernels = [("vmlinux laid out", kernel.modules_root, kernel.initramfs)]
        sizes = []
        for label, functions in (("vmlinux and modules' blocks laid out", "none"),
                                 ("vmlinux and modules laid out (blocks, function order, "
                                  "hot/cold split)", "cdsort")):
            tree = work / f"modules-{functions}"
            shutil.copytree(kernel.modules_root, tree, symlinks=True)
            for name in names:
                path = ko(tree, name)
                started = time.perf_counter()
                size = path.stat().st_size
                result = rewrite_module(path, path, RewriteOptions(
                    profile=before, progress=False, reorder_blocks="ext-tsp",
                    reorder_functions=functions, split_functions=functions != "none"))
                sizes.append((f"{name} ({'blocks' if functions == 'none' else 'all'})",
                              time.perf_counter() - started, size, path.stat().st_size,
                              result.rewritten, result.moved_functions, result.fragments))
            initrd = work / f"initramfs-{functions}.cpio.gz"
            build_lab_initramfs(initrd, modules_root=tree, release=kernel.release,
                                modules=LAB_MODULES)
            kernels.append((label, tree, initrd))
        for label, modules_root, ramfs in kernels:
            outcome = boot(bzimage, ramfs, workload="disk", iterations=2, kaslr=True)
            after = record(bzimage, out, ramfs, modules_root)
            rows.append((label, counted(out, modules_root, after, names),
                         "clean" if outcome.ok and not outcome.problems
                         else f"{len(outcome.problems)} problems"))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][1]
    print()
    print(f"`disk` workload on 6.12-modules, {args.iterations} iterations, KASLR; modules "
          f"{', '.join(names)}: {100 * base['share']:.1f}% of the kernel's instructions")
    print()
    print("| kernel | taken jmp/jcc in vmlinux | in modules | whole kernel | module lines "
          "(99%) | module pages (99%) | boot |")
    print("|---|---|---|---|---|---|---|")
    for label, c, booted in rows:
        def rel(key):
            return f"{c[key]:,} ({c[key] / base[key]:.2f}x)"
        print(f"| {label} | {rel('vmlinux')} | {rel('modules')} | {rel('whole')} | "
              f"{rel('lines99')} | {rel('pages99')} | {booted} |")
    print()
    print("| module (layout) | rewrite | size before | after | functions rewritten | "
          "placed anew | cold parts |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, a, b, n, moved, cold in sizes:
        print(f"| {name} | {seconds:.2f} s | {a:,} | {b:,} | {n:,} | {moved:,} | {cold:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
