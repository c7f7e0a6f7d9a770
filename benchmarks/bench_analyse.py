"""Benchmark: read + decode + CFG + cross-check Debian's distro vmlinux, beside llvm-bolt-22.

    .venv/bin/python benchmarks/bench_analyse.py [--repeat N] [--vmlinux PATH]

``kbuild-bolt info --json`` does the whole analysis (symbols, every table,
decoding every function in parallel, CFGs, the table cross-check). BOLT has no
analysis-only mode; ``llvm-bolt-22 -o /dev/null`` is the closest (it also
rewrites). Results go to stdout as a Markdown table row to record in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.vmlinux:
        vmlinux = args.vmlinux
    else:
        from kbuild_bolt.lab.distro import distro_kernel
        vmlinux = str(distro_kernel().vmlinux)

    ours = best_of([sys.executable, "-m", "kbuild_bolt", "info", "--json", vmlinux], args.repeat)
    report = json.loads(ours.output[ours.output.index("{"):])
    a = report["analysis"]
    print(f"kbuild-bolt info (analysis): {ours.seconds} s, {ours.peak_rss_mb} MB peak RSS; "
          f"{a['instructions']:,} instructions, {a['blocks']:,} blocks, "
          f"steps {a['seconds']}")
    bolt = shutil.which("llvm-bolt-22")
    bolt_cell = "n/a (llvm-bolt-22 not installed)"
    if bolt:
        with tempfile.TemporaryDirectory() as tmp:
            run = best_of([bolt, vmlinux, "-o", os.path.join(tmp, "out")], args.repeat)
        bolt_cell = f"{run.seconds} s, {run.peak_rss_mb} MB"
        print(f"llvm-bolt-22 (default options): {bolt_cell}")
    print()
    print("| date | input | kbuild-bolt info (decode+CFG+cross-check) | llvm-bolt-22 | machine |")
    print("|---|---|---|---|---|")
    print(f"| {time.strftime('%Y-%m-%d')} | {Path(vmlinux).name} ({report['functions']['.text']:,} "
          f"functions) | {ours.seconds} s, {ours.peak_rss_mb} MB | {bolt_cell} | "
          f"{os.cpu_count()} cores, {platform.python_version()} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
