"""Benchmark: rewrite Debian's distro vmlinux, beside llvm-bolt-22, in the same run.

    .venv/bin/python benchmarks/bench_rewrite.py [--repeat N] [--vmlinux PATH]

kbuild-bolt: ``rewrite --reorder-blocks=random`` (moves nearly every block of
every function), and the whole-kernel layout on top of it
(``--reorder-functions=random --split-functions``: every movable function placed
anew, split, kallsyms and .symtab rebuilt: the most work), each with its DWARF
updated (the default) and with ``--strip-debug``; the whole layout also without
verification. llvm-bolt-22 refuses function reordering and splitting on a
kernel ("function reordering only works when relocations are enabled"; "split
functions require reserved space in the Linux kernel binary"), so its block
rewrite is the comparison.
llvm-bolt-22: ``-reorder-blocks=none -lite=0`` (BOLT rewrites every function it
can, keeping their order), the closest to the same amount of work it offers;
also its booting option set from ../shared/KERNEL-LAB.md, and
``-update-debug-sections`` (its DWARF update, the peer of kbuild-bolt's
default). Wall time and peak RSS
of each whole process tree; prints Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import best_of  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vmlinux", help="default: Debian's distro vmlinux from the lab cache")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.vmlinux:
        vmlinux = args.vmlinux
    else:
        from kbuild_bolt.lab.distro import distro_kernel
        vmlinux = str(distro_kernel().vmlinux)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kbb-bench-rewrite-") as tmp:
        out = os.path.join(tmp, "out")
        kbb = [sys.executable, "-m", "kbuild_bolt", "rewrite", vmlinux, "-o", out,
               "--reorder-blocks=random", "--seed=1"]
        whole = ["--reorder-functions=random", "--split-functions"]
        for label, extra in (("kbuild-bolt rewrite --reorder-blocks=random", []),
                             ("kbuild-bolt rewrite --reorder-blocks=random --strip-debug",
                              ["--strip-debug"]),
                             ("kbuild-bolt rewrite --reorder-blocks=random "
                              "--reorder-functions=random --split-functions", whole),
                             ("kbuild-bolt rewrite --reorder-blocks=random "
                              "--reorder-functions=random --split-functions --strip-debug",
                              whole + ["--strip-debug"]),
                             ("kbuild-bolt rewrite --reorder-blocks=random "
                              "--reorder-functions=random --split-functions --no-verify",
                              whole + ["--no-verify"])):
            run = best_of(kbb + extra, args.repeat)
            m = re.search(r"rewritten\s+([\d,]+)\s+\(([\d.]+)% of .text handled\)", run.output)
            detail = f"{m.group(1)} functions rewritten ({m.group(2)}% of .text)" if m else ""
            placed = re.search(r"functions placed anew: ([\d,]+)", run.output)
            split = re.search(r"cold parts: ([\d,]+) functions", run.output)
            if placed:
                detail += f", {placed.group(1)} placed anew"
            if split:
                detail += f", {split.group(1)} split"
            steps = re.search(r"^time: (.*)$", run.output, re.M)
            rows.append((label, run, detail + (f"; {steps.group(1)}" if steps else "")))
            print(f"{label}: {run.seconds} s, {run.peak_rss_mb} MB  {rows[-1][2]}", flush=True)
        bolt = shutil.which("llvm-bolt-22")
        if bolt:
            for label, flags in (
                    ("llvm-bolt-22 -reorder-blocks=none -lite=0", ["-reorder-blocks=none",
                                                                   "-lite=0"]),
                    ("llvm-bolt-22 (booting set: + -simplify-conditional-tail-calls=0 "
                     "-eliminate-unreachable=0)",
                     ["-reorder-blocks=none", "-lite=0", "-simplify-conditional-tail-calls=0",
                      "-eliminate-unreachable=0"]),
                    ("llvm-bolt-22 -reorder-blocks=none -lite=0 -update-debug-sections",
                     ["-reorder-blocks=none", "-lite=0", "-update-debug-sections"])):
                run = best_of([bolt, vmlinux, "-o", out, *flags], args.repeat)
                m = re.search(r"(\d+) out of (\d+) functions were overwritten", run.output)
                detail = f"{m.group(1)} of {m.group(2)} functions overwritten" if m else ""
                rows.append((label, run, detail))
                print(f"{label}: {run.seconds} s, {run.peak_rss_mb} MB  {detail}", flush=True)
    print()
    print(f"{time.strftime('%Y-%m-%d')}, {Path(vmlinux).name}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}:")
    print()
    print("| command | wall time | peak RSS | notes |")
    print("|---|---|---|---|")
    for label, run, detail in rows:
        print(f"| `{label}` | {run.seconds} s | {run.peak_rss_mb:,.0f} MB | {detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
