"""Benchmark: indirect-call promotion, measured.

    .venv/bin/python benchmarks/bench_icp.py [--flavor 6.12-hardened] [--workload files]...

For each workload an exact QEMU profile of the lab kernel drives the layout
``make CONFIG_BOLT=y`` uses (ext-TSP blocks, cdsort functions, hot/cold split)
twice: without indirect-call promotion and with it (the default). Each result
is booted with KASLR (a bzImage made by the tree's own relocs tool from the
output: the cmp immediates carry R_X86_64_32S) and checked for kernel
warnings; then the same workload is profiled again
(KASLR off) and counted: indirect calls executed (through a register, memory
or a retpoline thunk; paravirt sites, patched into direct calls at boot, are
not counted) and taken jmp/jcc.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach, executed_indirect_calls
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

ITERATIONS = (2, 10)


def measure(vmlinux, initrd, workload, repeat=1):
    """(taken jmp/jcc, indirect calls, first profile), the counts averaged over
    ``repeat`` runs: the kernel's own behaviour (lock contention, page allocator
    paths, timer ticks under TCG) moves the taken count by a few tenths of a
    percent from one run, or one build, to the next."""
    model = BinaryModel.open(vmlinux)
    taken, calls, first = [], [], None
    for _ in range(repeat):
        profile = qemu.record(vmlinux, initrd, workload=workload, iterations=ITERATIONS,
                              kaslr=False)
        cp = attach(model, profile)
        taken.append(measured_taken_branches(model, cp)["taken_branches"])
        calls.append(executed_indirect_calls(model, cp))
        first = first or profile
    return round(sum(taken) / repeat), round(sum(calls) / repeat), first, \
        (max(taken) - min(taken)) / (sum(taken) / repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="6.12-hardened")
    parser.add_argument("--workload", action="append")
    parser.add_argument("--blocks-only", action="store_true",
                        help="ext-TSP blocks only (functions stay in place)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measure each kernel this many times (the mean is shown)")
    args = parser.parse_args()
    workloads = args.workload or ["files", "server"]
    kernel = lab_kernel(args.flavor)
    work = Path(tempfile.mkdtemp(prefix="kbb-bench-icp-"))
    layout = dict(reorder_blocks="ext-tsp") if args.blocks_only else dict(
        reorder_blocks="ext-tsp", reorder_functions="cdsort", split_functions=True)
    table = []
    for workload in workloads:
        taken0, calls0, profile, spread0 = measure(kernel.vmlinux, kernel.initramfs, workload,
                                                   args.repeat)
        print(f"== {args.flavor} / {workload}: taken {taken0:,}, indirect calls {calls0:,}",
              flush=True)
        for label, icp in (("without promotion", "none"), ("with promotion", "calls")):
            out = work / f"vmlinux-{workload}-{icp}"
            result = rewrite(kernel.vmlinux, out, RewriteOptions(
                profile=profile, progress=False, strip_debug=True, dyno_stats=True,
                indirect_call_promotion=icp, **layout))
            # (a bzImage made by the tree's own relocs tool from the output: KASLR)
            bzimage = rebuild_bzimage(kernel.build_dir, out, work / "bzImage")
            outcome = boot(bzimage, kernel.initramfs, workload=workload, iterations=3,
                           kaslr=True)
            assert outcome.kaslr, outcome.summary()
            taken, calls, _, spread = measure(out, kernel.initramfs, workload, args.repeat)
            row = (workload, label, taken0, taken, calls0, calls, result.calls_promoted[0],
                   result.predicted_taken_change(), len(outcome.problems), outcome.ok, spread)
            print(row, flush=True)
            table.append(row)
            out.unlink()
    print()
    print(f"Lab kernel {args.flavor}, {ITERATIONS[1] - ITERATIONS[0]} iterations recorded between "
          f"the lab /init's workload markers, "
          f"{'ext-TSP blocks' if args.blocks_only else 'ext-TSP + cdsort + split'}, "
          f"each kernel measured {args.repeat} times (mean; spread: max - min):")
    print()
    print("| workload | layout | taken jmp/jcc (spread) | predicted | indirect calls "
          "| sites promoted | boot (KASLR) |")
    print("|---|---|---|---|---|---|---|")
    for (workload, label, taken0, taken, calls0, calls, sites, predicted, problems,
         ok, spread) in table:
        print(f"| {workload} | {label} | {taken:,} ({100 * (taken / taken0 - 1):+.1f}%; "
              f"{100 * spread:.1f}%) | {100 * predicted:+.1f}% | {calls:,} "
              f"({100 * (calls / max(calls0, 1) - 1):+.1f}%) | {sites:,} | "
              f"{'clean' if ok and not problems else f'{problems} problems'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
