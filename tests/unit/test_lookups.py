"""Whole-kernel lookups that have a fast path for many sorted addresses: they
must answer exactly as the plain binary search does."""

import numpy as np
import pytest

from kbuild_bolt.binary.functions import FunctionTable
from kbuild_bolt.x86 import decode as x86


def _functions(rng, n):
    start = np.unique(rng.integers(0, 50 * n, n)).astype(np.uint64)
    # sizes: some zero, some overlapping the next function, most ending before it
    size = rng.choice([0, 1, 5, 40, 400], len(start)).astype(np.uint64)
    return FunctionTable(start, start + size, np.zeros(len(start), np.int32),
                         np.arange(len(start)), [f"f{i}" for i in range(len(start))])


@pytest.mark.parametrize("seed", range(5))
def test_rows_containing_many_sorted_addresses_is_find(seed):
    rng = np.random.default_rng(seed)
    functions = _functions(rng, 200)
    addrs = np.sort(rng.integers(0, 50 * 220, 5000)).astype(np.uint64)   # the fast path
    got = functions.rows_containing(addrs)
    assert got.tolist() == [functions.find(int(a)) for a in addrs]
    few = addrs[::-40][:20]                                  # unsorted, few: the search
    assert functions.rows_containing(few).tolist() == [functions.find(int(a)) for a in few]
    assert 0 < (got >= 0).sum() < len(got)


def _decoded(addrs, tag):
    n = len(addrs)
    return x86.Decoded(np.asarray(addrs, np.uint64), np.full(n, tag, np.uint8),
                       np.zeros(n, np.uint8), np.zeros(n, np.uint64), np.zeros(n, np.uint8),
                       np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(n, bool))


@pytest.mark.parametrize("sizes", [(3, 40), (40, 3), (20, 20)])
def test_merge_keeps_address_order_and_a_first_at_equal_addresses(sizes):
    rng = np.random.default_rng(sum(sizes))
    a_addr = np.sort(rng.integers(0, 60, sizes[0]))
    b_addr = np.sort(np.concatenate([rng.integers(0, 60, sizes[1] - 1), a_addr[:1]]))
    merged = x86.Decoded.merge(_decoded(a_addr, 1), _decoded(b_addr, 2))
    expected = sorted([(a, 0) for a in a_addr.tolist()] + [(b, 1) for b in b_addr.tolist()])
    assert merged.addr.tolist() == [a for a, _ in expected]
    assert merged.length.tolist() == [1 if k == 0 else 2 for _, k in expected]


@pytest.mark.parametrize("seed", range(4))
def test_instruction_lookups_answer_as_a_walk_over_the_instructions(seed):
    """insn_containing and is_boundary work from starts and lengths (no column of
    ends): the same answers as looking at every instruction."""
    from types import SimpleNamespace

    from kbuild_bolt.binary.model import BinaryModel

    rng = np.random.default_rng(seed)
    # runs of back-to-back instructions with gaps between the runs
    length = rng.integers(1, 8, 400).astype(np.uint8)
    gap = np.where(rng.random(400) < 0.1, rng.integers(1, 20, 400), 0)
    addr = (1000 + np.cumsum(length.astype(np.int64) + gap) - length).astype(np.uint64)
    insns = x86.Decoded(addr, length, *(np.zeros(400, t) for t in
                                         (np.uint8, np.uint64, np.uint8, np.uint8, np.uint8,
                                          bool)))
    model = SimpleNamespace(insns=insns)
    model.insn_index = lambda a: BinaryModel.insn_index(model, a)
    probe = np.arange(990, int(addr[-1]) + 12, dtype=np.uint64)
    spans = list(zip(addr.tolist(), (addr + length).tolist()))
    containing = [next((k for k, (a, b) in enumerate(spans) if a <= p < b), -1)
                  for p in probe.tolist()]
    boundary = [any(p in (a, b) for a, b in spans) for p in probe.tolist()]
    assert BinaryModel.insn_containing(model, probe).tolist() == containing
    assert BinaryModel.is_boundary(model, probe).tolist() == boundary
