"""Benchmark: the code footprint of a workload before and after whole-kernel layout,
kbuild-bolt beside llvm-bolt-22 on the same lab vmlinux and the same profile.

    .venv/bin/python benchmarks/bench_footprint.py [--flavor 6.12-regular] [--workload files]...

For each workload: record an exact QEMU profile on the lab kernel (two runs, short
and long, subtracted: boot cancels out; the plugin also simulates a 32 KiB 8-way
L1i fed with the executed blocks), then lay the kernel out with each kbuild-bolt
configuration below and with llvm-bolt-22 (its best options that boot), boot each
result, record the same workload again and report from that trace:

- lines90 / pages90 / pages99: the 64-byte lines and 4-KiB pages holding 90% and
  99% of the kernel's instruction fetches; 2-MiB pages touched;
- L1i misses per 1000 instructions (the simulated cache);
- taken jmp/jcc executed.

The "floor" row is what no layout can beat: the workload's hottest instructions
(and whole blocks) packed densely, hottest first, from the original profile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.profile.fdata import write_fdata
from kbuild_bolt.profile.footprint import footprint
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

ITERATIONS = (2, 10)
CONFIGS = {
    "blocks (ext-TSP)": dict(reorder_blocks="ext-tsp"),
    "cdsort": dict(reorder_blocks="ext-tsp", reorder_functions="cdsort"),
    "cdsort + split": dict(reorder_blocks="ext-tsp", reorder_functions="cdsort",
                           split_functions=True),
    "hfsort + split": dict(reorder_blocks="ext-tsp", reorder_functions="hfsort",
                           split_functions=True),
}
BOLT_BASE = ["-reorder-blocks=ext-tsp", "-eliminate-unreachable=0",
             "-simplify-conditional-tail-calls=0"]
# Tried in this order; the first that runs and boots the workload is measured.
BOLT_TRIES = {
    "cdsort + split": BOLT_BASE + ["-reorder-functions=cdsort", "-split-functions"],
    "split": BOLT_BASE + ["-split-functions"],
    "blocks": BOLT_BASE,
}


def measure(vmlinux, initrd, workload, tolerate_warnings=False) -> dict:
    profile = qemu.record(vmlinux, initrd, workload=workload, iterations=ITERATIONS,
                          kaslr=False, tolerate_warnings=tolerate_warnings)
    model = BinaryModel.open(vmlinux)
    out = footprint(model, profile)
    out.update(measured_taken_branches(model, attach(model, profile)))
    return out, profile


def floor(model, cfg, profile) -> dict:
    """Lines holding 90% of fetches if the hottest code were packed densely:
    instruction by instruction, and block by block (a block cannot be cut)."""
    cp = attach(model, profile)
    count = cp.insn_count.astype(np.float64)
    size = model.insns.length.astype(np.float64)
    out = {}
    for unit in ("instructions", "blocks"):
        if unit == "instructions":
            weight, nbytes = count[count > 0], size[count > 0]
        else:
            first, end = cfg.block_first, cfg.block_end
            cs = np.concatenate([[0], np.cumsum(count)])
            bs = np.concatenate([[0], np.cumsum(size)])
            weight, nbytes = cs[end] - cs[first], bs[end] - bs[first]
            keep = weight > 0
            weight, nbytes = weight[keep], nbytes[keep]
        order = np.argsort(-(weight / nbytes), kind="stable")
        w, b = np.cumsum(weight[order]), np.cumsum(nbytes[order])
        k = int(np.searchsorted(w, 0.9 * w[-1]))
        out[unit] = int(np.ceil(b[k] / 64))
    return out


def row_text(name, m, base):
    def rel(key):
        return f"{m[key]:,} ({m[key] / base[key]:.2f}×)" if base else f"{m[key]:,}"
    l1 = f"{m['l1i_mpki']:.2f}" + (f" ({m['l1i_mpki'] / base['l1i_mpki']:.2f}×)" if base else "")
    return (f"| {name} | {rel('lines90')} | {rel('pages90')} | {rel('pages99')} | "
            f"{m['huge_pages']} | {l1} | {rel('taken_branches')} | {m.get('warnings', 0)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="6.12-regular")
    parser.add_argument("--workload", action="append")
    parser.add_argument("--keep", help="keep the kernels and profiles here")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    workloads = args.workload or ["files", "server"]
    kernel = lab_kernel(args.flavor)
    work = Path(args.keep or tempfile.mkdtemp(prefix="kbb-bench-footprint-"))
    work.mkdir(parents=True, exist_ok=True)
    bolt = shutil.which("llvm-bolt-22")
    results = {}
    for workload in workloads:
        print(f"== {args.flavor} / {workload}", flush=True)
        before, profile = measure(kernel.vmlinux, kernel.initramfs, workload)
        model = BinaryModel.open(kernel.vmlinux)
        cfg = build_cfg(model)
        rows = {"original": before}
        floors = floor(model, cfg, profile)
        print(f"original: {before}; floor {floors}", flush=True)
        for name, opts in CONFIGS.items():
            out = work / f"ours-{workload}-{name.replace(' ', '').replace('+', '-')}.vmlinux"
            t0 = time.perf_counter()
            result = rewrite(kernel.vmlinux, out, RewriteOptions(profile=profile, progress=False,
                                                                 **opts))
            seconds = time.perf_counter() - t0
            booted = boot(out, kernel.initramfs, workload=workload, iterations=3, kaslr=False)
            m, _ = measure(out, kernel.initramfs, workload)
            m.update(warnings=len(booted.problems), ok=booted.ok, seconds=round(seconds, 1),
                     moved=result.moved_functions, fragments=result.fragments)
            rows[name] = m
            print(f"{name}: {m}", flush=True)
        if bolt:
            fdata = work / f"{workload}.fdata"
            write_fdata(profile, model, fdata)
            for label, flags in BOLT_TRIES.items():
                out = work / f"bolt-{workload}-{label.replace(' ', '')}.vmlinux"
                t0 = time.perf_counter()
                proc = subprocess.run([bolt, str(kernel.vmlinux), "-o", str(out),
                                       f"-data={fdata}", *flags], capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(f"llvm-bolt-22 {label}: fails: {proc.stderr.strip()[-300:]}", flush=True)
                    continue
                booted = boot(out, kernel.initramfs, workload=workload, iterations=3,
                              kaslr=False)
                if booted.timed_out or booted.missing:
                    print(f"llvm-bolt-22 {label}: does not boot: {booted.summary()[:300]}",
                          flush=True)
                    continue
                m, _ = measure(out, kernel.initramfs, workload, tolerate_warnings=True)
                m.update(warnings=len(booted.problems), ok=booted.ok, seconds=round(seconds, 1))
                rows[f"llvm-bolt-22 ({label})"] = m
                print(f"llvm-bolt-22 {label}: {m}", flush=True)
                break
        results[workload] = {"rows": rows, "floor": floors}

    print()
    for workload, data in results.items():
        rows, base = data["rows"], data["rows"]["original"]
        print(f"{args.flavor}, {workload} (iterations {ITERATIONS[1]} - {ITERATIONS[0]}, boot "
              f"cancelled); floor for lines90: {data['floor']['instructions']:,} packing "
              f"instructions ({data['floor']['instructions'] / base['lines90']:.2f}×), "
              f"{data['floor']['blocks']:,} packing blocks "
              f"({data['floor']['blocks'] / base['lines90']:.2f}×)")
        print()
        print("| layout | lines90 | pages90 | pages99 | 2-MiB pages | L1i MPKI | taken jmp/jcc "
              "| warnings |")
        print("|---|---|---|---|---|---|---|---|")
        for name, m in rows.items():
            print(row_text(name, m, None if name == "original" else base))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
