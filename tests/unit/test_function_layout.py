"""Function orders (cdsort, hfsort, reverse, random) and hot/cold splits on small
call graphs whose right answer is known."""

import random

import numpy as np
import pytest

from kbuild_bolt.layout.functions import CallGraph, cdsort, hfsort, order_functions
from kbuild_bolt.layout.split import hot_first, hot_threshold, random_split


def graph(sizes, samples, arcs):
    """arcs: (caller, callee, count, offset of the call in the caller)."""
    a = np.array(arcs, np.int64).reshape(-1, 4)
    return CallGraph(size=np.array(sizes, np.int64), samples=np.array(samples, np.int64),
                     src=a[:, 0], dst=a[:, 1], count=a[:, 2], offset=a[:, 3])


@pytest.mark.parametrize("strategy", ["none", "reverse", "random"])
def test_orders_without_a_profile_are_permutations(strategy):
    order = order_functions(strategy, 50, rng=random.Random(3))
    assert sorted(order) == list(range(50))
    if strategy == "none":
        assert order == list(range(50))
    if strategy == "reverse":
        assert order == list(range(49, -1, -1))
    if strategy == "random":
        assert order != list(range(50))
        assert order == order_functions("random", 50, rng=random.Random(3))  # seeded


@pytest.mark.parametrize("strategy", ["cdsort", "hfsort"])
def test_profile_orders_need_a_graph_and_keep_every_function(strategy):
    with pytest.raises(ValueError):
        order_functions(strategy, 3)
    g = graph([64] * 6, [0, 100, 0, 50, 0, 0], [(1, 3, 40, 8)])
    order = order_functions(strategy, 6, g)
    assert sorted(order) == list(range(6))
    # What ran comes first; what never ran keeps its order behind it.
    assert set(order[:2]) == {1, 3}
    assert order[2:] == [0, 2, 4, 5]


def test_hfsort_puts_a_callee_behind_its_caller_and_dense_clusters_first():
    # 0 calls 2 (nearly every sample of 2 comes from that call); 1 is dense alone;
    # 3 is called from 0 too rarely to join it.
    g = graph([100, 10, 100, 100], [1000, 5000, 900, 400],
              [(0, 2, 900, 4), (0, 3, 10, 8)])
    order = hfsort(g)
    assert order.index(2) == order.index(0) + 1
    assert order[0] == 1                      # the densest cluster first
    assert order[-1] == 3


def test_hfsort_does_not_drag_a_dense_caller_down():
    # The caller is far denser than the merged cluster would be.
    g = graph([10, 100000], [100000, 100], [(0, 1, 100, 4)])
    assert hfsort(g) == [0, 1]


def test_cdsort_chains_a_call_path_and_leaves_cold_functions_out():
    # 5 -> 2 -> 7 is the hot path; 0, 1, 3, 4, 6 never ran.
    g = graph([200] * 8, [0, 0, 1000, 0, 0, 1000, 0, 1000],
              [(5, 2, 1000, 16), (2, 7, 1000, 16)])
    order = cdsort(g)
    assert sorted(order) == [2, 5, 7]
    positions = [order.index(f) for f in (5, 2, 7)]
    assert positions == sorted(positions)     # caller before callee, as they run


def test_cdsort_merges_pairs_left_waiting_while_a_neighbour_merged(monkeypatch):
    # 0-1 is the hottest pair; 2 calls 0 rarely and 3 often. Chains of two at most,
    # so 2 cannot join 0-1: after 0 and 1 merge, the pair (2, 3) waiting in the
    # queue must still merge although 2 neighboured the merge.
    from kbuild_bolt.layout import functions

    monkeypatch.setattr(functions, "MAX_CHAIN_SIZE", 2)
    g = graph([64, 64, 4000, 4000], [10**6, 10**6, 3000, 3500],
              [(0, 1, 10**6, 8), (2, 0, 1, 8), (2, 3, 3000, 8)])
    order = cdsort(g)
    assert abs(order.index(0) - order.index(1)) == 1
    assert order[2:] == [2, 3]   # (apart, the denser 3 would come first)


def test_cdsort_counts_a_function_by_its_calls_when_it_has_no_samples():
    # Samples can miss a tiny callee entirely; its calls still count.
    g = graph([64, 8], [500, 0], [(0, 1, 400, 4)])
    assert sorted(cdsort(g)) == [0, 1]


def test_cdsort_is_deterministic_on_a_larger_graph():
    rng = np.random.default_rng(7)
    n = 300
    arcs = [(int(a), int(b), int(c), int(o)) for a, b, c, o in
            zip(rng.integers(0, n, 900), rng.integers(0, n, 900),
                rng.integers(1, 1000, 900), rng.integers(0, 64, 900))]
    g = graph(rng.integers(16, 4000, n), rng.integers(0, 10000, n), arcs)
    first = cdsort(g)
    assert first == cdsort(g)
    assert len(first) == len(set(first))
    # A chain never holds more functions than the cache model allows, but all
    # hot functions are there.
    ran = set(np.flatnonzero(g.samples > 0).tolist()) | set(g.src.tolist()) | set(g.dst.tolist())
    assert set(first) >= set(np.flatnonzero(g.samples > 0).tolist())
    assert set(first) <= ran


def test_hot_first_keeps_each_group_in_order_and_the_entry_hot():
    order = [10, 11, 12, 13, 14]
    counts = {11: 5, 13: 1}
    assert hot_first(order, counts) == ([10, 11, 13, 12, 14], 3)
    assert hot_first(order, counts, threshold=2) == ([10, 11, 12, 13, 14], 2)
    # Nothing cold: unchanged, all hot.
    assert hot_first([1, 2], {1: 1, 2: 1}) == ([1, 2], 2)


def test_hot_threshold_covers_the_asked_share_of_fetches():
    class Cfg:
        block_first = np.array([0, 10, 20, 30])
        block_end = np.array([10, 20, 30, 40])   # 10 instructions each
    counts = np.array([1000, 100, 10, 0])
    assert hot_threshold(Cfg, counts, 1.0) == 1
    assert hot_threshold(Cfg, counts, 0.5) == 1000
    assert hot_threshold(Cfg, counts, 0.95) == 100
    assert hot_threshold(Cfg, np.zeros(4, np.int64), 0.9) == 1


def test_random_split_keeps_the_entry_hot():
    rng = random.Random(1)
    cuts = [random_split(list(range(6)), rng) for _ in range(200)]
    assert min(cuts) >= 1 and max(cuts) == 6
    assert 0.3 < cuts.count(6) / len(cuts) < 0.7
    assert random_split([0], rng) == 1
