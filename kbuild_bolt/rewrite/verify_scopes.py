"""Scopes and location lists of a rewritten kernel, checked at instructions.

For every checked instruction, the set of scopes (subprograms, inlined
subroutines, lexical blocks, units) whose address ranges contain it, and the
location expression each location list gives there, must be the same at its new
address in the output as at its old address in the input. The check reads both
files' .debug_info, range lists and location lists and compares at instruction
addresses, so it does not depend on how the writer turned ranges into images.

A set is compared by a fingerprint: every (scope) or (list, expression) gets a
64-bit hash, added at the start of each of its ranges and subtracted at the end
(wrapping sums); the fingerprint at an address is the sum of the events at or
before it. Equal sets give equal sums; a difference is then explained by the
intervals that contain the two addresses.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from kbuild_bolt.dwarf.expr import addr_operands
from kbuild_bolt.dwarf.info import FORM_ADDR, FORM_DATA1, FORM_DATA2, FORM_DATA4, FORM_DATA8, FORM_UDATA, walk
from kbuild_bolt.dwarf.leb import uleb
from kbuild_bolt.dwarf.lists import DEFAULT, MAX, read_loclists, read_rnglist
from kbuild_bolt.dwarf.vec import get_le
from kbuild_bolt.elf.image import ElfImage

_SIZES = {FORM_DATA1: 1, FORM_DATA2: 2, FORM_DATA4: 4, FORM_DATA8: 8}


@dataclass
class Intervals:
    """[lo, hi) ranges, each with the hash of what it stands for and a key that
    names it in a report (a DIE attribute's position in .debug_info)."""

    lo: np.ndarray
    hi: np.ndarray
    h: np.ndarray
    key: np.ndarray

    def fingerprint(self, addrs: np.ndarray) -> np.ndarray:
        ok = self.hi > self.lo
        pos = np.concatenate([self.lo[ok], self.hi[ok]])
        val = np.concatenate([self.h[ok], (np.uint64(0) - self.h[ok])])
        order = np.argsort(pos, kind="stable")
        pos, total = pos[order], np.cumsum(val[order], dtype=np.uint64)
        k = np.searchsorted(pos, addrs, side="right").astype(np.int64) - 1
        return np.where(k >= 0, total[np.maximum(k, 0)], np.uint64(0))

    def at(self, addr: int) -> set:
        m = (self.lo <= np.uint64(addr)) & (np.uint64(addr) < self.hi)
        return set(zip(self.key[m].tolist(), self.h[m].tolist()))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a key to a well-spread 64-bit hash."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _u(data, pos: np.ndarray, size: int) -> np.ndarray:
    return get_le(np.frombuffer(data, np.uint8), pos, size)


class DebugTables:
    """One file's scopes and location lists, read for checking."""

    def __init__(self, path: str):
        with ElfImage(path) as image:
            def read(name):
                s = image.section(name)
                return None if s is None else image.read_file_range(s.offset, s.size)
            self.info, abbrev = read(".debug_info"), read(".debug_abbrev")
            self.rng = {5: read(".debug_rnglists"), 4: read(".debug_ranges")}
            self.loc = {5: read(".debug_loclists"), 4: read(".debug_loc")}
        self.found = walk(self.info, abbrev) if self.info is not None else None

    def scopes(self) -> Intervals:
        f, info = self.found, self.info
        s_low = np.frombuffer(f.s_low, np.int64)
        s_high = np.frombuffer(f.s_high, np.int64)
        s_form = np.frombuffer(f.s_high_form, np.int64)
        s_ranges = np.frombuffer(f.s_ranges, np.int64)
        s_unit = np.frombuffer(f.s_unit, np.int64)
        key = np.where(s_low >= 0, s_low, np.where(s_ranges >= 0, s_ranges, s_high))
        lo_l, hi_l, k_l = [], [], []
        # low_pc/high_pc pairs
        pair = np.flatnonzero((s_ranges < 0) & (s_low >= 0) & (s_high >= 0))
        lo = _u(info, s_low[pair], 8)
        hi = np.zeros(len(pair), np.uint64)
        form = s_form[pair]
        for fm, sz in _SIZES.items():
            m = form == fm
            hi[m] = lo[m] + _u(info, s_high[pair][m], sz)
        m = form == FORM_ADDR
        hi[m] = _u(info, s_high[pair][m], 8)
        for i in np.flatnonzero(form == FORM_UDATA).tolist():
            hi[i] = lo[i] + np.uint64(uleb(info, int(s_high[pair][i]))[0])
        lo_l.append(lo), hi_l.append(hi), k_l.append(key[pair])
        # range lists
        version = np.array([u.version for u in f.units], np.int64)
        base = [u.base for u in f.units]
        rl = np.flatnonzero(s_ranges >= 0)
        offs = _u(info, s_ranges[rl], 4).astype(np.int64)
        a, c, k = [], [], []
        for i, off in zip(rl.tolist(), offs.tolist()):
            ui = int(s_unit[i])
            v = 5 if version[ui] >= 5 else 4
            for x, y in read_rnglist(self.rng[v], off, v, base[ui]):
                a.append(x)
                c.append(y)
                k.append(int(key[i]))
        lo_l.append(np.array(a, np.uint64)), hi_l.append(np.array(c, np.uint64))
        k_l.append(np.array(k, np.int64))
        keys = np.concatenate(k_l)
        return Intervals(np.concatenate(lo_l), np.concatenate(hi_l), _mix(keys), keys)

    def locations(self, code=None) -> Intervals:
        """Location-list entries hashed by (attribute, expression); with ``code``
        (the input's side), code addresses in an expression are hashed as their
        images, so an expression the writer had to change compares equal."""
        f, info = self.found, self.info
        l_pos = np.frombuffer(f.l_pos, np.int64)
        l_unit = np.frombuffer(f.l_unit, np.int64)
        sel = np.flatnonzero(l_pos >= 0)
        version = np.array([u.version for u in f.units], np.int64)
        base = np.array([u.base for u in f.units], np.uint64)
        offs = _u(info, l_pos[sel], 4).astype(np.int64)
        vers = np.where(version[l_unit[sel]] >= 5, 5, 4)
        out = []
        for v in (5, 4):
            mine = np.flatnonzero(vers == v)
            if not len(mine):
                continue
            data = self.loc[v]
            cols = [np.frombuffer(x, dt) if len(x) else np.zeros(0, dt) for x, dt in zip(
                read_loclists(data, offs[mine].tolist(), v, base[l_unit[sel][mine]].tolist()),
                (np.int64, np.uint64, np.uint64, np.int64, np.int64))]
            e_list, e_lo, e_hi, e_pos, e_len = cols
            keep = e_lo != np.uint64(DEFAULT & MAX)
            e_list, e_lo, e_hi, e_pos, e_len = (x[keep] for x in cols)
            eh = np.fromiter((_expr_hash(data, p, n, code) for p, n in
                              zip(e_pos.tolist(), e_len.tolist())), np.uint64, len(e_pos))
            attr = l_pos[sel][mine][e_list]
            out.append(Intervals(e_lo, e_hi, _mix(attr.astype(np.uint64) ^ _mix(eh)), attr))
        if not out:
            z = np.zeros(0, np.uint64)
            return Intervals(z, z, z, np.zeros(0, np.int64))
        return Intervals(*(np.concatenate([getattr(o, n) for o in out])
                           for n in ("lo", "hi", "h", "key")))


def _expr_hash(data, p: int, n: int, code) -> int:
    expr = data[p:p + n]
    if code is not None and 0x03 in expr:
        ops = addr_operands(data, p, n)
        if ops:
            expr = bytearray(expr)
            vals = np.array([int.from_bytes(data[o:o + 8], "little") for o in ops], np.uint64)
            new, ok = code.points(vals)
            for o, val, good in zip(ops, new.tolist(), ok.tolist()):
                if good:
                    expr[o - p:o - p + 8] = int(val).to_bytes(8, "little")
    return zlib.crc32(expr) | (n << 32)


def compare(before: Intervals, after: Intervals, old: np.ndarray, new: np.ndarray, what: str,
            limit: int = 20) -> tuple[int, list[str]]:
    """(mismatches, explanations of the first ``limit``)."""
    bad = np.flatnonzero(before.fingerprint(old) != after.fingerprint(new))
    problems = []
    for i in bad[:limit].tolist():
        o, n = int(old[i]), int(new[i])
        x, y = before.at(o), after.at(n)
        lost = sorted(k for k, _ in x - y)
        gained = sorted(k for k, _ in y - x)
        problems.append(f"{o:#x} -> {n:#x}: {what} at .debug_info "
                        + (f"{', '.join(f'{k:#x}' for k in lost[:4])} lost" if lost else "")
                        + ("; " if lost and gained else "")
                        + (f"{', '.join(f'{k:#x}' for k in gained[:4])} gained" if gained else ""))
    return len(bad), problems
