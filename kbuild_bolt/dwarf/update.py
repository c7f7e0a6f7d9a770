"""The debug sections of a kernel whose code moved: every code address made true.

.debug_info keeps its size and layout (no DIE moves, so no reference inside it
changes): addresses are patched in place; a scope that is no longer contiguous
gets DW_AT_ranges in place of DW_AT_high_pc (same bytes: the section offset and a
padding attribute; its abbreviation is changed for every DIE that uses it, and
DW_AT_low_pc stays as the scope's entry). New range and location lists are
appended to their sections; .debug_line and .debug_aranges are written again;
.debug_frame gets new FDEs for code that moved (see ``frame``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.dwarf import aranges as aranges_mod
from kbuild_bolt.dwarf import frame as frame_mod
from kbuild_bolt.dwarf.expr import addr_operands
from kbuild_bolt.dwarf.image import CodeImage
from kbuild_bolt.dwarf.info import (AT_KBB_PADDING, AT_RANGES, FORM_ADDR, FORM_BLOCK, FORM_DATA1,
                                    FORM_DATA2, FORM_DATA4, FORM_DATA8, FORM_SEC_OFFSET,
                                    FORM_UDATA, TAG_COMPILE_UNIT, TAG_PARTIAL_UNIT, walk)
from kbuild_bolt.dwarf.leb import DwarfError, enc_sleb, enc_uleb, enc_uleb_padded, uleb
from kbuild_bolt.dwarf.lines import update_lines
from kbuild_bolt.dwarf.vec import get_le, put_le
from kbuild_bolt.dwarf.lists import (DEFAULT, ListWriter, encode_loclists, encode_rnglists,
                                     read_loclists, read_rnglist, read_view_pairs)
from kbuild_bolt.processes import ForkedCall

# The sections this module writes again (the others, .debug_str and friends, stay).
# Location lists written per slice of this many (bounds the memory of the records).
LIST_BATCH = 1 << 16
# Location lists read and imaged this many at a time (bounds the memory of their
# entries' images).
LIST_GROUP = 1 << 18
HIGH_SIZE = {FORM_DATA1: 1, FORM_DATA2: 2, FORM_DATA4: 4, FORM_DATA8: 8, FORM_ADDR: 8}


@dataclass
class DebugUpdate:
    sections: dict                       # name -> new bytes
    stats: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


class _Bytes:
    """Fixed-size little-endian fields of a bytearray, many at a time."""

    def __init__(self, buf: bytearray):
        self.buf = buf
        self.a = np.frombuffer(buf, np.uint8)

    def get(self, pos: np.ndarray, size: int) -> np.ndarray:
        return get_le(self.a, pos, size)

    def put(self, pos: np.ndarray, values: np.ndarray, size: int) -> None:
        put_le(self.a, pos, values, size)


def update_debug(read, image: CodeImage, progress=None) -> DebugUpdate:
    """``read(name)``: a debug section's bytes (None when absent); a bytearray for
    .debug_info is changed in place."""
    return DebugUpdater(read, image).run(progress)


class DebugUpdater:
    """The update on two cores. Line programs and aranges do not depend on
    .debug_info: a forked child starts on them at once (the caller goes on with
    other work), and :meth:`run` does the DIEs and what hangs off them (location
    lists in a second child), then takes the children's sections. Forked before
    .debug_info is read, so the first child's memory does not hold it."""

    def __init__(self, read, image: CodeImage):
        self.read, self.image = read, image
        self.abbrev = read(".debug_abbrev")
        self.apart = ForkedCall(_lines_and_aranges, read, image) if self.abbrev is not None \
            else None

    def run(self, progress=None) -> DebugUpdate:
        if self.apart is None:
            return DebugUpdate({})
        try:
            info = self.read(".debug_info")
            if info is None:
                self.cancel()
                return DebugUpdate({})
            return _info(info, self.abbrev, self.read, self.image, progress, self.apart)
        except BaseException:
            self.cancel()
            raise
        finally:
            self.abbrev = None

    def cancel(self) -> None:
        if self.apart is not None:
            self.apart.cancel()
            self.apart = None


