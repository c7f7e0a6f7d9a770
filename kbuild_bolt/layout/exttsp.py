"""Profile-guided block order: ext-TSP (Newell & Pupyrev, "Improved basic block
reordering"), as LLVM's CodeLayout defines its weights.

The ext-TSP score of a layout rewards an edge of weight w by
  w * 1.0 (1.05 unconditional)        when its target directly follows its source,
  w * 0.1 * (1 - d / 1024)            for a forward jump of d <= 1024 bytes,
  w * 0.1 * (1 - d / 640)             for a backward jump of d <= 640 bytes,
so it prefers fall-throughs and short jumps. Chains of blocks start as single
blocks and are merged greedily, the pair with the highest score gain first,
trying the concatenations X+Y, Y+X and, for short chains, Y inserted into X
(X1+Y+X2) and the rotations Y+X2+X1, X2+Y+X1. The entry block stays first;
chains are then ordered by density (count per byte), the entry chain first;
blocks that never ran keep their original order at the end.

For very large hot regions a Pettis-Hansen bottom-up merge (hottest edge first)
is used instead, which is linear in the number of edges.
"""

from __future__ import annotations

import numpy as np

FALLTHROUGH_COND = 1.0
FALLTHROUGH_UNCOND = 1.05
FORWARD_WEIGHT = 0.1
BACKWARD_WEIGHT = 0.1
FORWARD_DISTANCE = 1024
BACKWARD_DISTANCE = 640
SPLIT_THRESHOLD = 16      # split chains up to this many blocks
EXTTSP_LIMIT = 400        # more hot blocks than this: Pettis-Hansen


def edge_score(src_end: int, dst_start: int, weight: float, cond: bool) -> float:
    if src_end == dst_start:
        return weight * (FALLTHROUGH_COND if cond else FALLTHROUGH_UNCOND)
    if src_end < dst_start:
        d = dst_start - src_end
        if d <= FORWARD_DISTANCE:
            return weight * FORWARD_WEIGHT * (1.0 - d / FORWARD_DISTANCE)
        return 0.0
    d = src_end - dst_start
    if d <= BACKWARD_DISTANCE:
        return weight * BACKWARD_WEIGHT * (1.0 - d / BACKWARD_DISTANCE)
    return 0.0


class _Layout:
    def __init__(self, sizes, edges, cond):
        self.sizes = sizes
        self.out = {}  # block -> list of (dst, weight, cond)
        for (s, d), w in edges.items():
            self.out.setdefault(s, []).append((d, w, cond.get(s, False)))

    def score(self, order) -> float:
        pos = {}
        at = 0
        for b in order:
            pos[b] = at
            at += self.sizes[b]
        total = 0.0
        for b in order:
            for d, w, c in self.out.get(b, ()):
                if d in pos:
                    total += edge_score(pos[b] + self.sizes[b], pos[d], w, c)
        return total


def ext_tsp_order(blocks: list[int], sizes: dict, counts: dict, edges: dict,
                  cond: dict) -> list[int]:
    """Order ``blocks`` (entry first) for the weighted ``edges`` {(src, dst): w}."""
    entry = blocks[0]
    hot = [b for b in blocks if counts.get(b, 0) > 0 or b == entry]
    cold = [b for b in blocks if b not in set(hot)]
    hot_set = set(hot)
    edges = {(s, d): w for (s, d), w in edges.items()
             if s in hot_set and d in hot_set and s != d and w > 0}
    if len(hot) > EXTTSP_LIMIT:
        chains = _pettis_hansen(hot, edges, entry)
    else:
        chains = _merge_chains(hot, sizes, edges, cond, entry)
    # Entry chain first, then the densest chains.
    def density(chain):
        size = sum(sizes[b] for b in chain) or 1
        return sum(counts.get(b, 0) for b in chain) / size

    first = [c for c in chains if c[0] == entry]
    rest = sorted((c for c in chains if c[0] != entry), key=lambda c: (-density(c), c[0]))
    order = [b for c in first + rest for b in c]
    return order + cold


