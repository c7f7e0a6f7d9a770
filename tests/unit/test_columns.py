"""Columns kept smaller than a whole-kernel array read and write as the dense
column they stand for: SparseColumn (Decoded's take, concatenate and merge keep
its ``ref`` exact) and RunColumn; and the chunked scans (Decoded.follows_on,
holes.runs_of_byte) find what the whole-array ones find."""

import numpy as np
import pytest

from kbuild_bolt.arrays import RunColumn, SparseColumn
from kbuild_bolt.rewrite.holes import runs_of_byte
from kbuild_bolt.x86 import decode as x86


def dense_and_sparse(rng, n=500, share=0.15):
    dense = np.where(rng.random(n) < share, rng.integers(1, 1 << 63, n, dtype=np.uint64),
                     np.uint64(0)).astype(np.uint64)
    return dense, SparseColumn.from_dense(dense)


@pytest.mark.parametrize("seed", range(5))
def test_reads_as_the_dense_column(seed):
    rng = np.random.default_rng(seed)
    dense, sparse = dense_and_sparse(rng)
    assert len(sparse) == len(dense) and sparse.dtype == np.uint64
    assert len(sparse.index) == np.count_nonzero(dense)
    assert np.array_equal(np.asarray(sparse), dense)
    for i in (0, 17, len(dense) - 1, -1, -len(dense)):
        assert sparse[i] == dense[i] and sparse[np.int64(i)] == dense[i]
    for key in (slice(None), slice(10, 300), slice(300, 10), slice(5, 400, 7), slice(-50, None),
                rng.random(len(dense)) < 0.3, rng.integers(0, len(dense), 1000),
                rng.integers(-len(dense), 0, 50), np.zeros(0, np.int64),
                np.flatnonzero(dense), np.flatnonzero(dense == 0)):
        got = sparse[key]
        assert got.dtype == dense.dtype and np.array_equal(got, dense[key])
    with pytest.raises(IndexError):
        sparse[len(dense)]
    with pytest.raises(IndexError):
        sparse[np.array([0, len(dense)])]
    with pytest.raises(IndexError):
        sparse[np.ones(3, bool)]


@pytest.mark.parametrize("seed", range(5))
def test_writes_as_the_dense_column(seed):
    rng = np.random.default_rng(seed)
    dense, sparse = dense_and_sparse(rng)
    for _ in range(20):
        key = rng.integers(0, len(dense), rng.integers(1, 60))    # (repeats: the last wins)
        values = np.where(rng.random(len(key)) < 0.3, 0,
                          rng.integers(1, 1 << 40, len(key))).astype(np.uint64)
        dense[key] = values
        sparse[key] = values
        mask = rng.random(len(dense)) < 0.05
        dense[mask] = 7
        sparse[mask] = 7
        dense[40:60] = 0
        sparse[40:60] = 0
        assert np.array_equal(np.asarray(sparse), dense)
        assert np.all(np.diff(sparse.index) > 0) and np.all(sparse.values != 0)


@pytest.mark.parametrize("seed", range(5))
def test_take_and_concatenate_stay_sparse_and_exact(seed):
    rng = np.random.default_rng(seed)
    dense, sparse = dense_and_sparse(rng)
    for key in (slice(None), slice(33, 250), slice(250, 33), rng.random(len(dense)) < 0.4,
                rng.permutation(len(dense)), np.sort(rng.integers(0, len(dense), 200)),
                np.flatnonzero(rng.random(len(dense)) < 0.6), np.arange(len(dense)),
                slice(3, 400, 3), np.zeros(len(dense), bool)):
        for chunk in (1, 7, 64, 1 << 18):
            taken = sparse.take(key, chunk=chunk)
            assert isinstance(taken, SparseColumn) and len(taken) == len(dense[key])
            assert np.array_equal(np.asarray(taken), dense[key])
    other, more = dense_and_sparse(rng, n=77)
    joined = SparseColumn.concatenate([sparse, SparseColumn.zeros(0, np.uint64), more])
    assert np.array_equal(np.asarray(joined), np.concatenate([dense, other]))


def decoded(addr, rng):
    n = len(addr)
    z8 = np.zeros(n, np.uint8)
    ref = np.where(rng.random(n) < 0.3, addr + np.uint64(5), np.uint64(0)).astype(np.uint64)
    return x86.Decoded(np.asarray(addr, np.uint64), np.ones(n, np.uint8), z8, ref, z8, z8, z8,
                       np.zeros(n, bool)), ref