def _lines_and_aranges(read, image: CodeImage):
    """(In a forked child.) Sections written without .debug_info: (sections, line
    program offsets old -> new)."""
    sections, offsets = {}, None
    line = read(".debug_line")
    if line is not None:
        sections[".debug_line"], offsets = update_lines(line, image)
    del line
    ar = read(".debug_aranges")
    if ar is not None:
        sections[".debug_aranges"] = aranges_mod.update(ar, image)
    return sections, offsets


def _info(info, abbrev, read, image: CodeImage, progress, apart: ForkedCall) -> DebugUpdate:
    """.debug_info and what hangs off it: addresses, then location lists in a
    second child while this process does scopes, range lists and abbreviations;
    then the children's sections, and their offsets patched in."""
    say = progress or (lambda *_: None)
    say("DWARF: reading .debug_info")
    found = walk(info, abbrev)
    # patched in place (no field read later overlaps one patched earlier)
    out = info if isinstance(info, bytearray) else bytearray(info)
    f = _Bytes(out)
    res = DebugUpdate({})
    stats = res.stats
    units = found.units
    version = np.array([u.version for u in units], np.int64)
    base = np.array([u.base for u in units], np.uint64)

    # Points: entry_pc, return addresses, labels.
    say("DWARF: addresses")
    p_pos = np.frombuffer(found.p_pos, np.int64)
    p_end = np.frombuffer(found.p_end, np.int64).astype(bool)
    vals = f.get(p_pos, 8)
    new = vals.copy()
    gone = 0
    for flag in (False, True):
        sel = p_end == flag
        if sel.any():
            n, ok = image.points(vals[sel], end=flag)
            new[sel] = n
            gone += int((~ok).sum())
    ch = new != vals
    f.put(p_pos[ch], new[ch], 8)
    stats["addresses"] = int(ch.sum())
    if gone:
        res.problems.append(f"{gone} addresses point at code that is gone (kept as they were)")
    del p_pos, p_end, vals, new, ch

    # Expressions in .debug_info: DW_OP_addr of code.
    stats["expression addresses"] = _patch_exprs(info, f, np.frombuffer(found.e_pos, np.int64),
                                                 np.frombuffer(found.e_len, np.int64), image)

    # Location lists need only what the walk found: a second child writes them.
    say("DWARF: scopes, range and location lists")
    lists = ForkedCall(_location_lists_apart, found, f, image, version, base, read)
    try:
        ranges = _ListSections("rng", read)    # (location lists are the child's)
        # Scopes.
        convert = _scopes(found, info, f, image, version, base, ranges.writer, res)
        # Range lists of DIEs that already have DW_AT_ranges.
        _range_lists(found, f, image, version, base, ranges.old[5], ranges.old[4],
                     ranges.writer, res)
        # Abbreviations changed for scopes that became ranges.
        new_abbrev, abbrev_offsets = _abbrevs(found, abbrev, convert)
        for u in units:
            f.put(np.array([u.abbrev_field]), np.array([abbrev_offsets[u.abbrev_offset]]), 4)
        res.sections.update(ranges.finish())
        # (what the walk found and the old lists are done with: freed before the
        # children's sections arrive, the peak of this process)
        del found, convert, ranges

        # .debug_frame here: this process would otherwise wait for the children
        say("DWARF: .debug_frame")
        fr = read(".debug_frame")
        if fr is not None:
            res.sections[".debug_frame"], frame_stats = frame_mod.update(fr, image)
            stats.update(frame_stats)
        del fr
        say("DWARF: line programs, location lists")
        apart_sections, offsets = apart.result()
        res.sections.update(apart_sections)
        del apart_sections
        if offsets is not None:
            for u in units:
                if u.stmt_list_field >= 0:
                    if u.stmt_list not in offsets:
                        raise DwarfError(f".debug_info unit at {u.offset:#x}: DW_AT_stmt_list "
                                         f"{u.stmt_list:#x} is not a line program")
                    f.put(np.array([u.stmt_list_field]), np.array([offsets[u.stmt_list]]), 4)
        list_sections, patches, list_stats = lists.result()
    except BaseException:
        lists.cancel()
        raise
    res.sections.update(list_sections)
    stats.update(list_stats)
    for pos, values, size in patches:
        f.put(pos, values, size)
    res.sections[".debug_info"] = out           # (a bytearray: no second copy)
    res.sections[".debug_abbrev"] = new_abbrev
    return res


