"""CodeImage: where every byte of old code is now, in the terms DWARF needs.

New code is a list of pieces in new-address order, grouped in parts (a part is
one contiguous run of new code: a function's hot part, its cold part; a line
sequence ends at a part's end). Each piece stands for old code:

- LINEAR: a run of old bytes copied unchanged (offsets inside it are kept);
- POINT: one old instruction encoded anew (a branch that changed size or
  condition), the whole new piece stands for the whole old instruction;
- INHERIT: a jump added where a fall-through no longer falls through; it
  belongs to the piece before it (its source), for lines as for scopes.

Old bytes outside ``rewritten`` (sorted, disjoint old intervals) stay where they
were. Old bytes inside it that no piece stands for are gone (a jump that now
falls through, alignment fill).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LINEAR, POINT, INHERIT = 0, 1, 2
CHUNK = 1 << 18


@dataclass
class CodeImage:
    rewritten: np.ndarray    # (n, 2) uint64 [lo, hi), sorted, disjoint
    new_lo: np.ndarray       # uint64, per piece, ascending
    size: np.ndarray         # int64 new size
    old_lo: np.ndarray       # uint64 (INHERIT: 0)
    old_len: np.ndarray      # int64 old bytes it stands for (INHERIT: 0)
    kind: np.ndarray         # int8
    part: np.ndarray         # int64, nondecreasing

    def __post_init__(self):
        n = len(self.new_lo)
        # A jump added after a piece extends that piece's new extent.
        self.ext = np.zeros(n, np.int64)
        inh = np.flatnonzero(self.kind == INHERIT)
        if len(inh):
            prev = inh - 1
            ok = (prev >= 0) & (self.part[np.maximum(prev, 0)] == self.part[inh])
            np.add.at(self.ext, prev[ok], self.size[inh[ok]])
        real = np.flatnonzero(self.kind != INHERIT)
        order = np.argsort(self.old_lo[real], kind="stable")
        self._by_old = real[order]
        self._old_lo = self.old_lo[self._by_old]
        self._old_hi = self._old_lo + self.old_len[self._by_old].astype(np.uint64)
        if len(self._old_lo) > 1 and (self._old_lo[1:] < self._old_hi[:-1]).any():
            raise ValueError("pieces of new code stand for overlapping old code")
        rw = self.rewritten.reshape(-1, 2)
        self._rw_lo = rw[:, 0].astype(np.uint64)
        self._rw_hi = rw[:, 1].astype(np.uint64)

    @classmethod
    def identity(cls) -> "CodeImage":
        z64, zu = np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return cls(np.zeros((0, 2), np.uint64), zu, z64, zu, z64, np.zeros(0, np.int8), z64)

    @property
    def changed(self) -> bool:
        return len(self._rw_lo) > 0

    def in_rewritten(self, addrs) -> np.ndarray:
        a = np.asarray(addrs, np.uint64)
        i = np.searchsorted(self._rw_lo, a, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] = a[ok] < self._rw_hi[i[ok]]
        return ok

    def old_of(self, addrs) -> tuple[np.ndarray, np.ndarray]:
        """Where new addresses came from: (old address, ok). Outside new code an
        address is its own (ok); in an added jump, or in new code between pieces,
        nothing (not ok)."""
        a = np.asarray(addrs, np.uint64)
        j = np.searchsorted(self.new_lo, a, side="right").astype(np.int64) - 1
        jj = np.maximum(j, 0)
        inside = (j >= 0) & (a < self.new_lo[jj] + self.size[jj].astype(np.uint64)) \
            if len(self.new_lo) else np.zeros(len(a), bool)
        out = a.copy()
        ok = ~inside & ~self.in_rewritten(a)
        if inside.any():
            k = jj[inside]
            linear = self.kind[k] == LINEAR
            off = a[inside] - self.new_lo[k]
            # (a re-encoded branch: any byte of it stands for the old instruction's start)
            out[inside] = np.where(linear, self.old_lo[k] + off, self.old_lo[k])
            ok[inside] = self.kind[k] != INHERIT
        return out, ok

    def overlaps(self, lo, hi) -> np.ndarray:
        """True where the old range [lo, hi) holds any rewritten byte."""
        lo = np.asarray(lo, np.uint64)
        hi = np.asarray(hi, np.uint64)
        i = np.searchsorted(self._rw_hi, lo, side="right")
        ok = i < len(self._rw_lo)
        ok[ok] = self._rw_lo[i[ok]] < hi[ok]
        return ok

    def points(self, addrs, end: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(new address, ok) of old addresses: instruction starts, or inside an
        instruction copied unchanged. With ``end``, addresses just past an
        instruction (return addresses): just past the same instruction now. Not
        ok: the code is gone."""
        a = np.asarray(addrs, np.uint64)
        out = a.copy()
        ok = np.ones(len(a), bool)
        q_all = a - np.uint64(1) if end else a
        rw = self.in_rewritten(q_all)
        if not rw.any():
            return out, ok
        q = q_all[rw]
        good = np.zeros(len(q), bool)
        res = np.zeros(len(q), np.uint64)
        if len(self._old_lo):
            j = np.searchsorted(self._old_lo, q, side="right").astype(np.int64) - 1
            jj = np.maximum(j, 0)
            good = (j >= 0) & (q < self._old_hi[jj])
            p = self._by_old[jj]
            linear = self.kind[p] == LINEAR
            if end:
                new = np.where(linear, self.new_lo[p] + (q - self._old_lo[jj]) + np.uint64(1),
                               self.new_lo[p] + self.size[p].astype(np.uint64))
            else:
                new = np.where(linear, self.new_lo[p] + (q - self._old_lo[jj]), self.new_lo[p])
            res = np.where(good, new, np.uint64(0))
        out[rw] = res
        ok[rw] = good
        return out, ok

    def ranges(self, lo, hi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images of old ranges [lo, hi): (index of the range, new lo, new hi),
        merged where contiguous, ascending by range then address. Many ranges are
        taken a slice at a time (the intermediate arrays stay small)."""
        lo = np.asarray(lo, np.uint64)
        hi = np.asarray(hi, np.uint64)
        if len(lo) > CHUNK:
            parts = [self._ranges(lo[i:i + CHUNK], hi[i:i + CHUNK])
                     for i in range(0, len(lo), CHUNK)]
            return (np.concatenate([idx + i for (idx, _, _), i in
                                    zip(parts, range(0, len(lo), CHUNK))]),
                    np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
        return self._ranges(lo, hi)

    def _ranges(self, lo, hi):
        hi = np.maximum(np.asarray(hi, np.uint64), lo)
        idx_parts, nlo_parts, nhi_parts = [], [], []
        # Identity: [lo, hi) minus the rewritten intervals.
        k_lo = np.r_[np.uint64(0), self._rw_hi].astype(np.uint64)
        k_hi = np.r_[self._rw_lo, np.uint64(2**64 - 1)].astype(np.uint64)
        keep = k_hi > k_lo
        k_lo, k_hi = k_lo[keep], k_hi[keep]
        first = np.searchsorted(k_hi, lo, side="right")
        last = np.searchsorted(k_lo, hi, side="left")
        cnt = np.maximum(last - first, 0)
        r, j = _expand(first, cnt)
        if len(r):
            a = np.maximum(lo[r], k_lo[j])
            b = np.minimum(hi[r], k_hi[j])
            good = b > a
            idx_parts.append(r[good]); nlo_parts.append(a[good]); nhi_parts.append(b[good])
        # Pieces of new code standing for old code in [lo, hi).
        if len(self._old_lo):
            first = np.searchsorted(self._old_hi, lo, side="right")
            last = np.searchsorted(self._old_lo, hi, side="left")
            cnt = np.maximum(last - first, 0)
            r, j = _expand(first, cnt)
            if len(r):
                p = self._by_old[j]
                o_lo, o_hi = self._old_lo[j], self._old_hi[j]
                linear = self.kind[p] == LINEAR
                c_lo = np.maximum(lo[r], o_lo)
                c_hi = np.minimum(hi[r], o_hi)
                n0 = self.new_lo[p]
                a = np.where(linear, n0 + (c_lo - o_lo), n0)
                end = n0 + self.size[p].astype(np.uint64)
                reach_end = ~linear | (c_hi == o_hi)
                b = np.where(linear, n0 + (c_hi - o_lo), end)
                b = np.where(reach_end, end + self.ext[p].astype(np.uint64), b)
                # a POINT counts when its instruction starts inside the range
                good = np.where(linear, c_hi > c_lo, (o_lo >= lo[r]) & (o_lo < hi[r]))
                idx_parts.append(r[good]); nlo_parts.append(a[good]); nhi_parts.append(b[good])
        if not idx_parts:
            z = np.zeros(0, np.uint64)
            return np.zeros(0, np.int64), z, z
        idx = np.concatenate(idx_parts)
        nlo = np.concatenate(nlo_parts)
        nhi = np.concatenate(nhi_parts)
        order = np.lexsort((nlo, idx))
        idx, nlo, nhi = idx[order], nlo[order], nhi[order]
        # merge contiguous images of the same range
        if len(idx) > 1:
            join = np.r_[False, (idx[1:] == idx[:-1]) & (nlo[1:] <= nhi[:-1])]
            if join.any():
                start = np.flatnonzero(~join)
                group_hi = np.maximum.reduceat(nhi, start)
                idx, nlo, nhi = idx[start], nlo[start], group_hi
        return idx, nlo, nhi


def _expand(first: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each i, the pairs (i, first[i] + k) for k < cnt[i]."""
    total = int(cnt.sum())
    if not total:
        z = np.zeros(0, np.int64)
        return z, z
    r = np.repeat(np.arange(len(cnt), dtype=np.int64), cnt)
    starts = np.cumsum(cnt) - cnt
    j = np.arange(total, dtype=np.int64) - np.repeat(starts, cnt) + np.repeat(
        first.astype(np.int64), cnt)
    return r, j
