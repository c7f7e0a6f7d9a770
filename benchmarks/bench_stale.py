"""Benchmark: stale profiles, a profile of build A applied to build B, measured.

    .venv/bin/python benchmarks/bench_stale.py [--pair FROM:TO]... [--workload files]

A kernel is a lab flavor, optionally at another Debian version of its source
package (``6.12-regular@6.12.115-2~deb12u1``: an update of the same config,
downloaded and built on first use). For each pair the workload is recorded
exactly (QEMU, between the lab /init's loop markers) on both kernels; then B is
rewritten with the layout ``make CONFIG_BOLT=y`` uses (ext-TSP blocks, cdsort
functions, hot/cold split, indirect-call promotion):

- with A's profile (stale: moved onto B by matching functions and blocks),
- with B's own profile (exact: what a fresh profile would give),

each output is booted with KASLR (a bzImage from the tree's relocs tool),
checked for warnings, and the workload recorded on it again. Counted from
those recordings: taken jmp/jcc, executed jmp/jcc, executed instructions.
The goal: the stale row never worse than B unoptimized, and most of the exact
row's gain where the code did not change.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.cache import cache_root
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.dyno import measured_taken_branches
from kbuild_bolt.profile.model import read_profile, write_profile
from kbuild_bolt.profile import stale
from kbuild_bolt.profile.stale import describe_build
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

ITERATIONS = 8
DEFAULT_PAIRS = [
    "6.12-hardened:6.12-regular",                 # another config of the same source
    "6.12-regular:6.12-hardened",
    "6.12-regular@6.12.115-2~deb12u1:6.12-regular",   # an update (stable fixes in between)
    "6.12-regular:6.12-regular@6.12.115-2~deb12u1",
]


def kernel_of(spec: str):
    flavor, _, version = spec.partition("@")
    return lab_kernel(flavor, source_version=version or None)


def counted(vmlinux: Path, profile) -> dict[str, int]:
    """Taken jmp/jcc, executed jmp/jcc and instructions of a recording."""
    model = BinaryModel.open(vmlinux)
    cp = attach(model, profile)
    taken = measured_taken_branches(model, cp)
    flow = model.insns.flow
    jumps = np.isin(flow, (x86.JMP, x86.JCC, x86.IND_JMP))
    return {"taken": taken["taken_branches"],
            "jumps": int(cp.insn_count[jumps].sum()),
            "instructions": taken["executed_instructions"]}


def recording(kernel, vmlinux: Path, workload: str, name: str):
    """The workload's exact profile on ``vmlinux``, cached for the kernel's own
    build; with its functions' shapes, as `kbuild-bolt profile record` writes it
    (what lets another build use it)."""
    cache = cache_root() / "bench" / f"stale-{workload}-{name}-{kernel.root.name}.kbb"
    if name == "original" and cache.exists():
        profile = read_profile(cache)
        if profile.shapes and profile.build_id:
            return profile
    else:
        profile = qemu.record(vmlinux, kernel.initramfs, workload=workload,
                              iterations=ITERATIONS, kaslr=False, vmlinux=vmlinux)
    if name == "original":
        model = BinaryModel.open(vmlinux)
        profile.kernel = model.version.release
        describe_build(profile, model, build_cfg(model))
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_profile(profile, cache)
    return profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", action="append", help="FROM:TO kernels (see the docstring)")
    parser.add_argument("--workload", default="files")
    parser.add_argument("--min-matched-share", type=float,
                        help="try another threshold of stale matching (default: "
                        f"{stale.MIN_MATCHED_SHARE})")
    parser.add_argument("--stale-only", action="store_true",
                        help="skip the exact-profile rows (when trying thresholds)")
    args = parser.parse_args()
    if args.min_matched_share is not None:
        stale.MIN_MATCHED_SHARE = args.min_matched_share
    work = Path(tempfile.mkdtemp(prefix="kbb-bench-stale-"))
    rows = []
    for pair in args.pair or DEFAULT_PAIRS:
        source_spec, target_spec = pair.split(":")
        source, target = kernel_of(source_spec), kernel_of(target_spec)
        theirs = recording(source, source.vmlinux, args.workload, "original")
        exact = recording(target, target.vmlinux, args.workload, "original")
        base = counted(target.vmlinux, exact)
        print(f"== {source_spec} -> {target_spec}: original {base}", flush=True)
        for label, profile in (("stale", theirs), ("exact", exact))[:1 if args.stale_only else 2]:
            out = work / f"vmlinux-{label}"
            result = rewrite(target.vmlinux, out, RewriteOptions(
                profile=profile, progress=False, reorder_blocks="ext-tsp",
                reorder_functions="cdsort", split_functions=True))
            bzimage = rebuild_bzimage(target.build_dir, out, work / "bzImage")
            outcome = boot(bzimage, target.initramfs, workload=args.workload, iterations=2,
                           kaslr=True)
            after = counted(out, recording(target, out, args.workload, label))
            row = dict(pair=pair, label=label, base=base, after=after,
                       applied=result.profile_applied or "exact (this kernel's own)",
                       boot="clean" if outcome.ok and not outcome.problems
                       else f"{len(outcome.problems)} problems")
            print(row, flush=True)
            rows.append(row)
            out.unlink()
    print()
    print(f"`{args.workload}` workload, {ITERATIONS} iterations recorded between the lab /init's "
          "loop markers; B's layout: ext-TSP + cdsort + split + ICP; stale matching applies a "
          f"changed function from {100 * stale.MIN_MATCHED_SHARE:.0f}% matched; "
          "change against B unoptimized:")
    print()
    print("| profile of | applied to | profile | counts used | taken jmp/jcc | executed jmp/jcc "
          "| instructions | boot (KASLR) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["pair"].split(":")
        ch = {k: 100 * (r["after"][k] / r["base"][k] - 1) for k in r["base"]}
        print(f"| {a} | {b} | {r['label']} | {r['applied']} | {ch['taken']:+.1f}% | "
              f"{ch['jumps']:+.1f}% | {ch['instructions']:+.1f}% | {r['boot']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
