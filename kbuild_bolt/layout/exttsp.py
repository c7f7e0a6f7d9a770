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

The gain of a candidate is computed from the edges it moves only (see
``_merge_chains``), falling back to scoring the whole order wherever rounding
could tip a comparison, so the merges are exactly those of scoring every
candidate in full.

For very large hot regions a Pettis-Hansen bottom-up merge (hottest edge first)
is used instead, which is linear in the number of edges.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from itertools import count

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
    """The score of an edge from a block ending at src_end to one starting at dst_start."""
    return _gap_score(dst_start - src_end, weight, cond)


def _gap_score(gap: int, weight: float, cond: bool) -> float:
    """edge_score of an edge whose target starts ``gap`` bytes after its source ends."""
    if gap == 0:
        return weight * (FALLTHROUGH_COND if cond else FALLTHROUGH_UNCOND)
    if gap > 0:
        if gap <= FORWARD_DISTANCE:
            return weight * FORWARD_WEIGHT * (1.0 - gap / FORWARD_DISTANCE)
        return 0.0
    if -gap <= BACKWARD_DISTANCE:
        return weight * BACKWARD_WEIGHT * (1.0 - -gap / BACKWARD_DISTANCE)
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
    """Order ``blocks`` (entry first) for the weighted ``edges`` {(src, dst): w}.

    ``sizes`` are whole bytes: block positions are computed by offset arithmetic,
    which is exact only for integers.
    """
    entry = blocks[0]
    hot = [b for b in blocks if counts.get(b, 0) > 0 or b == entry]
    hot_set = set(hot)
    cold = [b for b in blocks if b not in hot_set]
    edges = {(s, d): w for (s, d), w in edges.items()
             if s in hot_set and d in hot_set and s != d and w > 0}
    if not edges:
        chains = [[b] for b in hot]
    elif len(hot) > EXTTSP_LIMIT:
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


# Candidate orders of a merge of chain A with chain B (A may be split at block p).
_CONCAT, _INSERT, _ROTATE_AFTER, _ROTATE_AROUND = range(4)  # A+B, A1+B+A2, B+A2+A1, A2+B+A1
# Twice the unit roundoff: adding up n floats errs by less than n * 2**-53 of their total.
_ROUNDING = 2.0 ** -52
_NO_MERGE = (None, 0.0, 0.0)   # (best candidate, its gain, its exact gain)
_X_THEN_Y = (True, _CONCAT, 0)  # (A is X, shape, split point): X+Y
_Y_THEN_X = (False, _CONCAT, 0)
_SINGLE_BLOCK_RUN = (0.0, 0.0)  # running score of a chain of one block (no self-loops)


def _candidate(A, B, shape, p):
    if shape == _CONCAT:
        return A + B
    if shape == _INSERT:
        return A[:p] + B + A[p:]
    if shape == _ROTATE_AFTER:
        return B + A[p:] + A[:p]
    return A[p:] + B + A[:p]


