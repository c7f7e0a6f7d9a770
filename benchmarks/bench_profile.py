"""Benchmark: profile aggregation throughput and ext-TSP time on a whole lab kernel.

    .venv/bin/python benchmarks/bench_profile.py [--flavor 6.12-regular] [--samples N]

perf brstack input is made from an exact QEMU profile of the lab kernel's
``files`` workload (this machine has no LBR): N samples of 32 branch records,
each record a real kernel transfer drawn in proportion to its count, chained the
way LBR stacks are (newest first), in ``perf script -F pid,ip,brstack`` syntax,
with a KASLR offset. Measured: reading it (``read_perf_script``), attaching the
result to the kernel's code (``attach``), and ext-TSP for every profiled
function (one core; ``rewrite`` runs it in parallel per function).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach
from kbuild_bolt.profile.perf import read_perf_script

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import time_exttsp  # noqa: E402

KASLR = 0x1E00000


def synthetic_brstack(profile, samples: int, path: str, seed: int = 7) -> int:
    rng = np.random.default_rng(seed)
    weights = profile.count / profile.count.sum()
    picks = rng.choice(len(profile.src), size=(samples, 32), p=weights)
    src = profile.src[picks] + np.uint64(KASLR)
    dst = profile.dst[picks] + np.uint64(KASLR)
    with open(path, "w") as f:
        for s in range(samples):
            recs = " ".join(f"0x{a:x}/0x{b:x}/P/-/-/0" for a, b in zip(src[s], dst[s]))
            f.write(f"  1234 {int(src[s][0]):x} {recs}\n")
    return os.path.getsize(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="6.12-regular")
    parser.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    kernel = lab_kernel(args.flavor)
    model = BinaryModel.open(kernel.vmlinux)
    cfg = build_cfg(model)
    exact = qemu.record(kernel.vmlinux, kernel.initramfs, workload="files", iterations=(2, 10),
                        kaslr=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "perf.txt")
        size = synthetic_brstack(exact, args.samples, path)
        text = int(model.image.symbols.address("_text"))
        t0 = time.perf_counter()
        profile = read_perf_script(path, text_base=text + KASLR, vmlinux_text=text)
        read_s = time.perf_counter() - t0
    records = args.samples * 32
    t0 = time.perf_counter()
    code = attach(model, profile)
    attach_s = time.perf_counter() - t0
    hot, layout_s = time_exttsp(model, cfg, exact)
    print(f"perf brstack: {args.samples:,} samples, {records:,} branch records, "
          f"{size / 1e6:.0f} MB read in {read_s:.1f} s ({records / read_s:,.0f} records/s, "
          f"{size / 1e6 / read_s:.1f} MB/s); attached ({len(profile.src):,} distinct transfers, "
          f"{100 * code.matched:.2f}% on code) in {attach_s:.2f} s")
    print(f"ext-TSP: {hot:,} profiled functions of {len(model.functions):,} "
          f"laid out in {layout_s:.2f} s on one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
