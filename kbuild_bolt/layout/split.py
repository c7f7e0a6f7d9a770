"""Hot/cold splitting: which blocks of a function go to its cold part.

With a profile, the blocks that never ran are cold: they move, in their layout
order, behind the blocks that ran (BOLT's ``-split-functions``). Without one,
``random`` picks a split point per function, to prove the fixups between the
parts. The entry block is always hot (the function's address is its entry).
"""

from __future__ import annotations

import random as _random


def hot_threshold(cfg, counts, share: float) -> int:
    """The smallest block count that stays hot: blocks at least this hot hold
    ``share`` of all instruction fetches (1.0: every block that ran)."""
    import numpy as np

    if share >= 1.0:
        return 1
    fetches = counts * (cfg.block_end - cfg.block_first)
    ran = np.flatnonzero(counts > 0)
    order = ran[np.argsort(-counts[ran], kind="stable")]
    cum = np.cumsum(fetches[order])
    if not len(cum):
        return 1
    k = int(np.searchsorted(cum, share * cum[-1]))
    return max(1, int(counts[order[min(k, len(order) - 1)]]))


def hot_first(order: list[int], counts: dict[int, int], threshold: int = 1) -> tuple[list[int], int]:
    """``order`` with the hot blocks (run at least ``threshold`` times) first (each
    group keeps its order) and the number of hot blocks. A function that has no
    cold block is returned as it is (hot count = all)."""
    hot = [b for b in order if counts.get(b, 0) >= threshold or b == order[0]]
    cold = [b for b in order if not (counts.get(b, 0) >= threshold or b == order[0])]
    if not cold:
        return order, len(order)
    return hot + cold, len(hot)


def random_split(order: list[int], rng: _random.Random) -> int:
    """How many leading blocks stay hot: all (no split) half the time, else a
    random point after the entry block."""
    if len(order) < 2 or rng.random() < 0.5:
        return len(order)
    return rng.randrange(1, len(order))
