"""Benchmark: measured taken branches of a workload before and after, kbuild-bolt
ext-TSP beside llvm-bolt-22 ext-TSP on the same lab vmlinux and the same profile.

    .venv/bin/python benchmarks/bench_layout.py [--flavor 6.12-regular] [--workload files]...

For each workload: record an exact QEMU profile of the workload on the lab
kernel (two runs, short and long, subtracted: boot cancels out), then
- kbuild-bolt: ``rewrite --reorder-blocks=ext-tsp`` with it;
- BOLT 22: the same profile written as .fdata, ``llvm-bolt-22 -data=...
  -reorder-blocks=ext-tsp`` with the two options its kernel needs to boot
  (``-eliminate-unreachable=0 -simplify-conditional-tail-calls=0``);
boot each result (PVH vmlinux, nokaslr: BOLT's output has no relocations left
for a KASLR bzImage), count its kernel warnings, record the same workload again
and count the taken jumps it executes. Prints a Markdown table for
benchmarks/RESULTS.md, plus the profile aggregation and ext-TSP timings.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.profile.fdata import write_fdata
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import time_exttsp  # noqa: E402

ITERATIONS = (2, 10)
BOLT_FLAGS = ["-reorder-blocks=ext-tsp", "-eliminate-unreachable=0",
              "-simplify-conditional-tail-calls=0", "-dyno-stats"]


def measure(vmlinux: Path, initrd: Path, workload: str, tolerate_warnings=False) -> dict:
    profile = qemu.record(vmlinux, initrd, workload=workload, iterations=ITERATIONS, kaslr=False,
                          tolerate_warnings=tolerate_warnings)
    model = BinaryModel.open(vmlinux)
    return measured_taken_branches(model, attach(model, profile)), profile


def bolt_taken_prediction(output: str) -> tuple[int, int] | None:
    """BOLT's dyno-stats 'taken branches' row: (before, after)."""
    m = re.search(r"^\s*(\d+) : taken branches \(([-+\d.]+)%\)", output, re.M)
    rows = re.findall(r"^\s*(\d+)\s*:\s*taken branches", output, re.M)
    if len(rows) >= 2:
        return int(rows[0]), int(rows[1])
    return None if not m else (int(m.group(1)), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="6.12-regular")
    parser.add_argument("--workload", action="append")
    parser.add_argument("--keep", help="keep the kernels and profiles here")
    parser.add_argument("--no-bolt", action="store_true",
                        help="kbuild-bolt only (its prediction against its measurement)")
    args = parser.parse_args()
    workloads = args.workload or ["files", "server"]
    kernel = lab_kernel(args.flavor)
    work = Path(args.keep or tempfile.mkdtemp(prefix="kbb-bench-layout-"))
    work.mkdir(parents=True, exist_ok=True)
    bolt = None if args.no_bolt else shutil.which("llvm-bolt-22")
    rows = []
    for workload in workloads:
        print(f"== {args.flavor} / {workload}", flush=True)
        before, profile = measure(kernel.vmlinux, kernel.initramfs, workload)
        model = BinaryModel.open(kernel.vmlinux)
        cfg = build_cfg(model)
        t0 = time.perf_counter()
        attach(model, profile)
        attach_s = time.perf_counter() - t0
        records = len(profile.range_start) + len(profile.src)
        print(f"profile: {records:,} records ({profile.total:,} block executions) attached in "
              f"{attach_s:.2f} s ({records / attach_s:,.0f} records/s)", flush=True)

        hot, layout_s = time_exttsp(model, cfg, profile)
        print(f"ext-TSP: {hot:,} profiled functions laid out in {layout_s:.2f} s (one core)",
              flush=True)

        ours_out = work / f"ours-{workload}.vmlinux"
        t0 = time.perf_counter()
        result = rewrite(kernel.vmlinux, ours_out, RewriteOptions(
            reorder_blocks="ext-tsp", profile=profile, progress=False, dyno_stats=True))
        rewrite_s = time.perf_counter() - t0
        ours_boot = boot(ours_out, kernel.initramfs, workload=workload, iterations=3, kaslr=False)
        ours_after, after_profile = measure(ours_out, kernel.initramfs, workload)
        if args.keep:
            from kbuild_bolt.profile.model import write_profile
            write_profile(profile, work / f"before-{workload}.kbb")
            write_profile(after_profile, work / f"ours-{workload}.kbb")
        predicted = result.predicted_taken_change()
        row = {
            "workload": workload, "before": before["taken_branches"],
            "ours": ours_after["taken_branches"], "ours_pred": predicted,
            "ours_warn": len(ours_boot.problems), "ours_s": rewrite_s,
            "layout_s": layout_s, "attach_s": attach_s, "records": records,
            "rewritten": result.rewritten,
        }
        if bolt:
            fdata = work / f"{workload}.fdata"
            write_fdata(profile, model, fdata)
            bolt_out = work / f"bolt-{workload}.vmlinux"
            t0 = time.perf_counter()
            proc = subprocess.run([bolt, str(kernel.vmlinux), "-o", str(bolt_out),
                                   f"-data={fdata}", *BOLT_FLAGS], capture_output=True, text=True)
            row["bolt_s"] = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                row["bolt"] = None
            else:
                pred = bolt_taken_prediction(proc.stdout + proc.stderr)
                row["bolt_pred"] = pred[1] / pred[0] - 1 if pred and pred[0] else None
                bolt_boot = boot(bolt_out, kernel.initramfs, workload=workload, iterations=3,
                                 kaslr=False)
                row["bolt_warn"] = len(bolt_boot.problems)
                row["bolt_ok"] = bolt_boot.ok
                # BOLT's kernel may warn (stale retpoline/return sites): measure it anyway.
                after, _ = measure(bolt_out, kernel.initramfs, workload, tolerate_warnings=True)
                row["bolt"] = after["taken_branches"]
        rows.append(row)
        print(row, flush=True)

    print()
    print(f"Lab kernel {args.flavor}, workload iterations {ITERATIONS[1]} - {ITERATIONS[0]} "
          f"(boot cancelled), taken jmp/jcc executed in the kernel:")
    print()
    print("| workload | before | kbuild-bolt ext-TSP (measured) | predicted | warnings | "
          "llvm-bolt-22 ext-TSP (measured) | predicted | warnings |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = f"{r['ours']:,} ({100 * (r['ours'] / r['before'] - 1):+.1f}%)"
        if r.get("bolt"):
            theirs = f"{r['bolt']:,} ({100 * (r['bolt'] / r['before'] - 1):+.1f}%)"
            tp = f"{100 * r['bolt_pred']:+.1f}%" if r.get("bolt_pred") is not None else "n/a"
            tw = str(r["bolt_warn"])
        else:
            theirs, tp, tw = "n/a", "n/a", "n/a"
        print(f"| {r['workload']} | {r['before']:,} | {ours} | {100 * r['ours_pred']:+.1f}% | "
              f"{r['ours_warn']} | {theirs} | {tp} | {tw} |")
    print()
    for r in rows:
        print(f"{r['workload']}: kbuild-bolt rewrite {r['ours_s']:.1f} s (ext-TSP layout "
              f"{r['layout_s']:.1f} s, {r['rewritten']:,} functions)"
              + (f"; llvm-bolt-22 {r['bolt_s']:.1f} s" if "bolt_s" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