class _Patches:
    """Reads fields like :class:`_Bytes`; records the writes (for the parent)."""

    def __init__(self, f: _Bytes):
        self.f = f
        self.patches = []

    def get(self, pos: np.ndarray, size: int) -> np.ndarray:
        return self.f.get(pos, size)

    def put(self, pos: np.ndarray, values: np.ndarray, size: int) -> None:
        self.patches.append((np.array(pos, np.int64), np.array(values, np.uint64), size))


def _location_lists_apart(found, f: _Bytes, image: CodeImage, version, base, read):
    """(In a forked child.) The location lists written again: (sections, the DIE
    fields to patch as (positions, values, size), stats)."""
    locations = _ListSections("loc", read)
    res = DebugUpdate({})
    fields = _Patches(f)
    _location_lists(found, fields, image, version, base, locations.old[5], locations.old[4],
                    locations.writer, res)
    return locations.finish(), fields.patches, res.stats


class _ListSections:
    """One kind of list section ("rng": .debug_rnglists / .debug_ranges, "loc":
    .debug_loclists / .debug_loc, for DWARF 5 / 4 units): the old bytes, and a
    writer per version that lists are added to (``writer(version, kind)``)."""

    NAMES = {"rng": {5: ".debug_rnglists", 4: ".debug_ranges"},
             "loc": {5: ".debug_loclists", 4: ".debug_loc"}}

    def __init__(self, kind: str, read):
        self.kind = kind
        self.old = {v: read(name) for v, name in self.NAMES[kind].items()}
        self.writers = {v: ListWriter(self.old[v] or b"", v) for v in (5, 4)}
        self.used = set()

    def writer(self, version: int, kind: str) -> ListWriter:
        assert kind == self.kind
        v = 5 if version >= 5 else 4
        self.used.add(v)
        return self.writers[v]

    def finish(self) -> dict:
        """The sections of the versions lists were added to."""
        return {self.NAMES[self.kind][v]: self.writers[v].finish() for v in self.used}


def _patch_exprs(data, f: _Bytes, pos: np.ndarray, length: np.ndarray, image: CodeImage) -> int:
    ops = []
    for p, n in zip(pos.tolist(), length.tolist()):
        if n >= 9:
            ops += addr_operands(data, p, n)
    if not ops:
        return 0
    ops = np.array(ops, np.int64)
    vals = f.get(ops, 8)
    new, ok = image.points(vals)
    ch = ok & (new != vals)
    f.put(ops[ch], new[ch], 8)
    return int(ch.sum())


def _high_values(info, found, sel: np.ndarray, f: _Bytes, lo: np.ndarray):
    """(hi, field size) of the DW_AT_high_pc of scopes ``sel``."""
    high = np.frombuffer(found.s_high, np.int64)[sel]
    form = np.frombuffer(found.s_high_form, np.int64)[sel]
    hi = np.zeros(len(high), np.uint64)
    size = np.zeros(len(high), np.int64)
    for fm, sz in HIGH_SIZE.items():
        m = form == fm
        if m.any():
            v = f.get(high[m], sz)
            hi[m] = v if fm == FORM_ADDR else lo[m] + v
            size[m] = sz
    m = form == FORM_UDATA
    for k in np.flatnonzero(m).tolist():
        v, e = uleb(info, int(high[k]))
        hi[k] = lo[k] + np.uint64(v)
        size[k] = e - int(high[k])
    bad = ~isin(form, list(HIGH_SIZE) + [FORM_UDATA])
    if bad.any():
        raise DwarfError(f"DW_AT_high_pc as form {int(form[bad][0]):#x} is not supported")
    return hi, size, form


