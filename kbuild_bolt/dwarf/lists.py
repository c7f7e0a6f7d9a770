"""Range lists and location lists: DWARF 5 (.debug_rnglists, .debug_loclists) and
DWARF 4 (.debug_ranges, .debug_loc), read to absolute addresses and written
again for moved code.

New lists are appended: for DWARF 5 as one more unit at the end of the section
(a header of its own, so tools that walk the section's units read them), for
DWARF 4 after the old lists. Old lists nobody points at any more stay where they
are; these sections are not loaded.

GCC's location views (DW_AT_GNU_locviews): a list of (begin view, end view)
ULEB128 pairs, one per bounded entry, placed right before the location list.
A new list keeps that shape.
"""

from __future__ import annotations

import struct

from kbuild_bolt.dwarf.leb import DwarfError, u16, u64, uleb

_PAIR = struct.Struct("<QQ").unpack_from

MAX = 0xFFFFFFFFFFFFFFFF

# DWARF 5 location list entries
LLE_END, LLE_BASE_X, LLE_STARTX_ENDX, LLE_STARTX_LENGTH, LLE_OFFSET_PAIR = 0, 1, 2, 3, 4
LLE_DEFAULT, LLE_BASE, LLE_START_END, LLE_START_LENGTH, LLE_GNU_VIEW_PAIR = 5, 6, 7, 8, 9
# DWARF 5 range list entries
RLE_END, RLE_BASE_X, RLE_STARTX_ENDX, RLE_STARTX_LENGTH, RLE_OFFSET_PAIR = 0, 1, 2, 3, 4
RLE_BASE, RLE_START_END, RLE_START_LENGTH = 5, 6, 7

DEFAULT = -1   # lo of a DW_LLE_default_location entry


def read_loclist(b, off: int, version: int, base: int) -> list[tuple[int, int, int, int, tuple]]:
    """Entries (lo, hi, expression start, expression length, views) with absolute
    addresses; a default location has lo == DEFAULT. ``views`` is () unless the
    list carries DW_LLE_GNU_view_pair entries itself."""
    out = []
    p = off
    if version >= 5:
        view = ()
        while True:
            kind = b[p]
            p += 1
            if kind == LLE_END:
                return out
            if kind == LLE_BASE:
                base = u64(b, p)
                p += 8
                continue
            if kind == LLE_GNU_VIEW_PAIR:
                v0, p = uleb(b, p)
                v1, p = uleb(b, p)
                view = (v0, v1)
                continue
            if kind == LLE_OFFSET_PAIR:
                a, p = uleb(b, p)
                c, p = uleb(b, p)
                lo, hi = base + a, base + c
            elif kind == LLE_START_END:
                lo, hi = u64(b, p), u64(b, p + 8)
                p += 16
            elif kind == LLE_START_LENGTH:
                lo = u64(b, p)
                n, p = uleb(b, p + 8)
                hi = lo + n
            elif kind == LLE_DEFAULT:
                lo = hi = DEFAULT
            else:
                raise DwarfError(f".debug_loclists at {off:#x}: entry kind {kind} is not supported")
            n, p = uleb(b, p)
            out.append((lo & MAX, hi & MAX, p, n, view))
            view = ()
            p += n
    while True:
        lo, hi = _PAIR(b, p)
        p += 16
        if lo == 0 and hi == 0:
            return out
        if lo == MAX:
            base = hi
            continue
        n = u16(b, p)
        p += 2
        out.append(((base + lo) & MAX, (base + hi) & MAX, p, n, ()))
        p += n


def read_rnglist(b, off: int, version: int, base: int) -> list[tuple[int, int]]:
    out = []
    p = off
    if version >= 5:
        while True:
            kind = b[p]
            p += 1
            if kind == RLE_END:
                return out
            if kind == RLE_BASE:
                base = u64(b, p)
                p += 8
            elif kind == RLE_OFFSET_PAIR:
                a, p = uleb(b, p)
                c, p = uleb(b, p)
                out.append(((base + a) & MAX, (base + c) & MAX))
            elif kind == RLE_START_END:
                out.append((u64(b, p), u64(b, p + 8)))
                p += 16
            elif kind == RLE_START_LENGTH:
                lo = u64(b, p)
                n, p = uleb(b, p + 8)
                out.append((lo, lo + n))
            else:
                raise DwarfError(f".debug_rnglists at {off:#x}: entry kind {kind} is not supported")
    while True:
        lo, hi = _PAIR(b, p)
        p += 16
        if lo == 0 and hi == 0:
            return out
        if lo == MAX:
            base = hi
            continue
        out.append(((base + lo) & MAX, (base + hi) & MAX))


