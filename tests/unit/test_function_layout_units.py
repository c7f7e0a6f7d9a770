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


# ---------------------------------------------------------------------------
# Placement: first fit into the room moved functions leave


class _Region:
    def __init__(self, kind):
        self.kind = kind


def placement(free: dict, kinds: list, rows, region, align, start_of=None):
    """A Placement over hand-made free ranges (region index -> [[lo, hi], ...])."""
    from types import SimpleNamespace

    from kbuild_bolt.rewrite.placement import Placement

    p = Placement.__new__(Placement)
    p.layout = SimpleNamespace(regions=[_Region(k) for k in kinds])
    p.plan = SimpleNamespace(rows=np.array(rows, np.int64), region=np.array(region, np.int64),
                             align=np.array(align, np.int64))
    p.free = {k: [list(r) for r in v] for k, v in free.items()}
    p.spill = [k for k, kind in enumerate(kinds) if kind == "text"]
    p.start_of = np.array(start_of if start_of is not None else [0] * 16, np.uint64)
    return p


def sizes(n, values):
    out = np.zeros(n, np.int64)
    for row, v in values.items():
        out[row] = v
    return out


def test_placement_is_first_fit_by_rank_hot_parts_before_cold_parts():
    p = placement({0: [[0x1000, 0x1100], [0x2000, 0x2100]]}, ["text"], rows=[0, 1, 2],
                  region=[0, 0, 0], align=[16, 16, 16])
    hot = sizes(3, {0: 0x50, 1: 0x90, 2: 0x30})
    cold = sizes(3, {0: 0x20, 2: 0x10})
    rank = np.array([2, 0, 1])
    h, c, room = p.place(hot, cold, rank)
    # rank order 1, 2, 0: 1 at 0x1000 (0x90 bytes), 2 at 0x1090 (16-aligned), 0 does
    # not fit behind it (0x10c0 + 0x50 > 0x1100): the next range.
    assert [hex(int(x)) for x in h[:3]] == ["0x2000", "0x1000", "0x1090"]
    # Cold parts after every hot part, packed (alignment 1), by rank: 2 then 0,
    # first fit (the rest of the first range).
    assert [hex(int(x)) for x in c[[2, 0]]] == ["0x10c0", "0x10d0"]
    assert room.range_of[0].tolist()[:3] == [1, 0, 0]


def test_placement_spills_plain_text_to_other_plain_regions_only():
    kinds = ["text", "sched", "text"]
    free = {0: [[0x1000, 0x1040]], 1: [[0x2000, 0x2100]], 2: [[0x3000, 0x3100]]}
    p = placement(free, kinds, rows=[0, 1], region=[0, 1], align=[16, 16])
    h, _c, _room = p.place(sizes(2, {0: 0x80, 1: 0x40}), sizes(2, {}), np.array([0, 1]))
    assert int(h[0]) == 0x3000        # plain text: to the next plain region with room
    assert int(h[1]) == 0x2000        # sched text: its own region


def test_placement_reports_the_functions_without_room():
    from kbuild_bolt.rewrite.emit import NoRoom

    p = placement({0: [[0x2000, 0x2040]]}, ["sched"], rows=[0, 1], region=[0, 0],
                  align=[16, 16])
    with pytest.raises(NoRoom) as full:
        p.place(sizes(2, {0: 0x30, 1: 0x30}), sizes(2, {}), np.array([0, 1]))
    assert full.value.rows == [1]


def test_placement_keeps_same_named_functions_in_order():
    # Row 1 has the same name as row 0 and must come after it although a hole
    # before it would fit (livepatch's sympos is the rank by address).
    p = placement({0: [[0x1000, 0x1020], [0x1100, 0x1200]]}, ["text"], rows=[0, 1],
                  region=[0, 0], align=[16, 16])
    before = np.array([-1, 0])
    h, _c, _r = p.place(sizes(2, {0: 0x80, 1: 0x10}), sizes(2, {}), np.array([0, 1]),
                        before=before)
    assert int(h[0]) == 0x1100 and int(h[1]) == 0x1180
    # Without the rule it would take the first hole.
    h, _c, _r = p.place(sizes(2, {0: 0x80, 1: 0x10}), sizes(2, {}), np.array([0, 1]))
    assert int(h[1]) == 0x1000


def test_placement_memo_gives_the_same_answer():
    p = placement({0: [[0x1000, 0x1400]], 1: [[0x2000, 0x2100]]}, ["text", "sched"],
                  rows=[0, 1, 2], region=[0, 0, 1], align=[16, 64, 16])
    args = (sizes(3, {0: 0x44, 1: 0x10, 2: 0x20}), sizes(3, {0: 8}), np.array([1, 0, 2]))
    memo = {}
    first = p.place(*args, memo=memo)
    assert len(memo) == 2            # one answer per group of regions
    again = p.place(*args, memo=memo)
    assert (first[0] == again[0]).all() and (first[1] == again[1]).all()
    assert int(first[0][1]) % 64 == 0


def test_best_fit_packs_room_cut_up_by_functions_that_stay():
    # A sched region whose room is cut in two (0x100 and 0x40 bytes) by a function
    # that stays. First fit by rank puts the hottest (0x30) at the start of the
    # big range and the 0x100-byte one then finds no room; best fit puts each part
    # where it leaves least room, and all three fit exactly.
    from kbuild_bolt.rewrite.emit import NoRoom

    free = {0: [[0x1000, 0x1100], [0x2000, 0x2040]]}
    args = (sizes(3, {0: 0x30, 1: 0x100, 2: 0x10}), sizes(3, {}), np.array([0, 1, 2]))
    p = placement(free, ["sched"], rows=[0, 1, 2], region=[0, 0, 0], align=[16, 16, 16])
    with pytest.raises(NoRoom) as full:
        p.place(*args)
    assert full.value.rows == [1]
    h, _c, room = p.place(*args, best_fit=frozenset({0}))
    assert [hex(int(x)) for x in h] == ["0x2000", "0x1000", "0x2030"]
    assert room.range_of[0].tolist() == [1, 0, 1]