def _scopes(found, info, f: _Bytes, image: CodeImage, version, base, writer, res):
    """low_pc/high_pc scopes: moved, or turned into ranges. Returns the
    abbreviations to convert: {(table offset, code): (high_pc form)}."""
    s_low = np.frombuffer(found.s_low, np.int64)
    s_high = np.frombuffer(found.s_high, np.int64)
    s_unit = np.frombuffer(found.s_unit, np.int64)
    s_code = np.frombuffer(found.s_code, np.int64)
    s_tag = np.frombuffer(found.s_tag, np.int64)
    sel = np.flatnonzero((s_high >= 0) & (s_low >= 0))
    lo = f.get(s_low[sel], 8)
    hi, size, form = _high_values(info, found, sel, f, lo)
    idx, nlo, nhi = image.ranges(lo, hi)
    count, fc, same = _image_shape(lo, hi, idx, nlo, nhi)
    empty_same = (count == 0) & (lo == hi)
    changed = ~(same | empty_same)
    is_cu = isin(s_tag[sel], [TAG_COMPILE_UNIT, TAG_PARTIAL_UNIT])
    unit_table = np.array([u.abbrev_offset for u in found.units], np.int64)
    table = unit_table[s_unit[sel]]
    # Contiguous still: new low_pc, new length.
    single = changed & (count == 1) & ~is_cu
    fits = single.copy()
    new_len = (nhi[fc] - nlo[fc]) if len(idx) else np.zeros(len(sel), np.uint64)
    for sz in (1, 2, 4):
        m = single & (size == sz) & (form != FORM_UDATA)
        fits[m] &= new_len[m] < (1 << (8 * sz))
    m = single & (form == FORM_UDATA)
    for k in np.flatnonzero(m).tolist():
        fits[k] = enc_uleb_padded(int(new_len[k]), int(size[k])) is not None
    empty_moved = changed & (count == 0) & (lo == hi)
    if empty_moved.any():
        # an empty scope stays empty where its address is now
        n, ok = image.points(lo[empty_moved])
        k = np.flatnonzero(empty_moved)
        f.put(s_low[sel][k[ok]], n[ok], 8)
        changed[k] = False
    simple = np.flatnonzero(fits)
    f.put(s_low[sel][simple], nlo[fc][simple], 8)
    for sz in (1, 2, 4, 8):
        m = simple[(size[simple] == sz) & (form[simple] != FORM_UDATA) & (form[simple] != FORM_ADDR)]
        f.put(s_high[sel][m], new_len[m], sz)
    m = simple[form[simple] == FORM_ADDR]
    f.put(s_high[sel][m], nhi[fc][m], 8)
    for k in simple[form[simple] == FORM_UDATA].tolist():
        p = int(s_high[sel][k])
        f.buf[p:p + int(size[k])] = enc_uleb_padded(int(new_len[k]), int(size[k]))
    res.stats["scopes moved"] = len(simple)
    # Not contiguous any more (or a unit's scope: its low_pc is the base of its lists).
    need = changed & ~fits
    convert = {}
    for t, c, fm in zip(table[need].tolist(), s_code[sel][need].tolist(), form[need].tolist()):
        convert[(t, c)] = fm
    if not convert:
        res.stats["scopes made ranges"] = 0
        return convert
    keys = table * (1 << 32) + s_code[sel]
    want = np.array([t * (1 << 32) + c for t, c in convert], np.int64)
    members = np.flatnonzero(isin(keys, want))
    # every DIE of a converted abbreviation must have room for a section offset
    small = members[(size[members] < 4) | ((form[members] == FORM_UDATA) & (size[members] < 5))]
    drop_low = set()
    if len(small):
        bad_keys = set(keys[small].tolist())
        # Where DW_AT_low_pc comes just before a short DW_AT_high_pc (GNU as
        # writes udata lengths), both fields together hold DW_AT_ranges: the
        # scope's entry is then its first range.
        s_unit_sel = s_unit[sel]
        for key in list(bad_keys):
            t, c = key >> 32, key & 0xFFFFFFFF
            mine = members[keys[members] == key]
            if _low_then_high(found.tables[t][c].specs) and \
                    (s_high[sel][mine] == s_low[sel][mine] + 8).all() and \
                    not any(is_cu[k] and _unit_has_lists(found, int(s_unit_sel[k]))
                            for k in mine.tolist()):
                drop_low.add((t, c))
                bad_keys.discard(key)
        for key in bad_keys:
            convert.pop((key >> 32, key & 0xFFFFFFFF), None)
        if bad_keys:
            lost = int(isin(keys[need], list(bad_keys)).sum())
            res.problems.append(f"{lost} scopes are not contiguous any more and their DW_AT_high_pc "
                                "has no room for DW_AT_ranges (kept as they were)")
        members = members[~isin(keys[members], list(bad_keys))]
    dropped = isin(keys[members], [t * (1 << 32) + c for t, c in drop_low])
    for key in drop_low:
        convert[key] = "drop_low"
    starts = np.cumsum(count) - count
    lo_entry, ok = image.points(lo[members])
    has = count[members] > 0
    first_lo = nlo[np.minimum(starts[members], max(len(nlo) - 1, 0))] if len(nlo) else lo[members]
    # low_pc: the scope's entry (where its first instruction is now)
    entry = np.where(ok, lo_entry, np.where(has, first_lo, lo[members]))
    m_version = np.where(version[s_unit[sel][members]] >= 5, 5, 4)
    # the bytes that hold DW_AT_ranges and the padding block
    high_pos = np.where(dropped, s_low[sel][members], s_high[sel][members])
    n = np.where(dropped, size[members] + 8, size[members])
    for v in (5, 4):
        mine = np.flatnonzero(m_version == v)
        if not len(mine):
            continue
        k = members[mine]
        per = count[k]
        rec = np.repeat(starts[k], per) + (np.arange(int(per.sum())) -
                                           np.repeat(np.cumsum(per) - per, per))
        w = writer(v, "rng")
        raw, offs = encode_rnglists(v, len(w.out), np.repeat(np.arange(len(k)), per),
                                    nlo[rec], nhi[rec], len(k))
        w.out += raw
        # DW_AT_ranges where DW_AT_high_pc was, then the padding attribute's
        # block (ULEB128 length, zeros) over the rest of its bytes
        f.put(high_pos[mine], offs, 4)
        pad = mine[n[mine] > 4]
        f.put(high_pos[pad] + 4, n[pad] - 5, 1)
        for j in range(5, int(n.max()) if len(n) else 0):
            z = pad[n[pad] > j]
            f.a[high_pos[z] + j] = 0
    keep_low = ~is_cu[members] & ~dropped
    f.put(s_low[sel][members][keep_low], entry[keep_low], 8)
    res.stats["scopes made ranges"] = len(members)
    return convert


