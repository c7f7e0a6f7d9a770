"""Function orders: which functions go next to which, from the call graph.

The input is a call graph of the functions a profile saw: per function its size
and sample count (instructions it executed), per arc caller -> callee the call
count and where in the caller the call is. The output is an order of those
functions; everything else keeps its relative order after them.

- ``cdsort`` (BOLT's default, llvm CodeLayout ``computeCacheDirectedLayout``):
  greedy merging of chains of functions by the gain in a cache model: a
  distance term (calls close to their callee) plus a frequency term (dense
  chains fit the cache), normalized by the smaller chain; the chains are then
  concatenated by density.
- ``hfsort`` (Ottoni & Maher, CGO 2017, as in BOLT): each function, densest first,
  joins the cluster of its most frequent caller when the arc is likely enough
  and the caller's density does not degrade too much; clusters are then sorted
  by density.
- ``reverse`` and ``random`` need no profile: they move every function and exist
  to prove the rewriter right (``random`` with a seed).
"""

from __future__ import annotations

import heapq
import random as _random
from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("none", "cdsort", "hfsort", "reverse", "random")
NEEDS_PROFILE = ("cdsort", "hfsort")


@dataclass
class CallGraph:
    """Functions (index 0..n-1) with sizes and samples, and call arcs."""

    size: np.ndarray                 # bytes per function
    samples: np.ndarray              # executed instructions per function (0: never ran)
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dst: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # call site in src

    def __len__(self) -> int:
        return len(self.size)


def order_functions(strategy: str, n: int, graph: CallGraph | None = None,
                    rng: _random.Random | None = None) -> list[int]:
    """An order of functions 0..n-1 (hot ones first for profile strategies)."""
    if strategy == "none":
        return list(range(n))
    if strategy == "reverse":
        return list(range(n - 1, -1, -1))
    if strategy == "random":
        order = list(range(n))
        (rng or _random.Random(0)).shuffle(order)
        return order
    if graph is None:
        raise ValueError(f"{strategy} needs a call graph")
    hot = cdsort(graph) if strategy == "cdsort" else hfsort(graph)
    seen = np.zeros(n, bool)
    seen[hot] = True
    return list(hot) + np.flatnonzero(~seen).tolist()


# ---------------------------------------------------------------------------
# HFSort


MIN_ARC_PROBABILITY = 0.1
CALLER_DEGRADE_FACTOR = 8
MAX_CLUSTER_SIZE = 1 << 20


def hfsort(graph: CallGraph) -> list[int]:
    """Hot functions (samples > 0) in HFSort order."""
    samples = graph.samples.astype(np.float64)
    size = np.maximum(graph.size, 1).astype(np.float64)
    hot = np.flatnonzero(samples > 0)
    cluster = {int(f): [int(f)] for f in hot}             # cluster id -> members
    owner = {int(f): int(f) for f in hot}                 # function -> cluster id
    c_samples = {int(f): samples[f] for f in hot}
    c_size = {int(f): size[f] for f in hot}
    # Arc weight normalized by the callee's samples: how likely the call leads to it.
    callers: dict[int, list[tuple[float, int]]] = {}
    for s, d, c in zip(graph.src.tolist(), graph.dst.tolist(), graph.count.tolist()):
        if s != d and c > 0 and samples[d] > 0:
            callers.setdefault(d, []).append((c / samples[d], s))
    density_order = sorted(hot.tolist(), key=lambda f: (-samples[f] / size[f], f))
    for f in density_order:
        best = max(callers.get(f, []), default=None)
        if best is None or best[0] < MIN_ARC_PROBABILITY:
            continue
        pred = best[1]
        into, mine = owner.get(pred), owner[f]
        if into is None or into == mine:
            continue
        if c_size[into] + c_size[mine] > MAX_CLUSTER_SIZE:
            continue
        merged_density = (c_samples[into] + c_samples[mine]) / (c_size[into] + c_size[mine])
        if c_samples[into] / c_size[into] > merged_density * CALLER_DEGRADE_FACTOR:
            continue
        for g in cluster[mine]:
            owner[g] = into
        cluster[into] += cluster.pop(mine)
        c_samples[into] += c_samples.pop(mine)
        c_size[into] += c_size.pop(mine)
    ids = sorted(cluster, key=lambda c: (-c_samples[c] / c_size[c], c))
    return [f for c in ids for f in cluster[c]]


# ---------------------------------------------------------------------------
# CDSort


CACHE_ENTRIES = 16
CACHE_SIZE = 2048
DISTANCE_POWER = 0.25
FREQUENCY_SCALE = 0.25
MAX_CHAIN_SIZE = 128       # functions per chain
EPS = 1e-8


