"""Benchmark: static keys laid out by their real state, measured.

    .venv/bin/python benchmarks/bench_static_keys.py [--flavor 6.12-regular] [--workload files]

The workload runs with every trace event on (``kbb.events=1``: each tracepoint
is a static key, switched on at run time, so its sites jump where the kernel
was laid out for it being off). An exact QEMU profile of that run drives
ext-TSP twice: with static-key sites reversed where their jump side follows
them (the default) and without. Each result is booted, the same run profiled
again, and the taken jmp/jcc it executes counted, beside the prediction.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

ITERATIONS = (2, 10)
EVENTS = "kbb.events=1"


def measure(vmlinux, initrd, workload):
    profile = qemu.record(vmlinux, initrd, workload=workload, iterations=ITERATIONS,
                          kaslr=False, append=EVENTS)
    model = BinaryModel.open(vmlinux)
    return measured_taken_branches(model, attach(model, profile))["taken_branches"], profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="6.12-regular")
    parser.add_argument("--workload", default="files")
    args = parser.parse_args()
    kernel = lab_kernel(args.flavor)
    work = Path(tempfile.mkdtemp(prefix="kbb-bench-keys-"))
    before, profile = measure(kernel.vmlinux, kernel.initramfs, args.workload)
    rows = []
    for label, reverse in (("ext-TSP, static keys as built", False),
                           ("ext-TSP, static keys by their real state", True)):
        out = work / f"vmlinux-{reverse}"
        result = rewrite(kernel.vmlinux, out, RewriteOptions(
            reorder_blocks="ext-tsp", profile=profile, progress=False, strip_debug=True,
            dyno_stats=True, reverse_static_keys=reverse))
        outcome = boot(out, kernel.initramfs, workload=args.workload, iterations=3,
                       kaslr=False, append=EVENTS)
        after, _ = measure(out, kernel.initramfs, args.workload)
        rows.append((label, after, result.predicted_taken_change(),
                     result.static_keys_reversed, len(outcome.problems), outcome.ok))
        print(rows[-1], flush=True)
    print()
    print(f"Lab kernel {args.flavor}, {args.workload} workload with every trace event on, "
          f"iterations {ITERATIONS[1]} - {ITERATIONS[0]}: taken jmp/jcc executed in the kernel "
          f"(before: {before:,})")
    print()
    print("| layout | measured | predicted | sites reversed | boot |")
    print("|---|---|---|---|---|")
    for label, after, predicted, reversed_sites, problems, ok in rows:
        print(f"| {label} | {after:,} ({100 * (after / before - 1):+.1f}%) | "
              f"{100 * predicted:+.1f}% | {reversed_sites:,} | "
              f"{'clean' if ok and not problems else f'{problems} problems'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
