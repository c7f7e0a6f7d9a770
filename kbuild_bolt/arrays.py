"""Array helpers every layer uses (numpy, no kernel or ELF knowledge)."""

from __future__ import annotations

import numpy as np


def concat_ranges(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``lo[k], lo[k] + 1, ..., lo[k] + counts[k] - 1`` for every k, one after another
    (int64; the ranges of millions of runs without a Python loop)."""
    lo = np.asarray(lo).astype(np.int64)
    counts = np.asarray(counts).astype(np.int64)
    return np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))


def in_sorted(haystack: np.ndarray, needles) -> np.ndarray:
    """``np.isin`` for a sorted ``haystack``: a binary search instead of hashing
    millions of values."""
    needles = np.asarray(needles, dtype=haystack.dtype)
    if not len(haystack):
        return np.zeros(len(needles), bool)
    i = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return haystack[i] == needles