def test_give_way_takes_the_coldest_functions_whole_first_then_in_original_order():
    from kbuild_bolt.rewrite.emit import NEW, ORIGINAL, UNSPLIT
    from kbuild_bolt.rewrite.placement import _give_way

    rows = np.array([0, 1, 2])
    size = np.array([100, 100, 100])       # new layouts, split
    unsplit = np.array([96, 90, 99])       # whole in the new order
    original = np.array([80, 85, 99])
    rank = np.array([0, 1, 2])             # row 2 coldest
    variant = np.full(3, NEW)
    # 1 byte wanted: the coldest function that can give anything goes whole.
    assert _give_way(variant, rows, size, unsplit, original, rank, 1)
    assert variant.tolist() == [NEW, NEW, UNSPLIT]
    # 15 more: every function whole (1 + 10 + 4) before any original order.
    variant = np.full(3, NEW)
    assert _give_way(variant, rows, size, unsplit, original, rank, 15)
    assert variant.tolist() == [UNSPLIT, UNSPLIT, UNSPLIT]
    # Much more: then the original orders, the coldest first; nothing left to
    # give after that.
    assert _give_way(variant, rows, np.array([96, 90, 99]), unsplit, original, rank, 1000)
    assert variant.tolist() == [ORIGINAL, ORIGINAL, UNSPLIT]
    assert not _give_way(variant, rows, np.array([80, 85, 99]), unsplit, original, rank, 1)


def test_functions_laid_out_in_place_keep_their_start_and_own_room():
    from types import SimpleNamespace

    from kbuild_bolt.rewrite.emit import NEW, ORIGINAL, UNSPLIT, Room
    from kbuild_bolt.rewrite.placement import lay_in_place

    model = SimpleNamespace(functions=SimpleNamespace(
        start=np.array([0x1000, 0x2000, 0x3000], np.uint64),
        end=np.array([0x1040, 0x2020, 0x3010], np.uint64)))
    hot_base = np.array([0x5000, 0, 0], np.uint64)
    cold_base = np.zeros(3, np.uint64)
    range_of = np.array([[0, -1, -1], [-1, -1, -1]], np.int64)
    room = Room([0x5000], [0x6000], range_of, lambda row: [0])
    variant = np.full(3, NEW)
    unsplit = np.array([0x40, 0x20, 0x11])   # row 2: new order one byte too long
    new_room, own = lay_in_place(model, np.array([1, 2]), hot_base, cold_base, room,
                                 variant, unsplit)
    assert hot_base.tolist() == [0x5000, 0x2000, 0x3000]
    assert variant.tolist() == [NEW, UNSPLIT, ORIGINAL]
    assert new_room.range_of[0].tolist() == [0, 1, 2]
    assert new_room.lo.tolist() == [0x5000, 0x2000, 0x3000]
    assert new_room.hi.tolist() == [0x6000, 0x2020, 0x3010]
    assert own.tolist() == [[0x2000, 0x2020], [0x3000, 0x3010]]
    # Their parts go nowhere else when their range overflows.
    assert new_room.alternatives(1) == [] and new_room.alternatives(0) == [0]


def _kallsyms_c_orders(names, addresses, seq):
    """scripts/kallsyms.c's two sorts, stated key by key (compare_symbols, then
    compare_names over the entries in that order)."""
    from kbuild_bolt.kernel.tables.kallsyms import _clean, _linker_provided

    def symbol_key(i):
        n = names[i]
        return (int(addresses[i]), n[:1] in ("w", "W"), _linker_provided(n[1:]),
                len(n[1:]) - len(n[1:].lstrip("_")), int(seq[i]))
    by_address = sorted(range(len(names)), key=symbol_key)
    ordered = [names[i] for i in by_address]
    at = [int(addresses[i]) for i in by_address]
    by_name = sorted(range(len(names)), key=lambda k: (_clean(ordered[k][1:]), at[k], k))
    return by_address, by_name


@pytest.mark.parametrize("seed", range(6))
def test_kallsyms_orders_break_ties_as_scripts_kallsyms_does(seed):
    """Many symbols at one address (aliases, weak and linker-provided names,
    leading underscores, LTO suffixes, one name at several addresses): the
    address order and the name index are scripts/kallsyms.c's."""
    from kbuild_bolt.kernel.tables import kallsyms

    rng = random.Random(seed)
    stems = ["foo", "_foo", "__foo", "__start_bar", "__bar_end", "bar.llvm.123", "bar",
             "baz", "__stop_x", "x"]
    names = [rng.choice("tTwWdD") + rng.choice(stems) for _ in range(400)]
    addresses = np.array([0xffffffff81000000 + rng.randrange(60) for _ in names], np.uint64)
    seq = np.array(rng.sample(range(len(names)), len(names)))
    want_address, want_name = _kallsyms_c_orders(names, addresses, seq)
    order = kallsyms.address_order(names, addresses, seq)
    assert order.tolist() == want_address
    assert kallsyms.name_order([names[i] for i in order.tolist()],
                               addresses[order]) == want_name
    # Not in address order (no caller gives that today): still by name, address, index.
    shuffled = rng.sample(range(len(names)), len(names))
    got = kallsyms.name_order([names[i] for i in shuffled], addresses[shuffled])
    keys = [(kallsyms._clean(names[i][1:]), int(addresses[i]), k) for k, i in enumerate(shuffled)]
    assert got == [k for _, _, k in sorted(keys)]