def _pettis_hansen(hot, edges, entry):
    chain_of = {b: [b] for b in hot}
    for (s, d), _w in sorted(edges.items(), key=lambda e: -e[1]):
        cs, cd = chain_of[s], chain_of[d]
        if cs is cd or cs[-1] != s or cd[0] != d or d == entry:
            continue
        cs.extend(cd)
        for b in cd:
            chain_of[b] = cs
    seen, chains = set(), []
    for b in hot:
        c = chain_of[b]
        if id(c) not in seen:
            seen.add(id(c))
            chains.append(c)
    return chains


def _merge_chains(hot, sizes, edges, cond, entry):
    layout = _Layout(sizes, edges, cond)
    chains = {b: [b] for b in hot}           # chain id (its first block at creation) -> blocks
    chain_of = {b: b for b in hot}
    scores = {b: 0.0 for b in hot}
    adjacent: dict[int, set] = {b: set() for b in hot}
    for (s, d) in edges:
        if chain_of[s] != chain_of[d]:
            adjacent[chain_of[s]].add(chain_of[d])
            adjacent[chain_of[d]].add(chain_of[s])
    cache: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def best_merge(x, y):
        key = (x, y) if x < y else (y, x)
        if key in cache:
            return cache[key]
        X, Y = chains[x], chains[y]
        base = scores[x] + scores[y]
        best = (0.0, None)
        candidates = []
        for A, B in ((X, Y), (Y, X)):
            candidates.append(A + B)
            if len(A) <= SPLIT_THRESHOLD:
                for p in range(1, len(A)):
                    A1, A2 = A[:p], A[p:]
                    candidates.append(A1 + B + A2)
                    candidates.append(B + A2 + A1)
                    candidates.append(A2 + B + A1)
        for order in candidates:
            if entry in X or entry in Y:
                if order[0] != entry:
                    continue
            gain = layout.score(order) - base
            if gain > best[0] + 1e-9:
                best = (gain, order)
        cache[key] = best
        return best

    while True:
        best_pair, best = None, (0.0, None)
        for x in list(chains):
            for y in adjacent[x]:
                if x < y:
                    g = best_merge(x, y)
                    if g[1] is not None and g[0] > best[0]:
                        best_pair, best = (x, y), g
        if best_pair is None:
            break
        x, y = best_pair
        merged = best[1]
        chains[x] = merged
        scores[x] = layout.score(merged)
        del chains[y], scores[y]
        for b in merged:
            chain_of[b] = x
        neighbours = (adjacent.pop(y) | adjacent[x]) - {x, y}
        adjacent[x] = neighbours
        for z in neighbours:
            adjacent[z].discard(y)
            adjacent[z].add(x)
        for key in [k for k in cache if x in k or y in k]:
            del cache[key]
    return list(chains.values())


class ProfileLayout:
    """ext-TSP orders for the functions a profile touches (others keep theirs)."""

    def __init__(self, model, cfg, profile):
        from kbuild_bolt.profile.attach import attach

        self.model = model
        self.cfg = cfg
        self.profile = attach(model, profile)
        counts = self.profile.block_counts(cfg)
        hot_block = counts > 0
        self.hot_rows = set(cfg.block_func[hot_block].tolist())

    def for_function(self, row: int):
        if row not in self.hot_rows:
            return None
        return lambda blocks: self.order(row, blocks)

    def order(self, row: int, blocks: list[int]) -> list[int]:
        from kbuild_bolt.profile.attach import function_edges

        cfg = self.cfg
        insns = self.model.insns
        counts_arr, edges = function_edges(self.model, cfg, self.profile, row)
        lo = blocks[0]
        counts = {b: int(counts_arr[b - lo]) for b in blocks}
        sizes = {b: int(insns.end[cfg.block_end[b] - 1] - insns.addr[cfg.block_first[b]])
                 for b in blocks}
        succ_count: dict[int, int] = {}
        e_lo, e_hi = (int(v) for v in np.searchsorted(cfg.edge_src, [lo, blocks[-1] + 1]))
        for s in cfg.edge_src[e_lo:e_hi].tolist():
            succ_count[s] = succ_count.get(s, 0) + 1
        cond = {b: succ_count.get(b, 0) > 1 for b in blocks}
        return ext_tsp_order(blocks, sizes, counts, edges, cond)