@pytest.mark.parametrize("seed", range(5))
def test_decoded_merge_places_every_reference(seed):
    """Merging two address-sorted sets (``a`` first at equal addresses) moves each
    referenced address with its instruction."""
    rng = np.random.default_rng(seed)
    a_addr = np.sort(rng.choice(1000, 300)).astype(np.uint64)    # (equal addresses too)
    b_addr = np.sort(rng.choice(1000, rng.integers(1, 500))).astype(np.uint64)
    a, a_ref = decoded(a_addr, rng)
    b, b_ref = decoded(b_addr, rng)
    a.flow = np.full(len(a_addr), 1, np.uint8)     # (which side each one came from)
    merged = x86.Decoded.merge(a, b)
    order = np.argsort(np.concatenate([a_addr, b_addr]), kind="stable")
    assert np.array_equal(merged.addr, np.concatenate([a_addr, b_addr])[order])
    assert np.array_equal(merged.flow, np.r_[np.ones(len(a_addr)), np.zeros(len(b_addr))][order])
    assert np.array_equal(np.asarray(merged.ref), np.concatenate([a_ref, b_ref])[order])


@pytest.mark.parametrize("seed", range(5))
def test_run_column_reads_and_writes_as_the_dense_column(seed):
    rng = np.random.default_rng(seed)
    n = 600
    cuts = np.sort(rng.choice(n + 1, 2 * int(rng.integers(0, 12)), replace=False))
    first, last = cuts[0::2], cuts[1::2]          # (empty runs too when two cuts meet)
    column = RunColumn(n, first, last, np.uint64)
    dense = np.zeros(n, np.uint64)
    inside = np.zeros(n, bool)
    for a, b in zip(first.tolist(), last.tolist()):
        inside[a:b] = True
    positions = np.flatnonzero(inside)
    for _ in range(10):
        key = rng.choice(positions, min(len(positions), 40)) if len(positions) else positions
        values = rng.integers(1, 1 << 40, len(key)).astype(np.uint64)
        column[key] = values
        dense[key] = values
    if len(first) and last[0] > first[0]:
        column[first[0]:last[0]] = 0
        dense[first[0]:last[0]] = 0
    copy = column.copy()
    copy[positions] = 1
    assert np.array_equal(np.asarray(column), dense)
    for key in (slice(None), slice(100, 400), rng.integers(0, n, 300), rng.random(n) < 0.5,
                np.zeros(0, np.int64)):
        assert np.array_equal(column[key], dense[key])
    for k in rng.integers(0, n, 20).tolist():
        assert column[k] == dense[k] and column[np.int64(k - n)] == dense[k]
    if len(positions) < n:
        with pytest.raises(IndexError):
            column[np.flatnonzero(~inside)[:1]] = 5
    with pytest.raises(IndexError):
        column[np.array([n])]
    with pytest.raises(ValueError):
        RunColumn(n, [10, 5], [20, 30], np.uint64)


@pytest.mark.parametrize("seed", range(5))
def test_chunked_scans_find_what_whole_arrays_find(seed):
    rng = np.random.default_rng(seed)
    # Bytes: runs of int3 between others, at the very start and end too.
    data = np.where(rng.random(5000) < 0.9, 0xCC, rng.integers(0, 256, 5000)).astype(np.uint8)
    data[:3] = 0xCC
    data[-1] = 0xCC if seed % 2 else 0x90
    cc = np.concatenate([[False], data == 0xCC, [False]]).astype(np.int8)
    edges = np.diff(cc)
    want = (np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
    for chunk in (1, 2, 7, 64, 4999, 5000, 1 << 22):
        got = runs_of_byte(data, 0xCC, chunk=chunk)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), chunk
    assert [len(x) for x in runs_of_byte(np.zeros(0, np.uint8), 0xCC)] == [0, 0]
    # Instructions: back to back, with gaps.
    length = rng.integers(1, 16, 3000).astype(np.uint8)
    gap = np.where(rng.random(3000) < 0.05, rng.integers(1, 9, 3000), 0).astype(np.uint64)
    addr = np.cumsum(length.astype(np.uint64) + gap) - length
    insns, _ = decoded(addr, rng)
    insns.length = length
    want = np.r_[False, addr[1:] == addr[:-1] + length[:-1]]
    for chunk in (1, 5, 1000, 1 << 18):
        assert np.array_equal(insns.follows_on(chunk=chunk), want)


