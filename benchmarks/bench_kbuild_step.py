"""Benchmark: the Kbuild step with a profile, beside llvm-bolt-22, on the lab kernels.

    .venv/bin/python benchmarks/bench_kbuild_step.py [--flavor 6.12-regular]... [--repeat 3]

For each lab kernel and its `files` profile (recorded once and cached, as
bench_stale records it), in the same run, best of ``--repeat``:

- `kbuild-bolt rewrite` as `make CONFIG_BOLT=y` runs it (ext-TSP blocks, cdsort
  functions, hot/cold split, indirect-call promotion, verification), the first
  time (nothing kept) and again on the same vmlinux (its analysis kept in the
  cache directory, as the build tree's .kbuild-bolt/ keeps it);
- the same with blocks only (what llvm-bolt-22 can do to a kernel);
- llvm-bolt-22 with the same profile as .fdata and its booting options
  (`-reorder-blocks=ext-tsp -eliminate-unreachable=0
  -simplify-conditional-tail-calls=0`; lite mode, its default: only the
  functions the profile saw are rewritten).

Wall time and two peaks of memory (see measure.py): the largest process's RSS
(a forked child counts the pages it shares with its parent) and the whole
process tree's at once (the sum of its processes' PSS, sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kbuild_bolt.lab.kernels import lab_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stale import recording  # noqa: E402
from measure import best_of  # noqa: E402

KBUILD = ["--reorder-blocks=ext-tsp", "--reorder-functions=cdsort", "--split-functions"]
BOLT_FLAGS = ["-reorder-blocks=ext-tsp", "-eliminate-unreachable=0",
              "-simplify-conditional-tail-calls=0"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", action="append")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bolt = shutil.which("llvm-bolt-22")
    kbb = [str(Path(sys.executable).parent / "kbuild-bolt")]
    # Bytecode as an installed package has it: a shell with PYTHONDONTWRITEBYTECODE
    # would otherwise time compiling every changed module at each start.
    import kbuild_bolt
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    str(Path(kbuild_bolt.__file__).parent)], check=True, capture_output=True)
    rows = []
    for flavor in args.flavor or ["6.12-regular", "6.12-hardened", "6.1-regular"]:
        kernel = lab_kernel(flavor)
        work = Path(tempfile.mkdtemp(prefix="kbb-bench-kbuild-"))
        profile = recording(kernel, kernel.vmlinux, "files", "original")
        prof = work / "files.kbb"
        from kbuild_bolt.profile.model import write_profile
        write_profile(profile, prof)
        fdata = work / "files.fdata"
        # (in a process of its own: a child forked from a big parent would count
        # the parent's pages in its peak RSS)
        subprocess.run(kbb + ["profile", "convert", str(prof), "--vmlinux", str(kernel.vmlinux),
                              "--to", "fdata", "-o", str(fdata)], check=True,
                       capture_output=True)
        del profile
        cache = work / "cache"
        base = kbb + ["rewrite", str(kernel.vmlinux), "-o", str(work / "out"), "--profile",
                      str(prof), "-q"]
        cases = [
            ("kbuild-bolt, Kbuild's layout, first run", base + KBUILD, None),
            ("kbuild-bolt, Kbuild's layout, analysis kept", base + KBUILD
             + ["--cache-dir", str(cache)], cache),
            ("kbuild-bolt, blocks only, first run", base + ["--reorder-blocks=ext-tsp"], None),
            ("kbuild-bolt, blocks only, analysis kept", base + ["--reorder-blocks=ext-tsp",
                                                                "--cache-dir", str(cache)],
             cache),
        ]
        if bolt:
            cases.append(("llvm-bolt-22 (blocks, booting options)",
                          [bolt, str(kernel.vmlinux), "-o", str(work / "bolt.out"),
                           f"-data={fdata}", *BOLT_FLAGS], None))
        for label, command, kept in cases:
            if kept is not None:
                best_of(command, 1)          # (the first run keeps the analysis)
            run = best_of(command, args.repeat)
            rows.append((flavor, label, run.seconds, run.peak_rss_mb, run.peak_tree_mb))
            print(rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| kernel | command | wall time | peak RSS (largest process) | peak memory (tree, PSS) |")
    print("|---|---|---|---|---|")
    for flavor, label, seconds, rss, tree in rows:
        print(f"| {flavor} | {label} | {seconds:.2f} s | {rss:,.0f} MB | {tree:,.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