def _merge_chains(hot, sizes, edges, cond, entry):
    """Greedy chain merging; the merges (and so the chains) are exactly those of
    scoring every candidate order with ``_Layout.score``, as the first version did.

    A candidate's gain only involves the edges whose distance changes: the edges
    between the two chains and, when a chain is split, its edges across the split.
    Positions are offsets inside the chains shifted per segment, so a gain is a few
    edge scores instead of a scan of both chains. Splits are scored only when a
    bound says they could beat the best candidate so far. A pair's best merge is
    found once per change of its chains and waits in a heap by gain (the first
    version rescanned every pair after each merge).

    The result must not depend on how the gains are added up: a merge is picked by
    ``gain > best + 1e-9`` between candidates and by strict ``>`` between pairs (the
    first in scan order wins ties), and profiles have many equal weights, so ties are
    common. Each gain here is within ``eps`` (a bound on the rounding error of both
    ways of adding it up) of ``_Layout.score(order) - score(X) - score(Y)``; when a
    comparison falls within that margin, the gains are recomputed that exact way.
    """
    chains = {b: [b] for b in hot}           # chain id (its first block at creation) -> blocks
    # block -> (its chain, its start and end in bytes from the chain's start, its index)
    place = {b: (b, 0, sizes[b], 0) for b in hot}
    length = {b: sizes[b] for b in hot}      # chain -> bytes
    inner_weight = dict.fromkeys(hot, 0)     # chain -> weight of the edges inside it
    inner_count = dict.fromkeys(hot, 0)
    hot_rank: dict[int, int] = {}            # block -> place in hot, once a tie needs it
    # The sets' iteration order decides between equal gains, as in the first version:
    # they are built and updated by the same operations.
    adjacent: dict[int, set] = {b: set() for b in hot}
    # chain -> {adjacent chain: the link between them, one list shared by both}; a link is
    # [their edges' score if all were fall-throughs, their weight, [(src, dst, w, cond)]]
    links: dict[int, dict] = {b: {} for b in hot}
    out: dict[int, list] = {}   # block -> [(dst, w, cond)], in _Layout's order
    for (s, d), w in edges.items():
        adjacent[s].add(d)   # (s != d, each its own chain)
        adjacent[d].add(s)
        link = links[s].get(d)
        if link is None:
            link = links[s][d] = links[d][s] = [0.0, 0, []]
        c = cond.get(s, False)
        link[0] += w * (FALLTHROUGH_COND if c else FALLTHROUGH_UNCOND)
        link[1] += w
        link[2].append((s, d, w, c))
        out.setdefault(s, []).append((d, w, c))
    least_size = min(length.values())
    # A bound on the gain of splitting a chain anywhere, kept up to date by the merges:
    # an edge inside it at best becomes a fall-through (its "slack" is what it lacks
    # of that), and the split loses the fall-through between the blocks it separates
    # (they end up at least one byte apart: that edge keeps at best 0.1 * w).
    # (With blocks of no bytes, a split may leave two blocks adjacent: no loss is sure.)
    slack = dict.fromkeys(hot, 0.0)          # chain -> >= the sum of its edges' slack
    # chain -> <= the least loss at one of its split points
    least_loss = dict.fromkeys(hot, float("inf") if least_size >= 1 else 0.0)

    def adjacency_loss(u, v):
        """The least a split between adjacent blocks u and v loses."""
        w = edges.get((u, v))
        if w is None:
            return 0.0
        return w * (FALLTHROUGH_COND if cond.get(u, False) else FALLTHROUGH_UNCOND) \
            - FORWARD_WEIGHT * w

    # The pairs' best merges (results[pair], see best_merge), in a heap by gain; a merge
    # that no longer applies (a chain of it changed) leaves results, and stays in the
    # heap with its description set to None.
    results: dict[tuple[int, int], list] = {}
    heap: list = []
    pushed = 0
    max_eps = 0.0

    # Per-chain data, computed when first asked and dropped when the chain changes.
    prefixes: dict[int, list] = {}          # chain -> running_score
    splits: dict[int, tuple] = {}           # chain -> split_points

    def running_score(z):
        """layout.score(chains[z]) after each of its blocks: the same additions in the
        same order, so its last value is the chain's score bit for bit."""
        run = prefixes.get(z)
        if run is None:
            if len(chains[z]) == 1:
                return _SINGLE_BLOCK_RUN
            total = 0.0
            run = [total]
            for b in chains[z]:
                end = place[b][2]
                for d, w, c in out.get(b, ()):
                    d_chain, start, _end, _i = place[d]
                    if d_chain == z:
                        total += _gap_score(start - end, w, c)
                run.append(total)
            prefixes[z] = run
        return run

    def split_points(z):
        """Per split point p of chain A = z: (offset of block p, the chain's edges across
        it as (direction, gap, w, cond), their score, and the change of that score in
        A1+B+A2, B+A2+A1, A2+B+A1), and the highest change.

        A1+B+A2 and A2+B+A1 move the parts apart by B's length LB, and an edge's score
        only falls as its jump grows, so their change for the smallest LB bounds it for
        every B (for sizes >= 0); B+A2+A1 does not depend on B."""
        cached = splits.get(z)
        if cached is not None:
            return cached
        blocks = chains[z]
        LA = length[z]
        lb = least_size
        spans = [[] for _ in blocks]
        for b in blocks:
            _z, _start, end, i = place[b]
            for d, w, c in out.get(b, ()):
                d_chain, start, _end, j = place[d]
                if d_chain != z:
                    continue
                edge = (1 if i < j else -1, start - end, w, c)   # 1: A1 -> A2
                for p in (range(i + 1, j + 1) if i < j else range(j + 1, i + 1)):
                    spans[p].append(edge)
        points = []
        highest = -float("inf")
        for p in range(1, len(blocks)):
            span = spans[p]
            now = insert = rotate_after = rotate_around = 0.0
            for direction, gap, w, c in span:
                now += _gap_score(gap, w, c)
                insert += _gap_score(gap + direction * lb, w, c)
                rotate_after += _gap_score(gap - direction * LA, w, c)
                rotate_around += _gap_score(gap - direction * (LA + lb), w, c)
            insert -= now
            rotate_after -= now
            rotate_around -= now
            if lb < 0:
                insert = rotate_around = float("inf")
            highest = max(highest, insert, rotate_after, rotate_around)
            points.append((place[blocks[p]][1], span, now, insert, rotate_after,
                           rotate_around))
        cached = splits[z] = (points, highest)
        return cached

    def exact_gain(x, y, shape_key):
        """The gain as the first version computed it: score(order) - (score(X) + score(Y)),
        and for A+B the running score of that order (the merged chain's, if it wins)."""
        a_is_x, shape, p = shape_key
        a, b = (x, y) if a_is_x else (y, x)
        base = running_score(x)[-1] + running_score(y)[-1]
        if shape != _CONCAT:   # (rare)
            layout = _Layout(sizes, edges, cond)
            return layout.score(_candidate(chains[a], chains[b], shape, p)) - base, None
        # A+B: the sum runs as in score(A) up to A's first block with an edge into B.
        A, B = chains[a], chains[b]
        LA = length[a]
        first = len(A)
        for u, _v, _w, _c in links[x][y][2]:
            u_chain, _start, _end, i = place[u]
            if u_chain == a and i < first:
                first = i
        run = [*running_score(a)[:first + 1]]
        total = run[-1]
        for u in A[first:]:
            end = place[u][2]
            for d, w, c in out.get(u, ()):
                z, start, _end, _i = place[d]
                if z == a:
                    total += _gap_score(start - end, w, c)
                elif z == b:
                    total += _gap_score(start + LA - end, w, c)
            run.append(total)
        for u in B:
            end = place[u][2] + LA
            for d, w, c in out.get(u, ()):
                z, start, _end, _i = place[d]
                if z == b:
                    total += _gap_score(start + LA - end, w, c)
                elif z == a:
                    total += _gap_score(start - end, w, c)
            run.append(total)
        return total - base, run

    def prefer(x, y, eps, state, g, key):
        """The first version's ``gain > best + 1e-9`` on state = (best key, its gain,
        its exact gain or None), with the exact gains when too close to call."""
        best, best_gain, best_exact = state
        if best is None:
            margin, over = 2 * eps, g - 1e-9
        else:
            margin, over = 3 * eps, g - best_gain - 1e-9
        if over > margin:
            return (key, g, None)
        if over < -margin:
            return state
        exact = exact_gain(x, y, key)[0]
        if best_exact is None:
            best_exact = exact_gain(x, y, best)[0]
        if exact > best_exact + 1e-9:
            return (key, g, exact)
        return (best, best_gain, best_exact)

    def bars(state, eps):
        """(lowest, surest): a gain below lowest certainly does not beat the state's best
        (as ``prefer`` would find), one above surest certainly does."""
        if state[0] is None:
            return 1e-9 - 2 * eps, 1e-9 + 2 * eps
        return state[1] + 1e-9 - 3 * eps, state[1] + 1e-9 + 3 * eps

    def best_split(x, y, a_is_x, state, eps, cross_most, with_entry):
        """``state`` after the splits of A (x or y) around B, in the first version's order."""
        a, b = (x, y) if a_is_x else (y, x)
        A, B, LA, LB = chains[a], chains[b], length[a], length[b]
        points, highest = split_points(a)
        lowest, surest = bars(state, eps)
        floor = lowest - cross_most   # for a bound that counts no cross edge
        if highest <= floor:
            return state
        # A cross edge's gap is its gap at rest + sign * (B's shift - its A block's shift).
        cross = []
        for u, v, w, c in links[x][y][2]:
            u_chain, _start, end, i = place[u]
            _chain, start, _end, j = place[v]
            if u_chain == a:
                cross.append((1, start - end, i, w, c))
            else:
                cross.append((-1, start - end, j, w, c))
        insert_ok = not with_entry or A[0] == entry
        rotate_after_ok = not with_entry or B[0] == entry
        for p, (s1, span, now, insert, rotate_after, rotate_around) in enumerate(points, 1):
            if insert_ok and insert > floor:   # A1+B+A2: A2 moves by LB
                g = -now
                for direction, gap, w, c in span:
                    g += _gap_score(gap + direction * LB, w, c)
                for sign, gap, i, w, c in cross:
                    g += _gap_score(gap + sign * (s1 if i < p else s1 - LB), w, c)
                if g > surest:
                    state = ((a_is_x, _INSERT, p), g, None)
                    lowest, surest = g + 1e-9 - 3 * eps, g + 1e-9 + 3 * eps
                    floor = lowest - cross_most
                elif g >= lowest:
                    state = prefer(x, y, eps, state, g, (a_is_x, _INSERT, p))
                    lowest, surest = bars(state, eps)
                    floor = lowest - cross_most
            if rotate_after_ok and rotate_after > floor:   # B+A2+A1
                g = rotate_after
                for sign, gap, i, w, c in cross:
                    g += _gap_score(gap + sign * (s1 - LB if i >= p else s1 - LB - LA), w, c)
                if g > surest:
                    state = ((a_is_x, _ROTATE_AFTER, p), g, None)
                    lowest, surest = g + 1e-9 - 3 * eps, g + 1e-9 + 3 * eps
                    floor = lowest - cross_most
                elif g >= lowest:
                    state = prefer(x, y, eps, state, g, (a_is_x, _ROTATE_AFTER, p))
                    lowest, surest = bars(state, eps)
                    floor = lowest - cross_most
            if rotate_around > floor and (not with_entry or A[p] == entry):   # A2+B+A1
                g = -now
                for direction, gap, w, c in span:
                    g += _gap_score(gap - direction * (LA + LB), w, c)
                for sign, gap, i, w, c in cross:
                    g += _gap_score(gap + sign * (LA if i >= p else -LB), w, c)
                if g > surest:
                    state = ((a_is_x, _ROTATE_AROUND, p), g, None)
                    lowest, surest = g + 1e-9 - 3 * eps, g + 1e-9 + 3 * eps
                    floor = lowest - cross_most
                elif g >= lowest:
                    state = prefer(x, y, eps, state, g, (a_is_x, _ROTATE_AROUND, p))
                    lowest, surest = bars(state, eps)
                    floor = lowest - cross_most
        return state

    def best_merge(x, y):
        """Find the best merge of x < y, if one gains, as results[(x, y)] = [gain, eps,
        (a_is_x, shape, p), exact gain or None, running score of the merged chain or
        None]; the first version's enumeration order is X+Y, the splits of X, Y+X, the
        splits of Y."""
        nonlocal pushed, max_eps
        X, Y = chains[x], chains[y]
        LX, LY = length[x], length[y]
        cross_most, _weight, between = links[x][y]
        x_then_y = y_then_x = 0.0
        for u, v, w, c in between:
            u_chain, _start, end, _i = place[u]
            gap = place[v][1] - end
            if u_chain == x:
                x_then_y += _gap_score(gap + LX, w, c)
                y_then_x += _gap_score(gap - LY, w, c)
            else:
                x_then_y += _gap_score(gap - LX, w, c)
                y_then_x += _gap_score(gap + LY, w, c)
        # How far apart two ways of adding up a gain can end: a sum of n terms of at most
        # 1.05 * w rounds by < n ulps of the total weight; the gain is one sum less two
        # others, and this sum of changes another; with room to spare.
        eps = (4 * (inner_count[x] + inner_count[y] + len(between)) + 16) * _ROUNDING \
            * FALLTHROUGH_UNCOND * (inner_weight[x] + inner_weight[y] + _weight)
        entry_chain = place[entry][0]
        with_entry = entry_chain == x or entry_chain == y
        state = _NO_MERGE
        lowest, surest = 1e-9 - 2 * eps, 1e-9 + 2 * eps   # bars(state, eps)
        # In the first version's order: X+Y, the splits of X, Y+X, the splits of Y.
        for a, A, gain, shape, a_is_x in ((x, X, x_then_y, _X_THEN_Y, True),
                                          (y, Y, y_then_x, _Y_THEN_X, False)):
            if gain >= lowest and (not with_entry or A[0] == entry):
                if gain > surest:
                    state = (shape, gain, None)
                    lowest, surest = gain + 1e-9 - 3 * eps, gain + 1e-9 + 3 * eps
                else:
                    state = prefer(x, y, eps, state, gain, shape)
                    lowest, surest = bars(state, eps)
            if 1 < len(A) <= SPLIT_THRESHOLD and slack[a] - least_loss[a] + cross_most > lowest:
                state = best_split(x, y, a_is_x, state, eps, cross_most, with_entry)
                lowest, surest = bars(state, eps)
        best, best_gain, best_exact = state
        if best is None:
            return
        pair = (x, y)
        r = results[pair] = [best_gain, eps, best, best_exact, None]
        heappush(heap, (-best_gain, pushed, pair, r))
        pushed += 1
        if eps > max_eps:
            max_eps = eps

    def pair_exact(pair, r):
        """The pair's exact gain, and the merged chain's running score when it is known."""
        if r[3] is None:
            x, y = pair
            if (r[2][1] == _CONCAT and inner_count[x] == inner_count[y] == 0
                    and len(links[x][y][2]) <= 2):
                r[3] = r[0]   # the same one or two terms added: no rounding to differ
            else:
                r[3], r[4] = exact_gain(x, y, r[2])
        return r[3]

    for x in chains:
        for y in adjacent[x]:
            if x < y:
                best_merge(x, y)

    dead = 0   # stale entries in the heap
    # While a tie lasts (equal weights make many), every current pair whose exact gain
    # may reach tie_floor is in tied, a heap by (exact gain, the place of the pair's
    # first chain in the scan), rather than looked for in the main heap each time.
    tied = None
    tie_floor = 0.0
    joined = count()   # (so that heap entries never compare their results)

    def tie(pair, q):
        heappush(tied, (-(pair_exact(pair, q) if q[3] is None else q[3]),
                        hot_rank[pair[0]], next(joined), pair, q))

    while True:
        if tied is not None:
            while tied and tied[0][4][2] is None:
                heappop(tied)
            if not tied or -tied[0][0] < tie_floor:   # another pair may be higher
                tied = None
        if tied is None:
            if dead > 16 and 2 * dead > len(heap):
                # Stale entries with the top's gain would be walked again at every tie.
                heap[:] = [item for item in heap if item[3][2] is not None]
                heapify(heap)
                dead = 0
            while heap and heap[0][3][2] is None:
                heappop(heap)
                dead -= 1
            if not heap:
                break
            _key, _n, (x, y), r = heap[0]
            # Every other pair whose exact gain may reach this one's: the heap entries
            # above a key are a subtree at its root. (The merged pair's entry goes stale.)
            floor = r[0] - r[1]
            lowest_key = max_eps - floor
            contenders = []
            size = len(heap)
            if ((size > 1 and heap[1][0] <= lowest_key)
                    or (size > 2 and heap[2][0] <= lowest_key)):
                below = [1, 2]
                while below:
                    i = below.pop()
                    if i < size and heap[i][0] <= lowest_key:
                        _key, _n, pair, q = heap[i]
                        if q[2] is not None and q[0] + q[1] >= floor:
                            contenders.append((pair, q))
                        below += (2 * i + 1, 2 * i + 2)
            if contenders:
                if not hot_rank:
                    hot_rank.update((b, i) for i, b in enumerate(hot))
                contenders.append(((x, y), r))
                tied, tie_floor = [], floor
                for pair, q in contenders:
                    tie(pair, q)
        if tied is not None:
            # The first version took the first pair of the highest exact gain, scanning
            # chains in order and each chain's adjacent set in its order.
            key, rank, _n, (x, _y), _q = tied[0]
            of_x = []   # x's current pairs of that gain
            while tied and tied[0][0] == key and tied[0][1] == rank:
                item = heappop(tied)
                if item[4][2] is not None:
                    of_x.append(item)
            for item in of_x:
                heappush(tied, item)   # (the merged pair's goes stale)
            ys = {item[3][1] for item in of_x}
            y = ys.pop() if len(ys) == 1 else next(z for z in adjacent[x] if z in ys)
            r = results[(x, y)]
        a_is_x, shape, p = r[2]
        X, Y = chains[x], chains[y]
        merged = _candidate(X, Y, shape, p) if a_is_x else _candidate(Y, X, shape, p)
        # (What is kept per chain for y is never looked at again.)
        cross_most, weight, between = links[x][y]
        inner_weight[x] += inner_weight[y] + weight
        inner_count[x] += inner_count[y] + len(between)
        # The merged chain's edges scored r[0] (within r[1]) more than before.
        slack[x] += slack[y] + cross_most - r[0] + r[1]
        loss = least_loss[y]
        if len(merged) <= SPLIT_THRESHOLD:   # (a longer chain is never split)
            a_len, b_len = (len(X), len(Y)) if a_is_x else (len(Y), len(X))
            if shape == _CONCAT:
                junctions = (a_len,)
            elif shape == _INSERT:
                junctions = (p, p + b_len)
            elif shape == _ROTATE_AFTER:
                junctions = (b_len, b_len + a_len - p)
            else:
                junctions = (a_len - p, a_len - p + b_len)
            # A split merge drops one of the chains' adjacencies: their least loss
            # stays a bound.
            if least_loss[x] < loss:
                loss = least_loss[x]
            for k in junctions:
                junction = adjacency_loss(merged[k - 1], merged[k])
                if junction < loss:
                    loss = junction
        least_loss[x] = loss
        chains[x] = merged
        del chains[y]
        splits.pop(x, None)
        if r[4] is not None:
            prefixes[x] = r[4]
        else:
            prefixes.pop(x, None)
        # X+Y leaves X's blocks where they are.
        start = len(X) if a_is_x and shape == _CONCAT else 0
        at = length[x] if start else 0
        for i in range(start, len(merged)):
            b = merged[i]
            end = at + sizes[b]
            place[b] = (x, at, end, i)
            at = end
        length[x] = at
        for z in adjacent[x]:
            gone = results.pop((x, z) if x < z else (z, x), None)
            if gone is not None:
                gone[2] = None
                dead += 1
        for z in adjacent[y]:
            gone = results.pop((y, z) if y < z else (z, y), None)
            if gone is not None:
                gone[2] = None
                dead += 1
        neighbours = (adjacent.pop(y) | adjacent[x]) - {x, y}
        adjacent[x] = neighbours
        for z in neighbours:
            adjacent[z].discard(y)
            adjacent[z].add(x)
        x_links, y_links = links[x], links.pop(y)
        del x_links[y], y_links[x]
        for z, link in y_links.items():
            z_links = links[z]
            del z_links[y]
            if z in x_links:
                x_link = x_links[z]
                x_link[0] += link[0]
                x_link[1] += link[1]
                x_link[2].extend(link[2])
            else:
                x_links[z] = z_links[x] = link
        for z in neighbours:
            pair = (x, z) if x < z else (z, x)
            best_merge(*pair)
            if tied is not None:
                q = results.get(pair)
                if q is not None and q[0] + q[1] >= tie_floor:
                    tie(pair, q)
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
        self.kept = None   # KeptOrders: orders of earlier runs, by their input

    def prepare(self) -> None:
        """Make what every function's order reads (before a fork shares it)."""
        self.profile.taken_edges(self.model, self.cfg)

    def order(self, row: int, blocks: list[int]) -> list[int]:
        """ext-TSP's order of ``blocks``, the blocks of function ``row``.

        ext-TSP sees block positions 0..n-1, not the kernel's block numbers: the
        order of a function then depends on its code and counts alone, not on
        where it sits in the kernel (equal gains are broken by the iteration order
        of sets of block numbers), so it can be kept and found again in another
        build (see :mod:`kbuild_bolt.layout.kept`)."""
        from kbuild_bolt.layout.kept import input_digest
        from kbuild_bolt.profile.attach import function_edges

        cfg = self.cfg
        insns = self.model.insns
        counts_arr, edges = function_edges(self.model, cfg, self.profile, row)
        lo, hi = blocks[0], blocks[-1] + 1
        if blocks == list(range(lo, hi)):   # the function's blocks, in order: slices
            at = slice(0, hi - lo)
            ends, firsts = cfg.block_end[lo:hi], cfg.block_first[lo:hi]
            position = None
        else:
            at = np.asarray(blocks) - lo
            ends, firsts = cfg.block_end[at + lo], cfg.block_first[at + lo]
            position = {b: i for i, b in enumerate(blocks)}
        counts = counts_arr[at].tolist()
        sizes = (insns.end_of(ends - 1) - insns.addr[firsts]).tolist()
        if position is None:
            pairs = [(s - lo, d - lo, w) for (s, d), w in edges.items()]
        else:   # (an edge to a block not given cannot be laid out: ext-TSP drops it)
            pairs = [(position[s], position[d], w) for (s, d), w in edges.items()
                     if s in position and d in position]
        e_lo, e_hi = cfg.edge_src.searchsorted((lo, hi)).tolist()
        sources = cfg.edge_src[e_lo:e_hi].tolist()   # sorted: a block's edges are together
        branching = {s for s, t in zip(sources, sources[1:]) if s == t}   # > 1 successor
        cond = [b in branching for b in blocks]
        digest = None
        if self.kept is not None:
            digest = input_digest(sizes, counts, pairs, cond)
            found = self.kept.get(digest, len(blocks))
            if found is not None:
                return [blocks[i] for i in found]
        n = len(blocks)
        positions = ext_tsp_order(list(range(n)), dict(zip(range(n), sizes)),
                                  dict(zip(range(n), counts)),
                                  {(s, d): w for s, d, w in pairs}, dict(zip(range(n), cond)))
        if digest is not None:
            self.kept.add(digest, positions)
        return [blocks[i] for i in positions]
