"""The code footprint of a run: how much of the kernel's code it touches.

From an exact profile (every instruction's execution count): the 64-byte cache
lines and 4-KiB pages that hold 90% and 99% of the kernel's instruction
fetches (an executed instruction is one fetch, counted on the line of its
first byte), the 2-MiB pages it touches at all, and -- when the QEMU recorder
simulated one -- the L1 instruction cache's misses per 1000 instructions
(32 KiB, 8-way, 64-byte lines, LRU, fed with the kernel's executed blocks).
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.arrays import unique
from kbuild_bolt.profile.attach import attach


def hottest_cumulative(keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weight held by the N heaviest distinct keys, N = 1, 2, ... (a curve)."""
    uniq, inv = np.unique(keys, return_inverse=True)
    per = np.bincount(inv, weights=weights, minlength=len(uniq))
    return np.cumsum(np.sort(per)[::-1])


def covering(cumulative: np.ndarray, share: float) -> int:
    """How many keys of a :func:`hottest_cumulative` curve hold ``share`` of the weight."""
    if not len(cumulative) or cumulative[-1] <= 0:
        return 0
    return int(np.searchsorted(cumulative, share * cumulative[-1] - 1e-9) + 1)


def _covering(keys: np.ndarray, weights: np.ndarray, share: float) -> int:
    """How many distinct keys, heaviest first, hold ``share`` of the weight."""
    return covering(hottest_cumulative(keys, weights), share)


def footprint(model, profile, addresses: np.ndarray | None = None) -> dict:
    """``addresses``: where each instruction counts as being, instead of its
    address (a module's, from its section's start)."""
    cp = attach(model, profile)
    ran = np.flatnonzero(cp.insn_count > 0)
    addr = (model.insns.addr if addresses is None else addresses)[ran]
    count = cp.insn_count[ran].astype(np.float64)
    out = {
        "instructions": int(count.sum()),
        "lines90": _covering(addr >> np.uint64(6), count, 0.90),
        "lines99": _covering(addr >> np.uint64(6), count, 0.99),
        "pages90": _covering(addr >> np.uint64(12), count, 0.90),
        "pages99": _covering(addr >> np.uint64(12), count, 0.99),
        "huge_pages": int(len(unique(addr >> np.uint64(21)))),
    }
    stats = getattr(profile, "stats", {}) or {}
    if "l1i_misses" in stats and out["instructions"]:
        out["l1i_misses"] = int(stats["l1i_misses"])
        out["l1i_mpki"] = round(1000.0 * stats["l1i_misses"] / out["instructions"], 3)
    return out


def format_footprint(fp: dict) -> str:
    lines = [f"instructions executed      {fp['instructions']:>12,}",
             f"64-byte lines, 90% / 99%   {fp['lines90']:>6,} / {fp['lines99']:,}",
             f"4-KiB pages, 90% / 99%     {fp['pages90']:>6,} / {fp['pages99']:,}",
             f"2-MiB pages touched        {fp['huge_pages']:>6,}"]
    if "l1i_mpki" in fp:
        lines.append(f"L1i misses (32 KiB 8-way)  {fp['l1i_misses']:>12,}  "
                     f"({fp['l1i_mpki']} per 1000 instructions)")
    return "\n".join(lines)