def cdsort(graph: CallGraph) -> list[int]:
    """Hot functions (samples > 0, or taking part in a call) in CDSort order."""
    n = len(graph)
    size = np.maximum(graph.size, 1).astype(np.float64)
    count = graph.samples.astype(np.float64).copy()
    keep = (graph.src != graph.dst) & (graph.count > 0)
    src, dst = graph.src[keep], graph.dst[keep]
    calls, offset = graph.count[keep].astype(np.float64), graph.offset[keep]
    # A function's count is at least what its calls say.
    incoming = np.bincount(dst, weights=calls, minlength=n)
    outgoing = np.bincount(src, weights=calls, minlength=n)
    count = np.maximum(count, np.maximum(incoming, outgoing))
    hot = np.flatnonzero(count > 0)
    total_samples = float(count.sum())
    total_size = float(size[hot].sum()) or 1.0

    chain_of = {int(f): int(f) for f in hot}
    members = {int(f): [int(f)] for f in hot}
    c_count = {int(f): count[f] for f in hot}
    c_size = {int(f): size[f] for f in hot}
    # Calls between two chains (both directions), as (src fn, dst fn, offset, count).
    between: dict[tuple[int, int], list[tuple[int, int, int, float]]] = {}
    adjacent: dict[int, set[int]] = {int(f): set() for f in hot}
    for s, d, o, c in zip(src.tolist(), dst.tolist(), offset.tolist(), calls.tolist()):
        key = (min(s, d), max(s, d))
        between.setdefault(key, []).append((s, d, o, c))
        adjacent[s].add(d)
        adjacent[d].add(s)

    def miss(density: float) -> float:
        page = density * CACHE_SIZE
        if page >= total_samples:
            return 0.0
        return (1.0 - page / total_samples) ** CACHE_ENTRIES

    def dist_score(a: float, b: float, c: float) -> float:
        d = abs(a - b)
        return c * (0.1 if d == 0 else d) ** -DISTANCE_POWER

    def gain(x: int, y: int) -> tuple[float, bool]:
        """Best gain of merging chains x and y: (score, y goes first)."""
        cx, cy, sx, sy = c_count[x], c_count[y], c_size[x], c_size[y]
        freq = (cx * miss(cx / sx) + cy * miss(cy / sy)
                - (cx + cy) * miss((cx + cy) / (sx + sy)))
        jumps = between[(min(x, y), max(x, y))]
        best = (-1.0, False)
        for y_first in (False, True):
            first, second = (y, x) if y_first else (x, y)
            addr = {}
            pos = 0.0
            for f in members[first] + members[second]:
                addr[f] = pos
                pos += size[f]
            new = cur = 0.0
            for s, d, o, c in jumps:
                new += dist_score(addr[s] + o, addr[d], c)
                cur += dist_score(0.0, total_size, c)
            score = (new - cur) + FREQUENCY_SCALE * freq
            if score >= 0:
                score /= min(sx, sy)
            # Ties keep the original order of the functions.
            if score > best[0] + EPS or (abs(score - best[0]) < EPS and
                                         ((not y_first and x < y) or (y_first and x > y))):
                best = (score, y_first)
        return best

    heap: list[tuple[float, int, int, int, int]] = []
    version = {int(f): 0 for f in hot}

    def push(x: int, y: int) -> None:
        if len(members[x]) + len(members[y]) > MAX_CHAIN_SIZE:
            return
        score, y_first = gain(x, y)
        if score > EPS:
            heapq.heappush(heap, (-score, min(x, y), max(x, y), version[x] + version[y],
                                  int(y_first) if x < y else int(not y_first)))

    for key in between:
        push(*key)
    while heap:
        neg, a, b, stamp, b_first = heapq.heappop(heap)
        if a not in members or b not in members or version[a] + version[b] != stamp:
            continue
        # Merge b into a (chain ids: the smaller one survives).
        order = members[b] + members[a] if b_first else members[a] + members[b]
        members[a] = order
        del members[b]
        c_count[a] += c_count.pop(b)
        c_size[a] += c_size.pop(b)
        for f in order:
            chain_of[f] = a
        version[a] += 1
        # Calls between the merged chains and their neighbours.
        merged_neighbours = (adjacent.pop(b) | adjacent[a]) - {a, b}
        adjacent[a] = merged_neighbours
        for z in merged_neighbours:
            adjacent[z].discard(b)
            adjacent[z].add(a)
            old_b = between.pop((min(b, z), max(b, z)), [])
            key = (min(a, z), max(a, z))
            between[key] = between.get(key, []) + old_b
            # (z's pairs with other chains keep their scores: only (a, z) changed,
            # and its stale entries carry a's old version.)
        between.pop((min(a, b), max(a, b)), None)
        for z in merged_neighbours:
            push(a, z)
    chains = sorted(members, key=lambda c: (-c_count[c] / c_size[c], c))
    return [f for c in chains for f in members[c]]