class ListWriter:
    """One list section growing: its old content, then the new lists that
    encode_rnglists / encode_loclists write (for DWARF 5 inside one more unit,
    whose header finish() fills in)."""

    def __init__(self, old, version: int):
        self.version = version
        self.out = bytearray(old)
        self._unit = None
        if version >= 5:
            self._unit = len(self.out)
            self.out += bytes(12)            # unit header, filled in by finish()

    def finish(self) -> bytearray:
        """The section's bytes (the writer's own buffer, not a copy: a distro
        kernel's location lists are 80 MB)."""
        if self._unit is not None:
            n = len(self.out) - self._unit - 4
            self.out[self._unit:self._unit + 12] = (n.to_bytes(4, "little") + (5).to_bytes(2, "little")
                                                    + bytes((8, 0)) + bytes(4))
        return self.out


def read_loclists(b, offsets: list[int], version: int, bases: list[int]):
    """Every entry of the location lists at ``offsets`` as columns: (list index,
    lo, hi, expression position, expression length); a default location has
    lo == hi == DEFAULT (as unsigned). One loop over every list (millions of
    entries: no tuple per entry)."""
    from array import array

    L, LO, HI, EP, EL = array("q"), array("Q"), array("Q"), array("q"), array("q")
    if version < 5:
        for li, (off, base) in enumerate(zip(offsets, bases)):
            for lo, hi, p, n, _ in read_loclist(b, off, version, base):
                L.append(li)
                LO.append(lo & MAX)
                HI.append(hi & MAX)
                EP.append(p)
                EL.append(n)
        return L, LO, HI, EP, EL
    q64 = struct.Struct("<Q").unpack_from
    l_app, lo_app, hi_app, ep_app, el_app = L.append, LO.append, HI.append, EP.append, EL.append
    for li, (p, base) in enumerate(zip(offsets, bases)):
        while True:
            kind = b[p]
            p += 1
            if kind == LLE_OFFSET_PAIR:
                x = b[p]
                if x < 0x80:
                    a = x
                    p += 1
                else:
                    a, p = uleb(b, p)
                x = b[p]
                if x < 0x80:
                    c = x
                    p += 1
                else:
                    c, p = uleb(b, p)
                lo, hi = (base + a) & MAX, (base + c) & MAX
            elif kind == LLE_END:
                break
            elif kind == LLE_BASE:
                base = q64(b, p)[0]
                p += 8
                continue
            elif kind == LLE_START_LENGTH:
                lo = q64(b, p)[0]
                n, p = uleb(b, p + 8)
                hi = (lo + n) & MAX
            elif kind == LLE_START_END:
                lo, hi = _PAIR(b, p)
                p += 16
            elif kind == LLE_DEFAULT:
                lo = hi = DEFAULT & MAX
            elif kind == LLE_GNU_VIEW_PAIR:
                _, p = uleb(b, p)
                _, p = uleb(b, p)
                continue
            else:
                raise DwarfError(f".debug_loclists: entry kind {kind} is not supported")
            x = b[p]
            if x < 0x80:
                n = x
                p += 1
            else:
                n, p = uleb(b, p)
            l_app(li)
            lo_app(lo)
            hi_app(hi)
            ep_app(p)
            el_app(n)
            p += n
    return L, LO, HI, EP, EL


def read_view_pairs(b, offsets: list[int], counts: list[int]):
    from array import array

    VB, VE = array("q"), array("q")
    vb_app, ve_app = VB.append, VE.append
    for off, n in zip(offsets, counts):
        p = off
        for _ in range(n):
            x = b[p]
            if x < 0x80:
                v0 = x
                p += 1
            else:
                v0, p = uleb(b, p)
            x = b[p]
            if x < 0x80:
                v1 = x
                p += 1
            else:
                v1, p = uleb(b, p)
            vb_app(v0)
            ve_app(v1)
    return VB, VE


