"""The incremental ext-TSP merge gives the same block orders as scoring every
candidate order in full (the first version, copied here as the reference)."""

import random

import pytest

from kbuild_bolt.layout import exttsp
from kbuild_bolt.layout.exttsp import EXTTSP_LIMIT, ext_tsp_order


# --- reference: kbuild_bolt/layout/exttsp.py before the incremental merge -------------

def _ref_edge_score(src_end, dst_start, weight, cond):
    if src_end == dst_start:
        return weight * (exttsp.FALLTHROUGH_COND if cond else exttsp.FALLTHROUGH_UNCOND)
    if src_end < dst_start:
        d = dst_start - src_end
        if d <= exttsp.FORWARD_DISTANCE:
            return weight * exttsp.FORWARD_WEIGHT * (1.0 - d / exttsp.FORWARD_DISTANCE)
        return 0.0
    d = src_end - dst_start
    if d <= exttsp.BACKWARD_DISTANCE:
        return weight * exttsp.BACKWARD_WEIGHT * (1.0 - d / exttsp.BACKWARD_DISTANCE)
    return 0.0


class _RefLayout:
    def __init__(self, sizes, edges, cond):
        self.sizes = sizes
        self.out = {}
        for (s, d), w in edges.items():
            self.out.setdefault(s, []).append((d, w, cond.get(s, False)))

    def score(self, order):
        pos = {}
        at = 0
        for b in order:
            pos[b] = at
            at += self.sizes[b]
        total = 0.0
        for b in order:
            for d, w, c in self.out.get(b, ()):
                if d in pos:
                    total += _ref_edge_score(pos[b] + self.sizes[b], pos[d], w, c)
        return total


def _ref_ext_tsp_order(blocks, sizes, counts, edges, cond):
    entry = blocks[0]
    hot = [b for b in blocks if counts.get(b, 0) > 0 or b == entry]
    cold = [b for b in blocks if b not in set(hot)]
    hot_set = set(hot)
    edges = {(s, d): w for (s, d), w in edges.items()
             if s in hot_set and d in hot_set and s != d and w > 0}
    if len(hot) > EXTTSP_LIMIT:
        chains = exttsp._pettis_hansen(hot, edges, entry)
    else:
        chains = _ref_merge_chains(hot, sizes, edges, cond, entry)

    def density(chain):
        size = sum(sizes[b] for b in chain) or 1
        return sum(counts.get(b, 0) for b in chain) / size

    first = [c for c in chains if c[0] == entry]
    rest = sorted((c for c in chains if c[0] != entry), key=lambda c: (-density(c), c[0]))
    order = [b for c in first + rest for b in c]
    return order + cold


def _ref_merge_chains(hot, sizes, edges, cond, entry):
    layout = _RefLayout(sizes, edges, cond)
    chains = {b: [b] for b in hot}
    chain_of = {b: b for b in hot}
    scores = {b: 0.0 for b in hot}
    adjacent = {b: set() for b in hot}
    for (s, d) in edges:
        if chain_of[s] != chain_of[d]:
            adjacent[chain_of[s]].add(chain_of[d])
            adjacent[chain_of[d]].add(chain_of[s])
    cache = {}

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
            if len(A) <= exttsp.SPLIT_THRESHOLD:
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


# --- random control-flow graphs ---------------------------------------------------

# Profiles repeat a few weights (ties), and large weights make rounding matter.
_WEIGHTS = (1, 2, 3, 10, 20, 30, 180, 290, 470, 1000, 123457, 5_000_000)


def _random_cfg(rng: random.Random, n: int):
    first = rng.randrange(0, 1000)
    blocks = list(range(first, first + n))
    if rng.random() < 0.2:       # entry first, the rest in no particular order
        rest = blocks[1:]
        rng.shuffle(rest)
        blocks = blocks[:1] + rest
    big = rng.random() < 0.3     # long blocks: jumps past the distance limits
    sizes = {b: rng.randint(1, 400 if big else 40) for b in blocks}
    if rng.random() < 0.05:
        sizes[rng.choice(blocks)] = 0
    counts = {b: (0 if rng.random() < 0.15 else rng.randint(1, 1000)) for b in blocks}
    weights = [rng.choice(_WEIGHTS) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.2:
        weights = [w * rng.choice((0.1, 0.37, 1.9)) for w in weights]
    edges = {}
    for i, b in enumerate(blocks[:-1]):          # fall-through-like edges
        if rng.random() < 0.7:
            edges[(b, blocks[i + 1])] = rng.choice(weights)
    for _ in range(rng.randint(0, 2 * n)):       # jumps, loops, back edges
        s, d = rng.choice(blocks), rng.choice(blocks)
        edges[(s, d)] = rng.choice(weights + [0])
    cond = {b: rng.random() < 0.5 for b in blocks if rng.random() < 0.9}
    return blocks, sizes, counts, edges, cond


@pytest.mark.parametrize("chunk", range(8))
def test_same_orders_as_full_scoring_on_random_cfgs(chunk):
    rng = random.Random(chunk)
    for _ in range(300):
        n = rng.choice((1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 17, 20, 25, 30, 40))
        args = _random_cfg(rng, n)
        assert ext_tsp_order(*args) == _ref_ext_tsp_order(*args), args


@pytest.mark.parametrize("seed", range(4))
def test_same_orders_on_large_cfgs(seed):
    rng = random.Random(1000 + seed)
    for n in (120, 250):
        args = _random_cfg(rng, n)
        assert ext_tsp_order(*args) == _ref_ext_tsp_order(*args)


def test_pettis_hansen_above_the_limit():
    rng = random.Random(7)
    args = _random_cfg(rng, EXTTSP_LIMIT + 50)
    assert ext_tsp_order(*args) == _ref_ext_tsp_order(*args)


def test_many_equal_weights_tie_in_scan_order():
    # Every pair of neighbours gains the same: the first pair in the scan wins each time.
    blocks = list(range(40))
    sizes = dict.fromkeys(blocks, 8)
    counts = dict.fromkeys(blocks, 5)
    edges = {(b, b + 1): 10 for b in blocks[:-1]}
    edges.update({(b, b + 3): 10 for b in blocks[:-3:2]})
    args = blocks, sizes, counts, edges, {}
    assert ext_tsp_order(*args) == _ref_ext_tsp_order(*args)