def _low_then_high(specs) -> bool:
    """DW_AT_low_pc (an address) directly followed by DW_AT_high_pc."""
    for (at, form, _), (nxt, _, _) in zip(specs, specs[1:]):
        if at == 0x11 and form == FORM_ADDR:
            return nxt == 0x12
    return False


def _unit_has_lists(found, unit: int) -> bool:
    """Whether a unit has lists read relative to its base (its DW_AT_low_pc)."""
    l_unit = np.frombuffer(found.l_unit, np.int64)
    s_unit = np.frombuffer(found.s_unit, np.int64)
    s_ranges = np.frombuffer(found.s_ranges, np.int64)
    return bool((l_unit == unit).any() or ((s_unit == unit) & (s_ranges >= 0)).any())


def _image_shape(lo, hi, idx, nlo, nhi):
    """For ranges [lo, hi) and their images (CodeImage.ranges): pieces per range,
    the index of each range's first piece, and whether the image is the range
    itself (one piece, the same bounds)."""
    count = np.bincount(idx, minlength=len(lo))
    first = np.minimum(np.searchsorted(idx, np.arange(len(lo))), max(len(idx) - 1, 0))
    if not len(idx):
        return count, first, count == 0
    return count, first, (count == 1) & (nlo[first] == lo) & (nhi[first] == hi)


def _list_images(image: CodeImage, lo: np.ndarray, hi: np.ndarray):
    """Images of many ranges; an empty range maps to an empty range at its point."""
    idx, nlo, nhi = image.ranges(lo, hi)
    empty = np.flatnonzero(lo == hi)
    if len(empty):
        n, ok = image.points(lo[empty])
        idx = np.r_[idx, empty[ok]]
        nlo = np.r_[nlo, n[ok]]
        nhi = np.r_[nhi, n[ok]]
        order = np.lexsort((nlo, idx))
        idx, nlo, nhi = idx[order], nlo[order], nhi[order]
    return idx, nlo, nhi