def encode_loclists(version: int, start: int, src, lst, lo, hi, epos, elen, default, vb, ve,
                    has_views, nlists: int):
    """New location lists, each [views][entries][end], appended at section offset
    ``start``. Records (one per new entry, grouped by list ``lst`` in order) ->
    (bytes, views offset per list, list offset per list)."""
    import numpy as np

    from kbuild_bolt.dwarf.vec import (copy_runs, exclusive_cumsum_by_group, put_le, put_uleb,
                                       uleb_size)

    n = len(lst)
    lst = np.asarray(lst, np.int64)
    length = (hi - lo).astype(np.uint64)
    elen = np.asarray(elen, np.int64)
    el_size = uleb_size(elen.astype(np.uint64)) if version >= 5 else np.full(n, 2, np.int64)
    if version >= 5:
        len_size = uleb_size(length)
        entry = np.where(default, 1 + el_size + elen, 1 + 8 + len_size + el_size + elen)
        head, tail = 0, 1
    else:
        len_size = np.zeros(n, np.int64)
        entry = 16 + 2 + elen
        head, tail = 16, 16
    views = has_views[lst] & ~default
    vb_size = np.where(views, uleb_size(np.asarray(vb, np.uint64)), 0)
    ve_size = np.where(views, uleb_size(np.asarray(ve, np.uint64)), 0)
    vsize = vb_size + ve_size
    v_total = np.bincount(lst, weights=vsize, minlength=nlists).astype(np.int64)
    e_total = np.bincount(lst, weights=entry, minlength=nlists).astype(np.int64) + head + tail
    total = v_total + e_total
    list_start = start + np.cumsum(total) - total
    views_off = list_start
    list_off = list_start + v_total
    buf = np.zeros(int(total.sum()), np.uint8)
    base = start
    # views
    vpos = views_off[lst] + exclusive_cumsum_by_group(vsize, lst) - base
    put_uleb(buf, vpos[views], np.asarray(vb, np.uint64)[views], vb_size[views])
    put_uleb(buf, (vpos + vb_size)[views], np.asarray(ve, np.uint64)[views], ve_size[views])
    # entries
    epos_out = list_off[lst] + head + exclusive_cumsum_by_group(entry, lst) - base
    if version >= 5:
        buf[epos_out] = np.where(default, LLE_DEFAULT, LLE_START_LENGTH).astype(np.uint8)
        b = ~default
        put_le(buf, epos_out[b] + 1, lo[b], 8)
        put_uleb(buf, epos_out[b] + 9, length[b], len_size[b])
        xpos = np.where(default, epos_out + 1, epos_out + 9 + len_size)
        put_uleb(buf, xpos, elen.astype(np.uint64), el_size)
        copy_runs(buf, xpos + el_size, src, epos, elen)
    else:
        heads = list_off - base
        has = e_total > head + tail
        put_le(buf, heads[has], np.full(int(has.sum()), MAX, np.uint64), 8)
        put_le(buf, epos_out, lo, 8)
        put_le(buf, epos_out + 8, hi, 8)
        put_le(buf, epos_out + 16, elen, 2)
        copy_runs(buf, epos_out + 18, src, epos, elen)
    return buf.tobytes(), views_off, list_off


def encode_rnglists(version: int, start: int, lst, lo, hi, nlists: int):
    """New range lists appended at section offset ``start``: records (lo, hi) grouped
    by list ``lst`` (0..nlists-1, in order; a list may have none) -> (bytes,
    offset of each list)."""
    import numpy as np

    from kbuild_bolt.dwarf.vec import exclusive_cumsum_by_group, put_le, put_uleb, uleb_size

    lst = np.asarray(lst, np.int64)
    lo = np.asarray(lo, np.uint64)
    hi = np.asarray(hi, np.uint64)
    if version < 5:
        keep = hi > lo                 # (an empty pair could read as the end of the list)
        lst, lo, hi = lst[keep], lo[keep], hi[keep]
    length = hi - lo
    if version >= 5:
        len_size = uleb_size(length)
        entry = 1 + 8 + len_size
        head, tail = 0, 1
    else:
        entry = np.full(len(lst), 16, np.int64)
        head, tail = 16, 16
    total = np.bincount(lst, weights=entry, minlength=nlists).astype(np.int64) + head + tail
    list_off = start + np.cumsum(total) - total
    buf = np.zeros(int(total.sum()), np.uint8)
    pos = list_off[lst] - start + head + exclusive_cumsum_by_group(entry, lst)
    if version >= 5:
        buf[pos] = RLE_START_LENGTH
        put_le(buf, pos + 1, lo, 8)
        put_uleb(buf, pos + 9, length, len_size)
    else:
        put_le(buf, list_off - start, np.full(nlists, MAX, np.uint64), 8)   # base 0
        put_le(buf, pos, lo, 8)
        put_le(buf, pos + 8, hi, 8)
    return buf.tobytes(), list_off
