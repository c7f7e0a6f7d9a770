"""Array helpers every layer uses (numpy, no kernel or ELF knowledge)."""

from __future__ import annotations

import contextlib
import io
import mmap
import zipfile
import zlib

import numpy as np

from kbuild_bolt.processes import OnThread


def concat_ranges(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``lo[k], lo[k] + 1, ..., lo[k] + counts[k] - 1`` for every k, one after another
    (int64; the ranges of millions of runs without a Python loop)."""
    lo = np.asarray(lo).astype(np.int64)
    counts = np.asarray(counts).astype(np.int64)
    return np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))


def unique(values) -> np.ndarray:
    """``np.unique(values)``: the sorted distinct values, flattened. By a sort,
    not np.unique: since numpy 2.3 its first plain call imports numpy.ma
    (25-40 ms of every run, for a check of masked arrays none of ours are)."""
    values = np.asarray(values).ravel()
    if not len(values):
        return values.copy()
    values = np.sort(values)
    keep = np.empty(len(values), bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def union1d(a, b) -> np.ndarray:
    """``np.union1d(a, b)`` (see :func:`unique`)."""
    return unique(np.concatenate((a, b), axis=None))


def setdiff1d(a, b) -> np.ndarray:
    """``np.setdiff1d(a, b)``: the sorted distinct values of ``a`` not in ``b``
    (see :func:`unique`)."""
    a = unique(a)
    return a[isin(a, b, invert=True)]


def isin(element, test_elements, invert: bool = False) -> np.ndarray:
    """``np.isin(element, test_elements, invert=invert)``. Integer arrays of one
    dtype (addresses, indices) are looked up by a binary search in the sorted
    distinct test values: np.isin sorts them with np.unique, whose first call
    imports numpy.ma (see :func:`unique`). Anything else is np.isin's."""
    a, b = np.asarray(element), np.asarray(test_elements)
    if a.dtype != b.dtype or a.dtype.kind not in "iu":
        return np.isin(element, test_elements, invert=invert)
    b = b.ravel()
    if len(b) < 10 * max(a.size, 1) ** 0.145:
        # (a few test values: compared one by one, as np.isin does)
        found = np.zeros(a.shape, bool)
        for value in b:
            found |= a == value
    else:
        found = in_sorted(unique(b), a.ravel()).reshape(a.shape)
    return ~found if invert else found


def in_sorted(haystack: np.ndarray, needles) -> np.ndarray:
    """``np.isin`` for a sorted ``haystack``: a binary search instead of hashing
    millions of values."""
    needles = np.asarray(needles, dtype=haystack.dtype)
    if not len(haystack):
        return np.zeros(len(needles), bool)
    i = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return haystack[i] == needles


class NotStoredNpz(Exception):
    """An archive np.load reads, but not as stored arrays of a known header."""


def inside_ranges(ranges, addrs: np.ndarray) -> np.ndarray:
    """True where an address lies in one of the sorted, disjoint (n, 2) ranges."""
    ranges = np.asarray(ranges, np.uint64).reshape(-1, 2)
    i = np.searchsorted(ranges[:, 0], addrs, side="right").astype(np.int64) - 1
    ok = i >= 0
    ok[ok] &= addrs[ok] < ranges[i[ok], 1]
    return ok


def union_ranges(ranges: np.ndarray) -> np.ndarray:
    """(n, 2) ranges as sorted, disjoint ones covering the same addresses."""
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    if not len(ranges):
        return ranges
    reach = np.maximum.accumulate(ranges[:, 1])
    # A range starts a new run where it begins after everything before it ended.
    new_run = np.r_[True, ranges[1:, 0] > reach[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:] - 1, len(ranges) - 1]
    return np.stack([ranges[starts, 0], reach[ends]], axis=1)


def read_stored_npz(path) -> dict[str, np.ndarray]:
    """The arrays of an .npz that np.savez wrote, read from the mapped file: each
    member is stored, its CRC checked as unzipping would, its array copied out
    once (np.load reads each through zipfile's buffers: four times as long)."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        members = archive.infolist()
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    crcs = None
    try:
        spans = [_member_span(data, member) for member in members]
        # (the CRCs on a thread while the arrays are copied out: both let go of
        # the interpreter)
        crcs = OnThread(lambda: [zlib.crc32(memoryview(data)[a:b]) for a, b in spans])
        arrays = {member.filename[:-4]: _stored_array(data, member, span)
                  for member, span in zip(members, spans)}
        for member, crc in zip(members, crcs.result()):
            if crc != member.CRC:
                raise zipfile.BadZipFile(f"{member.filename}: damaged")
        return arrays
    finally:
        if crcs is not None:
            with contextlib.suppress(BaseException):
                crcs.result()        # (it reads the mapping: done before it closes)
        with contextlib.suppress(BufferError):   # (a view still held by a traceback)
            data.close()


def _member_span(data, member: zipfile.ZipInfo) -> tuple[int, int]:
    """Where a stored .npy member's bytes lie in the mapped archive ``data``."""
    if member.compress_type != zipfile.ZIP_STORED or not member.filename.endswith(".npy"):
        raise NotStoredNpz(member.filename)
    head = member.header_offset
    if data[head:head + 4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("no local header")
    name_len, extra_len = np.frombuffer(data, "<u2", 2, head + 26).tolist()
    start = head + 30 + name_len + extra_len
    end = start + member.file_size
    if end > len(data):
        raise zipfile.BadZipFile(f"{member.filename}: damaged")
    return start, end


def _stored_array(data, member: zipfile.ZipInfo, span: tuple[int, int]) -> np.ndarray:
    """The array of one stored .npy member of the mapped archive ``data``, a copy
    (its CRC is checked by the caller)."""
    start, end = span
    npy = io.BytesIO(data[start:start + min(member.file_size, 4096)])
    version = np.lib.format.read_magic(npy)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(npy)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(npy)
    else:
        raise NotStoredNpz(member.filename)
    if dtype.hasobject or fortran:
        raise NotStoredNpz(member.filename)
    count = int(np.prod(shape, dtype=np.int64))
    offset = start + npy.tell()
    if offset + count * dtype.itemsize > end:
        raise ValueError(f"{member.filename}: shorter than its header says")
    # (copied out: views would keep the whole file mapped, and in this
    # process's memory, after the rewrite has dropped what it no longer needs)
    return np.frombuffer(data, dtype, count, offset).reshape(shape).copy()


def _positions(key, n: int) -> np.ndarray:
    """What ``key`` (an int, a slice, a bool mask or an index array) names of a
    column of ``n``, as int64 positions: bounds checked, negatives counted from
    the end (SparseColumn's and RunColumn's indexing)."""
    if isinstance(key, slice):
        return np.arange(*key.indices(n), dtype=np.int64)
    key = np.asarray(key)
    if key.dtype == bool:
        if key.shape != (n,):
            raise IndexError(f"boolean index of {key.shape} for a column of {n}")
        return np.flatnonzero(key)
    if key.size and not np.issubdtype(key.dtype, np.integer):
        raise IndexError("only integers, slices and boolean masks index a column")
    key = key.astype(np.int64, copy=False)
    if key.size and (key.min() < -n or key.max() >= n):
        raise IndexError(f"index out of bounds for a column of {n}")
    return np.where(key < 0, key + n, key)


class SparseColumn:
    """A column of ``n`` values of which most are 0, kept as the sorted positions
    of the others and their values. It reads like the dense column it stands
    for (``column[index]`` with an int, a slice, a bool mask or an index array
    gives what the dense array would), and ``column[index] = values`` writes.
    (An instruction's referenced address is 0 for seven instructions in eight:
    a dense uint64 column of a kernel is 20 MB held from start to end.)"""

    __slots__ = ("n", "index", "values")

    def __init__(self, n: int, index: np.ndarray, values: np.ndarray):
        self.n = int(n)
        self.index = np.asarray(index, np.int64)
        self.values = np.asarray(values)

    @classmethod
    def from_dense(cls, dense) -> "SparseColumn":
        dense = np.asarray(dense)
        index = np.flatnonzero(dense)
        return cls(len(dense), index, dense[index])

    @classmethod
    def zeros(cls, n: int, dtype) -> "SparseColumn":
        return cls(n, np.zeros(0, np.int64), np.zeros(0, dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def __len__(self) -> int:
        return self.n

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.zeros(self.n, self.dtype)
        out[self.index] = self.values
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        scalar = isinstance(key, (int, np.integer))
        at = _positions(key, self.n)
        if isinstance(key, slice) and (key.step in (None, 1)) and len(at):
            # (a run: the entries inside it, without a search per position)
            lo, hi = np.searchsorted(self.index, [at[0], at[-1] + 1])
            out = np.zeros(len(at), self.dtype)
            out[self.index[lo:hi] - at[0]] = self.values[lo:hi]
            return out
        k = np.minimum(np.searchsorted(self.index, at), max(len(self.index) - 1, 0))
        out = np.zeros(at.shape, self.dtype)
        if len(self.index):
            hit = self.index[k] == at
            out[hit] = self.values[k[hit]]
        return out[()] if scalar else out

    def __setitem__(self, key, values) -> None:
        at = _positions(key, self.n).ravel()
        values = np.broadcast_to(np.asarray(values, self.dtype), at.shape)
        # (the last write to a position wins, as in numpy's assignment)
        at, last = np.unique(at[::-1], return_index=True)
        values = values[::-1][last]
        keep = ~np.isin(self.index, at, assume_unique=True)
        set_ = values != 0
        index = np.concatenate([self.index[keep], at[set_]])
        order = np.argsort(index, kind="stable")
        self.index = index[order]
        self.values = np.concatenate([self.values[keep], values[set_]])[order]

    def take(self, key, chunk: int = 1 << 18) -> "SparseColumn":
        """The column of ``self[key]``, itself sparse."""
        if isinstance(key, slice) and key.step in (None, 1):
            lo, hi, _ = key.indices(self.n)
            hi = max(hi, lo)
            a, b = np.searchsorted(self.index, [lo, hi])
            return SparseColumn(hi - lo, self.index[a:b] - lo, self.values[a:b])
        key = np.asarray(key) if not isinstance(key, slice) else key
        if not isinstance(key, slice) and key.dtype == bool and key.shape == (self.n,):
            # (a mask: an entry's new position is how many kept positions precede
            # it, counted a chunk at a time, not in a whole column of int64)
            kept = key[self.index]
            index = self.index[kept]
            new_pos = np.zeros(len(index), np.int64)
            before = 0
            for lo in range(0, self.n, chunk):
                counted = np.cumsum(key[lo:lo + chunk], dtype=np.int64)
                a, b = np.searchsorted(index, [lo, lo + chunk])
                new_pos[a:b] = before + counted[index[a:b] - lo] - 1
                before += int(counted[-1])
            return SparseColumn(before, new_pos, self.values[kept])
        key = key.astype(np.int64, copy=False) if not isinstance(key, slice) else key
        if (not isinstance(key, slice) and key.ndim == 1 and len(key) > 1
                and key[0] >= 0 and bool(np.all(key[1:] > key[:-1])) and key[-1] < self.n):
            # (ascending positions, each once: where each entry's position is among
            # them, a search per entry rather than per position)
            at = np.minimum(np.searchsorted(key, self.index), len(key) - 1)
            kept = key[at] == self.index
            return SparseColumn(len(key), at[kept], self.values[kept])
        return SparseColumn.from_dense(self[key])

    @classmethod
    def concatenate(cls, parts: list["SparseColumn"]) -> "SparseColumn":
        lengths = np.array([len(p) for p in parts], np.int64)
        base = np.cumsum(lengths) - lengths
        return cls(int(lengths.sum()),
                   np.concatenate([p.index + b for p, b in zip(parts, base.tolist())]),
                   np.concatenate([p.values for p in parts]))


class RunColumn:
    """A column of ``n`` values that are 0 outside given runs of positions
    ``[first, last)`` (ascending, apart): only the runs' values are kept. Reads
    like the dense column (0 outside the runs); writes go inside the runs only.
    (The new address of every instruction of the rewritten functions: a dense
    uint64 column of a kernel is 20 MB where a profile's layout rewrites a
    few percent of its code.) Runs over the whole column keep the dense array
    itself, read and written as numpy does."""

    __slots__ = ("n", "first", "last", "offset", "values", "whole")

    def __init__(self, n: int, first, last, dtype, values: np.ndarray | None = None):
        self.n = int(n)
        self.first = np.asarray(first, np.int64)
        self.last = np.asarray(last, np.int64)
        length = self.last - self.first
        if (length < 0).any() or (self.first[1:] < self.last[:-1]).any() or (
                len(self.first) and (self.first[0] < 0 or self.last[-1] > self.n)):
            raise ValueError("runs must be ascending, apart and inside the column")
        self.offset = np.cumsum(length) - length
        total = int(length.sum())
        self.values = np.zeros(total, dtype) if values is None else values
        if len(self.values) != total:
            raise ValueError("values do not fill the runs")
        # (one run over everything: the values are the dense column)
        self.whole = total == self.n

    @classmethod
    def over(cls, n: int, lo, hi, dtype) -> "RunColumn":
        """Zeros over every position of the ranges ``[lo, hi)``, which may come in
        any order, overlap or touch (they are merged into runs); over the whole
        column when they cover most of it."""
        lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
        reach = np.maximum.accumulate(hi) if len(hi) else hi
        # (a range starts a run where it begins after all the ones before it end)
        new = np.ones(len(lo), bool)
        new[1:] = lo[1:] > reach[:-1]
        starts = np.flatnonzero(new)
        first = lo[starts]
        last = reach[np.r_[starts[1:] - 1, len(lo) - 1]] if len(lo) else hi
        if 2 * int((last - first).sum()) > n:
            # (most of the column: kept whole, read and written without a search)
            return cls(n, [0], [n], dtype)
        return cls(n, first, last, dtype)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def __len__(self) -> int:
        return self.n

    def copy(self) -> "RunColumn":
        return RunColumn(self.n, self.first, self.last, self.dtype, self.values.copy())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.zeros(self.n, self.dtype)
        out[concat_ranges(self.first, self.last - self.first)] = self.values
        return out if dtype is None else out.astype(dtype, copy=False)

    def _at(self, key) -> np.ndarray:
        """(position in ``values``, or -1 outside every run) of each position ``key``
        names (an int, a slice, a bool mask or an index array)."""
        at = _positions(key, self.n)
        if not len(self.first):
            return np.full(at.shape, -1, np.int64)
        k = np.searchsorted(self.first, at, side="right").astype(np.int64) - 1
        kk = np.maximum(k, 0)
        inside = (k >= 0) & (at < self.last[kk])
        return np.where(inside, self.offset[kk] + at - self.first[kk], -1)

    def __getitem__(self, key):
        if self.whole:
            return self.values[key]
        pos = self._at(key)
        out = np.zeros(pos.shape, self.dtype)
        inside = pos >= 0
        out[inside] = self.values[pos[inside]]
        return out[()] if isinstance(key, (int, np.integer)) else out

    def __setitem__(self, key, values) -> None:
        if self.whole:
            self.values[key] = values
            return
        pos = self._at(key)
        if (pos < 0).any():
            raise IndexError("a write outside the column's runs")
        self.values[pos] = values