def _range_lists(found, f, image, version, base, rng5, rng4, writer, res) -> None:
    """Range lists (DIEs that had DW_AT_ranges) of moved code written again."""
    s_ranges = np.frombuffer(found.s_ranges, np.int64)
    s_unit = np.frombuffer(found.s_unit, np.int64)
    sel = np.flatnonzero(s_ranges >= 0)
    if not len(sel):
        return
    offs = f.get(s_ranges[sel], 4).astype(np.int64)
    vers = np.where(version[s_unit[sel]] >= 5, 5, 4)
    total = 0
    for v, data in ((5, rng5), (4, rng4)):
        mine = np.flatnonzero(vers == v)
        if not len(mine):
            continue
        if data is None:
            raise DwarfError("DW_AT_ranges without a range list section")
        units = s_unit[sel][mine]
        key = offs[mine] * (1 << 32) + units        # (a DWARF 4 list is read with its unit's base)
        keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        lo_l, hi_l, which_l = [], [], []
        for li, (off, ui) in enumerate(zip(offs[mine][first].tolist(), units[first].tolist())):
            for a, c in read_rnglist(data, off, v, int(base[ui])):
                lo_l.append(a)
                hi_l.append(c)
                which_l.append(li)
        lo = np.array(lo_l, np.uint64)
        hi = np.array(hi_l, np.uint64)
        which = np.array(which_l, np.int64)
        idx, nlo, nhi = image.ranges(lo, hi)
        count, _, same = _image_shape(lo, hi, idx, nlo, nhi)
        same |= (count == 0) & (lo == hi)
        changed = np.zeros(len(keys), bool)
        changed[which[~same]] = True
        if not changed.any():
            continue
        # the pieces of changed lists, each list in address order
        rec_list = which[idx]
        keep = changed[rec_list]
        rec_list, r_lo, r_hi = rec_list[keep], nlo[keep], nhi[keep]
        order = np.lexsort((r_lo, rec_list))
        new_index = np.cumsum(changed) - 1
        w = writer(v, "rng")
        raw, list_off = encode_rnglists(v, len(w.out), new_index[rec_list[order]], r_lo[order],
                                        r_hi[order], int(changed.sum()))
        w.out += raw
        die_changed = changed[inverse]
        f.put(s_ranges[sel][mine][die_changed], list_off[new_index[inverse[die_changed]]], 4)
        total += int(changed.sum())
    res.stats["range lists"] = total


def _location_lists(found, f, image, version, base, loc5, loc4, writer, res) -> None:
    """Location lists of moved code written again (with their views), in bulk,
    a group of lists at a time: the images of a distro kernel's 1.8 M entries
    are tens of millions of pieces under a random layout, and the lists do not
    depend on each other."""
    l_pos = np.frombuffer(found.l_pos, np.int64)
    l_views = np.frombuffer(found.l_views, np.int64)
    l_unit = np.frombuffer(found.l_unit, np.int64)
    sel = np.flatnonzero(l_pos >= 0)
    if not len(sel):
        return
    offs = f.get(l_pos[sel], 4).astype(np.int64)
    vpos = l_views[sel]
    voffs = np.where(vpos >= 0, f.get(np.maximum(vpos, 0), 4).astype(np.int64), -1)
    vers = np.where(version[l_unit[sel]] >= 5, 5, 4)
    total = 0
    for v, data in ((5, loc5), (4, loc4)):
        mine = vers == v
        if not mine.any():
            continue
        if data is None:
            raise DwarfError("a location list without a location list section")
        key = offs[mine] * (1 << 32) + (voffs[mine] + 1)
        keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        lists = _LocationLists(data, offs[mine][first], voffs[mine][first],
                               base[l_unit[sel][mine][first]], v, image, writer)
        for g0 in range(0, len(keys), LIST_GROUP):
            lists.group(g0, min(g0 + LIST_GROUP, len(keys)))
        lists.finish()
        # DIE fields of changed lists
        die_changed = lists.changed[inverse]
        nl_of = lists.new_index[inverse[die_changed]]
        f.put(l_pos[sel][mine][die_changed], lists.list_off[nl_of], 4)
        vp = vpos[mine][die_changed]
        hv = vp >= 0
        f.put(vp[hv], lists.views_off[nl_of][hv], 4)
        total += int(lists.changed.sum())
    res.stats["location lists"] = total