@pytest.mark.parametrize("seed", range(5))
def test_run_column_over_ranges_in_any_order(seed):
    """Ranges that overlap, touch, repeat or are empty become the runs covering
    exactly their positions."""
    rng = np.random.default_rng(seed)
    n = 2000
    lo = rng.integers(0, n, 30)
    hi = np.minimum(lo + rng.integers(-3, 25, 30), n)
    column = RunColumn.over(n, lo, hi, np.int32)
    covered = np.zeros(n, bool)
    for a, b in zip(lo.tolist(), hi.tolist()):
        covered[a:b] = True
    assert np.all(column.first[1:] > column.last[:-1])      # (apart: touching ones merged)
    inside = np.zeros(n, bool)
    for a, b in zip(column.first.tolist(), column.last.tolist()):
        inside[a:b] = True
    assert np.array_equal(inside, covered)
    column[np.flatnonzero(covered)] = 3
    assert np.array_equal(np.asarray(column), np.where(covered, 3, 0))
    assert len(RunColumn.over(n, [], [], np.int32).first) == 0
    assert not column.whole
    # Ranges over most of the column: kept whole, as the dense column.
    most = RunColumn.over(n, [0, 900, 1500], [800, 1400, 1700], np.int32)
    assert most.whole and list(most.first) == [0] and list(most.last) == [n]
    most[[5, 1450]] = 7
    assert most[1450] == 7 and most[-1] == 0 and np.asarray(most).sum() == 14


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.int32, np.uint8])
def test_set_helpers_are_numpys(dtype):
    """unique, isin (and invert), union1d and setdiff1d give numpy's values and
    dtypes: empty arrays, repeats, 2-D elements, the top of uint64, and mixed
    dtypes (left to np.isin)."""
    from kbuild_bolt.arrays import isin, setdiff1d, union1d, unique

    rng = np.random.default_rng(7)
    for n, m in ((0, 0), (0, 5), (6, 0), (100, 1000), (1000, 30), (40000, 20000)):
        a = rng.integers(0, 3000, n).astype(dtype)
        b = rng.integers(0, 3000, m).astype(dtype)
        for invert in (False, True):
            assert np.array_equal(isin(a, b, invert=invert), np.isin(a, b, invert=invert))
        for mine, theirs in ((unique(a), np.unique(a)), (union1d(a, b), np.union1d(a, b)),
                             (setdiff1d(a, b), np.setdiff1d(a, b))):
            assert np.array_equal(mine, theirs) and mine.dtype == theirs.dtype
    grid = rng.integers(0, 50, (7, 9)).astype(dtype)
    assert np.array_equal(isin(grid, np.arange(0, 50, 3, dtype=dtype)),
                          np.isin(grid, np.arange(0, 50, 3)))
    assert np.array_equal(unique(grid), np.unique(grid))
    assert np.array_equal(isin(grid, [3, 4]), np.isin(grid, [3, 4]))   # (a list: numpy's)
    top = np.array([2**64 - 1, 0, 2**63], np.uint64)
    assert isin(top, np.array([2**64 - 1], np.uint64)).tolist() == [True, False, False]


def test_a_rewrite_does_not_import_numpy_ma(tmp_path):
    """np.unique's first plain call (np.isin and the set functions make one)
    imports numpy.ma: 25-40 ms of every Kbuild step. The package's own helpers
    keep a rewrite of the small kernel (verification included) clear of it."""
    import subprocess
    import sys

    from elfkit import tools_available
    from synthetic_kernel import build

    if not tools_available():
        pytest.skip("binutils (as, ld) missing")
    kernel = build(tmp_path)
    code = ("import sys\n"
            "from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite\n"
            f"rewrite({str(kernel)!r}, {str(tmp_path / 'out')!r}, RewriteOptions("
            "reorder_blocks='reverse', reorder_functions='random', split_functions=True,"
            " progress=False))\n"
            "print('numpy.ma' in sys.modules)\n")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert got.stdout.strip() == "False", got.stderr