class _LocationLists:
    """The distinct location lists of one section (offset, view list offset or -1,
    base address), changed lists appended to its writer group by group;
    ``changed``, ``new_index`` (among the changed), ``list_off`` and ``views_off``
    (per changed list) for the DIEs."""

    def __init__(self, data, l_off, l_voff, l_base, version, image, writer):
        self.data, self.version, self.image, self.writer = data, version, image, writer
        self.l_off, self.l_voff, self.l_base = l_off, l_voff, l_base
        self.src = np.frombuffer(data, np.uint8)
        self.fixed = False                  # src is a copy with DW_OP_addr fixed
        self.threes = np.flatnonzero(self.src == 3)   # (DW_OP_addr candidates)
        n = len(l_off)
        self.changed = np.zeros(n, bool)
        self.new_index = np.full(n, -1, np.int64)
        self.list_off = np.zeros(0, np.int64)
        self.views_off = np.zeros(0, np.int64)
        self._offsets = []                  # (list offsets, view list offsets) per batch
        self.n_changed = 0

    def finish(self) -> None:
        if self._offsets:
            self.list_off = np.concatenate([l for l, _ in self._offsets]).astype(np.int64)
            self.views_off = np.concatenate([v for _, v in self._offsets]).astype(np.int64)
        self._offsets = []

    def group(self, g0: int, g1: int) -> None:
        data, v, image = self.data, self.version, self.image
        l_voff = self.l_voff[g0:g1]
        cols = [np.frombuffer(c, dt) if len(c) else np.zeros(0, dt) for c, dt in zip(
            read_loclists(data, self.l_off[g0:g1].tolist(), v, self.l_base[g0:g1].tolist()),
            (np.int64, np.uint64, np.uint64, np.int64, np.int64))]
        e_list, e_lo, e_hi, e_pos, e_len = cols
        default = (e_lo == np.uint64(DEFAULT & 0xFFFFFFFFFFFFFFFF)) & (e_hi == e_lo)
        bounded = ~default
        nl = g1 - g0
        counts = np.bincount(e_list[bounded], minlength=nl)
        has_views = l_voff >= 0
        vb = np.zeros(len(e_list), np.int64)
        ve = np.zeros(len(e_list), np.int64)
        if has_views.any():
            vl = np.flatnonzero(has_views)
            b0, b1 = read_view_pairs(data, l_voff[vl].tolist(), counts[vl].tolist())
            in_view_list = bounded & has_views[e_list]
            vb[in_view_list] = np.frombuffer(b0, np.int64)
            ve[in_view_list] = np.frombuffer(b1, np.int64)
        # images of the bounded entries
        bi = np.flatnonzero(bounded)
        lo, hi = e_lo[bi], np.maximum(e_hi[bi], e_lo[bi])
        idx, nlo, nhi = _list_images(image, lo, hi)
        cnt, _, same = _image_shape(lo, hi, idx, nlo, nhi)
        del idx, lo, hi
        changed = np.zeros(nl, bool)
        changed[e_list[bi[~same]]] = True
        # DW_OP_addr of moved code inside the expressions
        fixes = _expression_fixes(data, self.src, self.threes, e_pos, e_len, image)
        if fixes is not None:
            ent, q, value = fixes
            changed[e_list[ent]] = True
            if not self.fixed:              # the copies of those expressions get the new values
                self.src, self.fixed = self.src.copy(), True
            put_le(self.src, q, value, 8)
        if not changed.any():
            return
        # new records: each bounded entry of a changed list -> its image pieces
        # (entries whose code is gone vanish); default entries stay as they are.
        # A slice of the changed lists at a time: the records are many.
        pieces_of = np.zeros(len(e_list), np.int64)
        pieces_of[bi] = cnt
        pieces_of[default] = 1
        start_of = np.zeros(len(e_list), np.int64)
        start_of[bi] = np.cumsum(cnt) - cnt
        new_list = np.cumsum(changed) - 1          # index in this group among changed lists
        changed_ids = np.flatnonzero(changed)
        self.changed[g0:g1] = changed
        self.new_index[g0 + changed_ids] = self.n_changed + np.arange(len(changed_ids))
        self.n_changed += len(changed_ids)
        w = self.writer(v, "loc")
        for c0 in range(0, len(changed_ids), LIST_BATCH):
            ids = changed_ids[c0:c0 + LIST_BATCH]
            a0 = int(np.searchsorted(e_list, ids[0], side="left"))
            a1 = int(np.searchsorted(e_list, ids[-1], side="right"))
            ents = a0 + np.flatnonzero(changed[e_list[a0:a1]])
            per = pieces_of[ents]
            rec_entry = np.repeat(ents, per)
            k = np.arange(len(rec_entry)) - np.repeat(np.cumsum(per) - per, per)
            is_def = default[rec_entry]
            j = np.minimum(np.where(is_def, 0, start_of[rec_entry] + k), max(len(nlo) - 1, 0))
            r_lo = np.where(is_def, np.uint64(0), nlo[j] if len(nlo) else np.uint64(0))
            r_hi = np.where(is_def, np.uint64(0), nhi[j] if len(nhi) else np.uint64(0))
            r_vb = np.where(k == 0, vb[rec_entry], 0)
            r_ve = np.where(k == pieces_of[rec_entry] - 1, ve[rec_entry], 0)
            r_list = new_list[e_list[rec_entry]] - c0
            del j, k
            raw, v_off, l_off = encode_loclists(
                v, len(w.out), self.src, r_list, r_lo.astype(np.uint64), r_hi.astype(np.uint64),
                e_pos[rec_entry], e_len[rec_entry], is_def, r_vb, r_ve, has_views[ids], len(ids))
            w.out += raw
            self._offsets.append((np.asarray(l_off), np.asarray(v_off)))


def _expression_fixes(data, src, threes, e_pos, e_len, image):
    """(entry, operand position, new value) for every DW_OP_addr of moved code in
    the expressions, or None. ``threes``: where ``src`` holds 3 (DW_OP_addr)."""
    if not len(threes):
        return None
    i = np.searchsorted(threes, e_pos)
    cand = np.flatnonzero((e_len >= 9) & (i < len(threes))
                          & (threes[np.minimum(i, len(threes) - 1)] < e_pos + e_len))
    ent, qs = [], []
    for e, p, n in zip(cand.tolist(), e_pos[cand].tolist(), e_len[cand].tolist()):
        for q in addr_operands(data, p, n):
            ent.append(e)
            qs.append(q)
    if not qs:
        return None
    ent = np.array(ent, np.int64)
    qs = np.array(qs, np.int64)
    vals = src[qs[:, None] + np.arange(8)].copy().view("<u8").ravel()
    new, ok = image.points(vals)
    fix = ok & (new != vals)
    if not fix.any():
        return None
    return ent[fix], qs[fix], new[fix]


def _abbrevs(found, abbrev, convert) -> tuple[bytes, dict[int, int]]:
    """.debug_abbrev with the converted declarations; old -> new table offsets."""
    from kbuild_bolt.dwarf.info import declarations

    out = bytearray()
    offsets = {}
    converted = {t for t, _ in convert}
    for off in sorted(found.tables):
        offsets[off] = len(out)
        if off not in converted:
            out += abbrev[off:found.table_ends[off]]
            continue
        for code, start, end, tag, children, specs in declarations(abbrev, off):
            fm = convert.get((off, code))
            if fm is None:
                out += abbrev[start:end]
                continue
            out += enc_uleb(code) + enc_uleb(tag) + bytes((1 if children else 0,))
            for at, form, const in specs:
                if at == 0x11 and fm == "drop_low":    # its bytes go to DW_AT_ranges
                    continue
                if at == 0x12:     # DW_AT_high_pc
                    if fm == "drop_low":
                        out += enc_uleb(AT_RANGES) + enc_uleb(FORM_SEC_OFFSET)
                        out += enc_uleb(AT_KBB_PADDING) + enc_uleb(FORM_BLOCK)
                        continue
                    out += enc_uleb(AT_RANGES) + enc_uleb(FORM_SEC_OFFSET)
                    if HIGH_SIZE.get(form, 5) > 4 or form == FORM_UDATA:
                        out += enc_uleb(AT_KBB_PADDING) + enc_uleb(FORM_BLOCK)
                    continue
                out += enc_uleb(at) + enc_uleb(form)
                if const is not None:
                    out += enc_sleb(const)
            out += b"\0\0"
        out += b"\0"
    return bytes(out), offsets

