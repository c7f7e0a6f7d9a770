"""The whole kernel as kbuild-bolt sees it before anything moves.

:class:`BinaryModel` ties together the ELF image, the kernel version, every
function and code region, their decoded instructions (flat numpy arrays, in
address order), every self-patching table, and every reference into code from
relocations and tables. Basic blocks and CFGs are built from it in
:mod:`kbuild_bolt.binary.cfg`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kbuild_bolt.arrays import SparseColumn, concat_ranges, isin, unique
from kbuild_bolt.binary.functions import (
    AUX_CODE_SECTIONS, MODULE_INFO_SECTION, FunctionTable, RegionTable, discover_functions,
    discover_regions,
)
from kbuild_bolt.elf.image import FIELD_SIZE, ElfImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel import tables as kernel_tables
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.kernel.version import KernelVersion, kernel_version
from kbuild_bolt.kernel.vmlinux import open_vmlinux
from kbuild_bolt.processes import in_shares
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86.patterns import is_fill

# ---------------------------------------------------------------------------
# Parallel decoding: children are forked with the image already mapped.

_WORKER_IMAGE: ElfImage | None = None


def _decode_chunk(chunk: list[tuple[int, int, int]]) -> x86.Decoded:
    """Decode ``(section_index, start, end)`` ranges of the inherited image."""
    image = _WORKER_IMAGE
    parts = []
    by_section: dict[int, list[tuple[int, int]]] = {}
    for sec, start, end in chunk:
        by_section.setdefault(sec, []).append((start, end))
    for sec, ranges in by_section.items():
        section = image.sections[sec]
        parts.append(x86.decode_ranges(image.section_data(section), section.addr, ranges))
    return x86.Decoded.concatenate(parts)


def decode_all(image: ElfImage, ranges, jobs: int) -> x86.Decoded:
    """Decode every ``(section_index, start, end)`` range (a list, or an (n, 3)
    array); with ``jobs`` > 1 in this process and forked children."""
    global _WORKER_IMAGE
    if isinstance(ranges, np.ndarray):
        ranges = ranges.reshape(-1, 3)
        ranges = ranges[np.argsort(ranges[:, 1], kind="stable")].tolist()
    else:
        ranges = sorted(ranges, key=lambda r: r[1])
    # Padding between functions is int3 fill, often megabytes of it (the holes
    # for cold code): no decoder needed, and one record per run of up to
    # FILL_RECORD bytes (see _split_int3_fill).
    fill, ranges = _split_int3_fill(image, ranges)
    if fill:
        decoded = decode_all(image, ranges, jobs) if ranges else x86.Decoded.empty()
        return x86.Decoded.merge(decoded, fill)
    total = sum(end - start for _, start, end in ranges)
    if jobs <= 1 or total < (1 << 20):
        _WORKER_IMAGE = image
        try:
            return _decode_chunk(ranges)
        finally:
            _WORKER_IMAGE = None
    # Contiguous chunks of about equal size, one per process, keep the result in
    # address order.
    target = total / jobs
    chunks, current, size = [], [], 0
    for r in ranges:
        current.append(r)
        size += r[2] - r[1]
        if size >= target and len(chunks) < jobs - 1:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    _WORKER_IMAGE = image
    try:
        parts = in_shares(_decode_chunk, chunks, jobs)
    finally:
        _WORKER_IMAGE = None
    return x86.Decoded.concatenate(parts, consume=True)


def same_bytes(image: ElfImage, other: ElfImage, section, lo, hi) -> np.ndarray | None:
    """For address ranges [lo, hi) of ``image``'s ``section``: whether ``other``
    holds the same bytes there; None when ``other``'s section of that name is
    not at the same address with the same size (or either has no bytes)."""
    there = other.section(section.name)
    if (there is None or (section.addr, section.size) != (there.addr, there.size)
            or not section.has_bits or not there.has_bits):
        return None
    changed = np.flatnonzero(image.bytes[section.offset:section.offset + section.size]
                             != other.bytes[there.offset:there.offset + there.size])
    # A range is unchanged when no changed offset lies in it: as many changed
    # offsets before its end as before its start. (Offsets, not a running count
    # over every byte: a rewrite changes a small part of tens of megabytes.)
    lo = np.clip((np.asarray(lo, np.uint64) - np.uint64(section.addr)).astype(np.int64), 0,
                 section.size)
    hi = np.clip((np.asarray(hi, np.uint64) - np.uint64(section.addr)).astype(np.int64), 0,
                 section.size)
    return np.searchsorted(changed, hi) == np.searchsorted(changed, lo)


def _unchanged_ranges(image: ElfImage, r: np.ndarray, like) -> tuple[x86.Decoded | None,
                                                                      np.ndarray]:
    """Split the (n, 3) ranges ``r`` into the instructions ``like`` decoded for
    ranges that are the same there (same bounds, same section placement, same
    bytes) and the ranges still to decode."""
    sec, start, end = r[:, 0].astype(np.int64), r[:, 1], r[:, 2]
    # The same range in ``like``: same start, end and section.
    known = like.decoded_range_array
    known = known[np.argsort(known[:, 1], kind="stable")]
    i = np.minimum(np.searchsorted(known[:, 1], start), max(len(known) - 1, 0))
    same = (len(known) > 0) & (known[i, 1] == start) & (known[i, 2] == end) \
        & (known[i, 0] == sec.astype(np.uint64))
    for k in unique(sec).tolist():
        in_sec = sec == k
        kept = same_bytes(image, like.image, image.sections[k], start[in_sec], end[in_sec])
        if kept is None:
            same[in_sec] = False
        else:
            same[in_sec] &= kept
    # (both files' code was read whole: its pages go back to the page cache)
    image.release_pages()
    like.image.release_pages()
    rest = r[~same]
    keep = r[same]
    if not len(keep):
        return None, r
    keep = keep[np.argsort(keep[:, 1], kind="stable")]
    addr = like.insns.addr
    lo = np.searchsorted(addr, keep[:, 1])
    hi = np.searchsorted(addr, keep[:, 2])
    if len(lo) > 1 and not (hi[:-1] <= lo[1:]).all():    # (ranges that overlap)
        return like.insns.take(concat_ranges(lo, hi - lo)), rest
    # Disjoint runs of instructions, in address order: taken by a mask (a
    # bool per instruction, not an int64 index of millions of them). Without
    # the empty runs, the starts are distinct and so are the ends (no ufunc.at).
    edge = np.zeros(len(addr) + 1, np.int8)
    runs = hi > lo
    edge[lo[runs]] += 1
    edge[hi[runs]] -= 1
    return like.insns.take(np.cumsum(edge[:-1], dtype=np.int8).view(bool)), rest


def _variable_bytes(like: "BinaryModel", section, starts, ends) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of ``like``'s code section whose value may differ in a copy of its code
    placed elsewhere: PC-relative fields of its instructions and fields its
    relocations fill (an instruction's length and kind never depend on them);
    and the bytes of relocations that are not such a field (no width kbuild-bolt
    knows, or not strictly inside one instruction): code there is decoded again.

    Exact inside the address ranges [starts, ends) (sorted, of this section):
    only what can reach into them is looked at (their instructions and the one
    before each, their relocations and those up to 8 bytes before). A layout
    of blocks in place asks about a few functions of the whole text."""
    variable = np.zeros(section.size, bool)
    unsure = np.zeros(section.size, bool)
    insns = like.insns
    sec_lo, sec_hi = np.array([section.addr, section.end], np.uint64)
    lo, hi = np.searchsorted(insns.addr, [sec_lo, sec_hi])
    a = np.maximum(np.searchsorted(insns.addr, starts) - 1, lo)
    b = np.minimum(np.searchsorted(insns.addr, ends), hi)
    # (ranges may overlap: a byte marked twice is marked all the same)
    idx = concat_ranges(a, np.maximum(b - a, 0))
    idx = idx[insns.field_size[idx] > 0]
    size = insns.field_size[idx].astype(np.int64)
    first = (insns.addr[idx] - np.uint64(section.addr)).astype(np.int64) + insns.field_off[idx]
    spots = concat_ranges(first, size)
    variable[spots[spots < section.size]] = True
    rel = like.code_relocations
    ra = np.searchsorted(rel.offset, np.maximum(starts, sec_lo + np.uint64(8)) - np.uint64(8))
    rb = np.searchsorted(rel.offset, np.minimum(ends, sec_hi))
    pick = concat_ranges(ra, np.maximum(rb - ra, 0))
    if len(pick):
        offset = rel.offset[pick]
        width = np.zeros(len(pick), np.int64)
        kinds = rel.type[pick]
        for kind, field_size in FIELD_SIZE.items():
            width[kinds == kind] = field_size
        at = like.insn_containing(offset)
        inside = (at >= 0) & (width > 0)
        inside[inside] &= (offset[inside] > insns.addr[at[inside]]) \
            & (offset[inside] + width[inside].astype(np.uint64) <= insns.end_of(at[inside]))
        start = (offset - np.uint64(section.addr)).astype(np.int64)
        spots = concat_ranges(start[inside], width[inside])
        variable[spots[spots < section.size]] = True
        unsure[np.minimum(start[~inside], section.size - 1)] = True
    return variable, unsure


def _moved_functions(image: ElfImage, functions: "FunctionTable", r: np.ndarray,
                     like: "BinaryModel") -> tuple[x86.Decoded | None, np.ndarray]:
    """Split the (n, 3) ranges ``r`` into the instructions of functions that ``like`` holds
    elsewhere with the same name, size and bytes (but for their PC-relative and
    relocated fields): ``like``'s decoding moved to the new place, each branch
    target and RIP-relative address read again from the new bytes; and the
    ranges still to decode. (A whole-kernel layout moves most functions
    unchanged: decoding them again would only repeat the input's decoding.)"""
    old = like.functions
    if not (len(old) and len(functions) and len(like.insns) and len(r)):
        return None, r
    rows = np.minimum(np.searchsorted(functions.start, r[:, 1]), max(len(functions) - 1, 0))
    whole = (functions.start[rows] == r[:, 1]) & (functions.end[rows] == r[:, 2]) \
        & (r[:, 2] > r[:, 1])
    # (only the names of the functions still to decode are looked for: a layout
    # of blocks in place leaves a few hundred of tens of thousands)
    wanted = {functions.names[i] for i in rows[whole].tolist()}
    known: dict[tuple[str, int], int] = {}
    ambiguous = set()
    sizes = (old.end - old.start).tolist()
    for row, name in enumerate(old.names):
        if name in wanted:
            key = (name, sizes[row])
            if key in known:
                ambiguous.add(key)
            known[key] = row
    old_row = np.full(len(r), -1, np.int64)
    seen = set()
    for i in np.flatnonzero(whole).tolist():
        key = (functions.names[rows[i]], int(r[i, 2] - r[i, 1]))
        if key in known and key not in ambiguous and key not in seen:
            seen.add(key)
            old_row[i] = known[key]
    # Same bytes but for the fields that may differ, section pair by section pair.
    ok = old_row >= 0
    new_sec = r[:, 0].astype(np.int64)
    old_sec = np.where(ok, old.section[np.maximum(old_row, 0)], -1).astype(np.int64)
    size = (r[:, 2] - r[:, 1]).astype(np.int64)
    for ns, os_ in set(zip(new_sec[ok].tolist(), old_sec[ok].tolist())):
        a_sec, b_sec = image.sections[ns], like.image.sections[os_]
        group = np.flatnonzero(ok & (new_sec == ns) & (old_sec == os_))
        if not (a_sec.has_bits and b_sec.has_bits):
            ok[group] = False
            continue
        new_off = (r[group, 1] - np.uint64(a_sec.addr)).astype(np.int64)
        old_start = old.start[old_row[group]]
        by_start = np.argsort(old_start, kind="stable")
        variable, unsure = _variable_bytes(like, b_sec, old_start[by_start],
                                           old_start[by_start] + size[group][by_start]
                                           .astype(np.uint64))
        old_off = (old_start - np.uint64(b_sec.addr)).astype(np.int64)
        # (128 KiB at a time: each byte compared takes about 40 bytes of index
        # arrays and masks)
        for part in np.array_split(np.arange(len(group)),
                                   max(1, int(size[group].sum()) >> 17)):
            if not len(part):
                continue
            n = size[group[part]]
            at_old = concat_ranges(old_off[part], n)
            differs = (like.image.bytes[b_sec.offset + at_old]
                       != image.bytes[a_sec.offset + concat_ranges(new_off[part], n)])
            differs &= ~variable[at_old]
            differs |= unsure[at_old]
            # (differing bytes before each function's end: none added over it)
            before = np.concatenate([[0], np.cumsum(differs, dtype=np.int64)])
            ends = np.cumsum(n)
            ok[group[part]] &= before[ends] == before[ends - n]
    image.release_pages()
    like.image.release_pages()
    # ... and the old function decoded as a whole run of instructions.
    old_lo = old.start[np.maximum(old_row, 0)]
    old_hi = old_lo + size.astype(np.uint64)
    a_insn = np.searchsorted(like.insns.addr, old_lo)
    b_insn = np.searchsorted(like.insns.addr, old_hi)
    ok &= (b_insn > a_insn) & (like.insns.end_of(np.maximum(b_insn - 1, 0)) == old_hi)
    chosen = np.flatnonzero(ok)
    rest = r[~ok]
    take = list(zip(a_insn[chosen].tolist(), b_insn[chosen].tolist()))
    shift = (r[chosen, 1] - old_lo[chosen]).view(np.int64).tolist()
    placed = r[chosen]
    if not take:
        return None, r
    lo_hi = np.array(take, np.int64)
    counts = lo_hi[:, 1] - lo_hi[:, 0]
    moved = like.insns.take(concat_ranges(lo_hi[:, 0], counts))
    owner = np.repeat(np.arange(len(take)), counts)
    refs = np.flatnonzero(moved.ref_kind != x86.REF_NONE)
    # Every target must be the next instruction's address plus the field's value
    # (no 16-bit branch, no 32-bit address size, a field of 1 or 4 bytes): checked
    # on the old code, where the decoder computed the targets; a function where
    # that rule does not hold is decoded again.
    odd = refs[_pc_relative_targets(like.image, moved, refs) != moved.ref[refs]]
    if len(odd):
        drop = np.zeros(len(take), bool)
        drop[owner[odd]] = True
        rest = np.concatenate([rest, placed[drop]])
        keep = ~drop[owner]
        moved, owner = moved.take(np.flatnonzero(keep)), owner[keep]
        refs = np.flatnonzero(moved.ref_kind != x86.REF_NONE)
    moved.addr = moved.addr + np.array(shift, np.int64)[owner].astype(np.uint64)
    if len(refs):
        moved.ref[refs] = _pc_relative_targets(image, moved, refs)
    rest = rest[np.argsort(rest[:, 1], kind="stable")]
    return moved.take(np.argsort(moved.addr, kind="stable")), rest


@dataclass
class KnownCode:
    """Code decoded before it was written into a file (a rewrite's new code,
    decoded on the other CPU while the rest of the output is made): each piece's
    address range, its bytes, and their decoding (each piece from its start).
    See :func:`_known_code` for what of it a model of the file takes."""

    start: np.ndarray     # uint64 per piece: sorted, disjoint
    end: np.ndarray
    offset: np.ndarray    # int64: where each piece's bytes are in ``code``
    code: bytes
    insns: x86.Decoded    # the pieces' instructions, in address order
    # Per byte of ``code``: inside the PC-relative field of an instruction whose
    # target is the next instruction plus the field's value (rel8/rel32/disp32),
    # out of reach of a ud2's look at the bytes after it. Such a byte may differ
    # in the file (a call's target filled in after the code was made): lengths
    # and kinds of instructions never depend on it, the target is read again.
    variable: np.ndarray
    regular: np.ndarray   # per instruction: its target follows that rule

    @classmethod
    def decode(cls, code, start, offset, length) -> "KnownCode":
        """The pieces ``code[offset:offset + length]`` placed at ``start``, decoded
        (empty pieces dropped; a piece overlapping one before it is left out)."""
        start = np.asarray(start, np.uint64)
        offset = np.asarray(offset, np.int64)
        length = np.asarray(length, np.int64)
        order = np.argsort(start, kind="stable")
        order = order[length[order] > 0]
        start, offset, length = start[order], offset[order], length[order]
        end = start + length.astype(np.uint64)
        keep = np.ones(len(start), bool)
        if len(start):
            reach = np.maximum.accumulate(end)
            keep[1:] = start[1:] >= reach[:-1]
        start, end, offset = start[keep], end[keep], offset[keep]
        code = bytes(np.asarray(code, np.uint8).data) if not isinstance(code, bytes) else code
        insns = x86.decode_ranges(code, 0, list(zip(start.tolist(), end.tolist())),
                                  offsets=offset.tolist())
        # Where each instruction's bytes are in ``code``.
        piece = np.searchsorted(start, insns.addr, side="right") - 1
        at = offset[piece] + (insns.addr - start[piece]).astype(np.int64)
        data = np.frombuffer(code, np.uint8)
        refs = np.flatnonzero((insns.ref_kind != x86.REF_NONE) & ~insns.invalid
                              & isin(insns.field_size, (1, 4)))
        field = at[refs] + insns.field_off[refs]
        raw = data[np.minimum(field[:, None] + np.arange(4), len(data) - 1)]
        disp = np.where(insns.field_size[refs] == 1, raw[:, 0].view(np.int8).astype(np.int64),
                        raw.copy().view("<i4").ravel().astype(np.int64))
        target = insns.addr[refs] + insns.length[refs] + disp.astype(np.uint64)
        refs = refs[target == insns.ref[refs]]
        regular = np.zeros(len(insns), bool)
        regular[refs] = True
        variable = np.zeros(len(data), bool)
        variable[concat_ranges(at[refs] + insns.field_off[refs],
                               insns.field_size[refs].astype(np.int64))] = True
        ud2 = np.flatnonzero(insns.flow == x86.EXCEPTION)
        looked_at = concat_ranges(at[ud2], np.full(len(ud2), 5, np.int64))
        variable[looked_at[looked_at < len(data)]] = False
        return cls(start, end, offset, code, insns, variable, regular)


def _known_code(image: ElfImage, r: np.ndarray, known: KnownCode) -> tuple[x86.Decoded | None,
                                                                         np.ndarray]:
    """Split the (n, 3) ranges ``r`` into the instructions ``known`` gives them
    and the ranges still to decode. A range that starts on one of its
    instructions takes them as far as they lie wholly inside both the range and
    the piece, over bytes that are the same in the file but for PC-relative
    fields (``KnownCode.variable``; the decoder is a pure function of the bytes
    and their address, and lengths and kinds do not depend on those fields:
    decoding the file there would give the same, targets read from the file's
    fields). What follows in the range is decoded here, from where they
    end (an instruction boundary of the file's own decoding). Left to decode
    whole: ranges it does not cover so, and ranges of nothing but int3 fill
    (decode_all keeps those as runs)."""
    insns = known.insns
    if not (len(r) and len(insns)):
        return None, r
    sec, start, end = r[:, 0].astype(np.int64), r[:, 1], r[:, 2]
    again = np.zeros(0, np.int64)
    piece = np.searchsorted(known.start, start, side="right").astype(np.int64) - 1
    piece_c = np.maximum(piece, 0)
    ok = (piece >= 0) & (start < known.end[piece_c]) & (end > start)
    first = np.searchsorted(insns.addr, start)
    first_c = np.minimum(first, len(insns) - 1)
    ok &= (first < len(insns)) & (insns.addr[first_c] == start)
    # Instructions wholly before the range's end and the piece's. (Ends, cut at
    # their piece's end, rise with the addresses: the pieces are disjoint, each
    # decoded from its start; only its last instruction may run past it.)
    ends = insns.end_of(slice(None))
    own_piece_end = known.end[np.searchsorted(known.start, insns.addr, side="right") - 1]
    limit = np.minimum(end, known.end[piece_c])
    last = np.searchsorted(np.minimum(ends, own_piece_end), limit, side="right").astype(np.int64)
    # ... and not past an instruction decoded from bytes the file may not hold:
    # one iced could not decode (or that ran past its piece), or a ud2 whose look
    # at the next bytes (for the xen/kvm emulation prefixes) reached past its piece.
    doubtful = np.flatnonzero(insns.invalid | ((insns.flow == x86.EXCEPTION)
                                               & (insns.addr + np.uint64(5) > own_piece_end)))
    k = np.searchsorted(doubtful, first)
    stop = np.where(k < len(doubtful), doubtful[np.minimum(k, max(len(doubtful) - 1, 0))]
                    if len(doubtful) else 0, len(insns))
    last = np.minimum(last, stop)
    ok &= last > first
    upto = np.where(ok, ends[np.maximum(last - 1, 0)], start)
    # The bytes they were decoded from, and those a ud2 among the last looked at
    # (up to 3 past the end), the same in the file.
    checked_end = np.minimum(upto + np.uint64(3), known.end[piece_c])
    rows = np.flatnonzero(ok)
    if len(rows):
        n = (checked_end[rows] - start[rows]).astype(np.int64)
        at_code = known.offset[piece[rows]] + (start[rows] - known.start[piece[rows]]).astype(
            np.int64)
        sec_offset = np.array([s.offset for s in image.sections], np.int64)
        sec_addr = np.array([s.addr for s in image.sections], np.uint64)
        in_file = np.array([s.has_bits for s in image.sections], bool)
        s_rows = sec[rows]
        at_file = sec_offset[s_rows] + (start[rows] - sec_addr[s_rows]).astype(np.int64)
        good = in_file[s_rows] & (at_file + n <= len(image.bytes))
        code = np.frombuffer(known.code, np.uint8)
        g = np.flatnonzero(good)
        in_code = concat_ranges(at_code[g], n[g])
        differs = np.flatnonzero((code[in_code] != image.bytes[concat_ranges(at_file[g], n[g])])
                                 & ~known.variable[in_code])
        ok[rows[~good]] = False
        if len(differs):
            # (other bytes that differ, an absolute address filled in after the
            # code was made, say: the instructions they are in decoded again)
            stops = np.cumsum(n[g])
            part = np.searchsorted(stops, differs, side="right")
            owner = g[part]
            at = start[rows[owner]] + (differs - (stops - n[g])[part]).astype(np.uint64)
            again, again_ref, failed = _decoded_again(image, insns, at, rows[owner],
                                                      upto[rows[owner]])
            ok[failed] = False
        rows = np.flatnonzero(ok)
    if len(rows):
        # (a range of int3 alone is fill, kept by decode_all as runs)
        fill = insns.flow[first[rows]] == x86.INTERRUPT
        if fill.any():
            f = rows[fill]
            long_enough = (end[f] - start[f]) >= np.uint64(16)
            for row in f[long_enough].tolist():
                section = image.sections[int(sec[row])]
                lo = section.offset + int(start[row]) - section.addr
                if (image.bytes[lo:lo + int(end[row] - start[row])] == x86.INT3).all():
                    ok[row] = False
            rows = np.flatnonzero(ok)
    # (a range that overlaps another is left to decode_all, which orders the
    # instructions they share)
    by_start = np.argsort(start, kind="stable")
    ordered_end = end[by_start]
    reach = np.maximum.accumulate(ordered_end)
    overlaps = np.zeros(len(r), bool)
    overlaps[1:] = start[by_start][1:] < reach[:-1]
    overlaps[:-1] |= ordered_end[:-1] > start[by_start][1:]
    ok[by_start[overlaps]] = False
    rows = by_start[ok[by_start]]
    if not len(rows):
        return None, r
    # (ascending positions: the sparse column keeps its entries as they are)
    index = concat_ranges(first[rows], last[rows] - first[rows])
    found = insns.take(index)
    # Targets read from the file's fields (they may differ from the pieces'), or
    # given by the decoding again.
    entries = found.ref.index
    regular = known.regular[index[entries]]
    found.ref.values[regular] = _pc_relative_targets(image, found, entries[regular])
    if len(again):
        k = np.searchsorted(again, index[entries])
        hit = again[np.minimum(k, len(again) - 1)] == index[entries]
        found.ref.values[hit] = again_ref[k[hit]]
    # What follows in each range taken, decoded from where its instructions end:
    # mostly the int3 after code that shrank, an instruction per byte.
    tails = rows[upto[rows] < end[rows]]
    parts = []
    if len(tails):
        int3, all_int3 = _int3_tails(image, sec[tails], upto[tails], end[tails])
        parts.append(int3)
        tails = tails[~all_int3]
    for k_sec in unique(sec[tails]).tolist():
        section = image.sections[k_sec]
        these = tails[sec[tails] == k_sec]
        parts.append(x86.decode_ranges(image.section_data(section), section.addr,
                                       list(zip(upto[these].tolist(), end[these].tolist()))))
    for part in parts:
        if len(part):
            found = x86.Decoded.merge(found, part)
    return found, r[~ok]


def _decoded_again(image: ElfImage, insns: x86.Decoded, at: np.ndarray, row: np.ndarray,
                   upto: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Known instructions (of ranges ``row``, taken up to ``upto``) whose bytes
    differ in the file at the addresses ``at``: each one holding such a byte, and
    each ud2 whose look at the bytes after it reaches one, decoded from the file.
    Returns those that decode the same but for their target (sorted indices),
    their targets from the file, and the rows where one does not (all taken
    again from the file's decoding)."""
    holder = np.searchsorted(insns.addr, at, side="right").astype(np.int64) - 1
    candidates = [holder[at < upto]]
    for back in range(1, 5):
        j = np.searchsorted(insns.addr, at - np.uint64(back), side="right").astype(np.int64) - 1
        ud2 = (j >= 0) & (insns.flow[np.maximum(j, 0)] == x86.EXCEPTION) \
            & (insns.addr[np.maximum(j, 0)] + np.uint64(5) > at) \
            & (insns.addr[np.maximum(j, 0)] < upto)
        candidates.append(j[ud2])
    which = unique(np.concatenate(candidates))
    which = which[which >= 0]
    same = np.ones(len(which), bool)
    ref = np.zeros(len(which), np.uint64)
    lo = insns.addr[which]
    hi = lo + insns.length[which]
    for section in image.sections:
        inside = (lo >= np.uint64(section.addr)) & (lo < np.uint64(section.end))
        if not inside.any():
            continue
        k = np.flatnonzero(inside)
        if not section.has_bits:
            same[k] = False
            continue
        fresh = x86.decode_ranges(image.section_data(section), section.addr,
                                  list(zip(lo[k].tolist(), hi[k].tolist())))
        # (each must be one instruction, as before but for its target)
        owner = np.searchsorted(lo[k], fresh.addr, side="right") - 1
        count = np.bincount(owner, minlength=len(k))
        one = count == 1
        first = np.searchsorted(owner, np.arange(len(k)))
        f = np.minimum(first, max(len(fresh) - 1, 0))
        if len(fresh):
            old = which[k]
            one &= (fresh.addr[f] == lo[k]) & (fresh.length[f] == insns.length[old]) \
                & (fresh.flow[f] == insns.flow[old]) & (fresh.ref_kind[f] == insns.ref_kind[old]) \
                & (fresh.field_off[f] == insns.field_off[old]) \
                & (fresh.field_size[f] == insns.field_size[old]) \
                & (fresh.invalid[f] == insns.invalid[old])
            ref[k] = fresh.ref[f]
        same[k] = one
    failed_insns = which[~same]
    # (the rows of the bytes that led to an instruction that differs)
    bad_byte = isin(holder, failed_insns)
    for j_back in range(1, 5):
        j = np.searchsorted(insns.addr, at - np.uint64(j_back), side="right").astype(np.int64) - 1
        bad_byte |= isin(j, failed_insns)
    return which[same], ref[same], unique(row[bad_byte])


def _int3_tails(image: ElfImage, sec: np.ndarray, lo: np.ndarray,
                hi: np.ndarray) -> tuple[x86.Decoded, np.ndarray]:
    """The decoding of the ranges [lo, hi) (of sections ``sec``) made of int3
    alone -- each byte an int3, as the decoder gives it -- and which ranges
    those are (the others are left to the decoder)."""
    sec_offset = np.array([s.offset for s in image.sections], np.int64)
    sec_addr = np.array([s.addr for s in image.sections], np.uint64)
    in_file = np.array([s.has_bits for s in image.sections], bool)
    n = (hi - lo).astype(np.int64)
    at = sec_offset[sec] + (lo - sec_addr[sec]).astype(np.int64)
    whole = in_file[sec] & (at + n <= len(image.bytes))
    w = np.flatnonzero(whole)
    other = image.bytes[concat_ranges(at[w], n[w])] != x86.INT3
    before = np.concatenate([[0], np.cumsum(other, dtype=np.int64)])
    stops = np.cumsum(n[w])
    whole[w] = before[stops] == before[stops - n[w]]
    k = np.flatnonzero(whole)
    addr = concat_ranges(lo[k].astype(np.int64), n[k]).astype(np.uint64)
    count = len(addr)
    z8 = np.zeros(count, np.uint8)
    return x86.Decoded(addr, np.ones(count, np.uint8), np.full(count, x86.INTERRUPT, np.uint8),
                       SparseColumn.zeros(count, np.uint64), z8, z8.copy(), z8.copy(),
                       np.zeros(count, bool)), whole


def _pc_relative_targets(image: ElfImage, insns: x86.Decoded, refs: np.ndarray) -> np.ndarray:
    """Next instruction + the rel8/rel32/disp32 field's value, for ``insns[refs]``
    (0 where the field is of another size)."""
    size = insns.field_size[refs]
    raw = read_at(image, insns.addr[refs] + insns.field_off[refs], 4)
    disp = np.where(size == 1, raw[:, 0].view(np.int8).astype(np.int64),
                    raw.view("<i4").ravel().astype(np.int64))
    target = insns.addr[refs] + insns.length[refs] + disp.astype(np.uint64)
    return np.where(isin(size, (1, 4)), target, np.uint64(0))


def read_at(image: ElfImage, addrs, count: int) -> np.ndarray:
    """``count`` bytes at each address of ``image``'s allocated sections, as an
    (n, count) uint8 array (0 past a section)."""
    addrs = np.asarray(addrs, dtype=np.uint64)
    out = np.zeros((len(addrs), count), np.uint8)
    if not len(addrs):
        return out
    # Addresses in order (instruction lists usually are): each section is one
    # slice, found by binary search instead of a pass over all of them.
    ordered = bool(np.all(addrs[1:] >= addrs[:-1]))
    for section in image.sections:
        if not (section.is_alloc and section.has_bits and section.size):
            continue
        if ordered:
            lo, hi = np.searchsorted(addrs, np.array([section.addr, section.end], np.uint64))
            if lo == hi:
                continue
            sel = slice(int(lo), int(hi))
        else:
            inside = (addrs >= np.uint64(section.addr)) & (addrs < np.uint64(section.end))
            if not inside.any():
                continue
            sel = np.flatnonzero(inside)
        data = image.bytes[section.offset:section.offset + section.size]
        rel = (addrs[sel] - np.uint64(section.addr)).astype(np.int64)
        # One gather per byte column (not an (n, count) index array: this
        # reads millions of instructions' first bytes)
        for k in range(count):
            at = rel + k if k else rel
            past = at >= section.size
            if past.any():
                at = np.minimum(at, section.size - 1)
                column = data[at]
                column[past] = 0
            else:
                column = data[at]
            out[sel, k] = column
    return out


# Longest record standing for a run of int3 fill (``Decoded.length`` is uint8).
FILL_RECORD = 255


def _split_int3_fill(image: ElfImage, ranges):
    """Separate ranges made only of int3 bytes, returned already decoded.

    Such a range is its first byte, then one record per FILL_RECORD bytes, not
    one per byte: flow INTERRUPT, no reference. Labels cut ranges, so what names
    fill names a range's first byte, a record of its own as before (function
    placement keeps a labelled byte where it is and reuses the rest). Nothing
    executes the fill between functions, and what asks about it works from
    start and length (slot ends, free room, grown functions); an address inside
    a run is still an instruction start (BinaryModel.in_int3_run). The holes for
    cold code are megabytes: per byte they were three quarters of all
    instruction records, and of every pass over them."""
    rest, starts, lengths = [], [], []
    # Only ranges that start with int3 can be fill (one byte read for each first).
    first_offset = np.array([image.sections[sec].offset + start - image.sections[sec].addr
                             for sec, start, _ in ranges], np.int64)
    first_offset = np.minimum(first_offset, len(image.bytes) - 1)
    starts_int3 = (image.bytes[first_offset] == x86.INT3).tolist() if ranges else []
    for r, maybe in zip(ranges, starts_int3):
        sec, start, end = r
        section = image.sections[sec]
        if maybe and end - start >= 16:
            data = image.bytes[section.offset + start - section.addr:
                               section.offset + end - section.addr]
            if (data == x86.INT3).all():
                at = np.r_[np.uint64(start),
                           np.arange(start + 1, end, FILL_RECORD, dtype=np.uint64)]
                starts.append(at)
                lengths.append(np.diff(np.r_[at, np.uint64(end)]).astype(np.uint8))
                continue
        rest.append(r)
    if not starts:
        return None, rest
    addr = np.concatenate(starts)
    n = len(addr)
    z8 = np.zeros(n, np.uint8)
    return x86.Decoded(addr, np.concatenate(lengths), np.full(n, x86.INTERRUPT, np.uint8),
                       SparseColumn.zeros(n, np.uint64), z8, z8, z8, np.zeros(n, bool)), rest


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------


@dataclass
class Timing:
    steps: dict

    def add(self, name: str, started: float) -> float:
        now = time.perf_counter()
        self.steps[name] = round(now - started, 3)
        return now


@dataclass
class RelocationIndex:
    """Relocations as flat arrays sorted by the address they patch."""

    offset: np.ndarray   # uint64
    type: np.ndarray     # uint32
    sym: np.ndarray      # int64 symbol index
    addend: np.ndarray   # int64
    rela: np.ndarray     # int16 index of the .rela section

    @classmethod
    def build(cls, image: ElfImage, exec_only: bool = False) -> "RelocationIndex":
        parts = []
        for rela in image.rela_sections:
            if exec_only and not image.sections[rela.info].is_exec:
                continue
            r = image.relocations(rela)
            parts.append((r, rela.index))
        if not parts:
            z = np.zeros(0)
            return cls(z.astype(np.uint64), z.astype(np.uint32), z.astype(np.int64),
                       z.astype(np.int64), z.astype(np.int16))
        offset = np.concatenate([r["offset"] for r, _ in parts])
        info = np.concatenate([r["info"] for r, _ in parts])
        addend = np.concatenate([r["addend"] for r, _ in parts])
        rela = np.concatenate([np.full(len(r), i, np.int16) for r, i in parts])
        order = np.argsort(offset, kind="stable")
        return cls(offset[order], (info[order] & 0xFFFFFFFF).astype(np.uint32),
                   (info[order] >> np.uint64(32)).astype(np.int64), addend[order], rela[order])

    def __len__(self) -> int:
        return len(self.offset)

    def first_in(self, starts, ends) -> np.ndarray:
        """Index of the first relocation in each [start, end) range, or -1."""
        i = np.searchsorted(self.offset, np.asarray(starts, dtype=np.uint64)).astype(np.int64)
        ok = i < len(self.offset)
        ok[ok] &= self.offset[i[ok]] < np.asarray(ends, dtype=np.uint64)[ok]
        return np.where(ok, i, -1)


def check_readable(image: ElfImage, require_relocations=False) -> None:
    """What a model of ``image`` needs of it, or a one-line error."""
    if not image.has_symbols:
        raise KbbError(f"{image.path}: no symbol table (stripped vmlinux); kbuild-bolt needs "
                       "the symbols of the linked vmlinux")
    if require_relocations and not image.has_relocations:
        raise KbbError(f"{image.path}: no relocations; link with --emit-relocs and keep them "
                       "(6.12's x86 post-link pass strips them: use vmlinux.unstripped)")


class BinaryModel:
    """Everything known about a vmlinux's code before it is rewritten."""

    def __init__(self, image: ElfImage, *, jobs: int | None = None, require_relocations=False,
                 like: "BinaryModel | None" = None, decoded: x86.Decoded | None = None,
                 consume_like: bool = False, known: KnownCode | None = None):
        """``decoded``: this very image's instructions, decoded before (binary.saved).
        ``like``: a model of a related vmlinux (the input of a rewrite, when this
        is its output): code ranges with the same bounds and the same bytes in
        both take its decoding instead of decoding again (the decoder is a pure
        function of the bytes and their address). ``consume_like``: ``like`` is
        of no use after this (a forked child's copy): its instructions are let
        go as soon as what is reused is taken from them. ``known``: code decoded
        before it was written here (:class:`KnownCode`), taken where it is the
        same bytes."""
        self.image = image
        self.timing = Timing({})
        t = time.perf_counter()
        check_readable(image, require_relocations)
        self.version: KernelVersion = kernel_version(image)
        self.functions: FunctionTable = discover_functions(image)
        self.regions: RegionTable = discover_regions(image, self.functions)
        t = self.timing.add("symbols", t)
        self.tables = kernel_tables.read_all(image, self.version.series)
        t = self.timing.add("tables", t)
        # (section index, start, end) of every range decoded: functions, then regions
        self.decoded_range_array = np.concatenate([
            np.stack([part.section.astype(np.uint64), part.start, part.end],
                     axis=1).astype(np.uint64).reshape(-1, 3)
            for part in (self.functions, self.regions)])
        if decoded is not None:
            self.insns = decoded
            self.timing.add("decode", t)
            return
        reused = moved = predecoded = None
        ranges = self.decoded_range_array
        if like is not None:
            reused, ranges = _unchanged_ranges(image, ranges, like)
            moved, ranges = _moved_functions(image, self.functions, ranges, like)
            if consume_like:
                like.insns = None   # (millions of instructions: the merge below is the peak)
        if known is not None:
            predecoded, ranges = _known_code(image, ranges, known)
        self.insns: x86.Decoded = decode_all(image, ranges, jobs or default_jobs())
        # (the few first: the whole kernel's instructions are merged into once)
        for part in (predecoded, moved, reused):
            if part is not None and len(part):
                self.insns = x86.Decoded.merge(self.insns, part)
        self.timing.add("decode", t)

    @property
    def is_module(self) -> bool:
        """A loadable module (placed at addresses: elf.place), not a vmlinux."""
        return self.image.section(MODULE_INFO_SECTION) is not None

    def external(self, addrs) -> np.ndarray:
        """Per address: in a symbol a placed module uses but does not define
        (another module's or the kernel's: what it holds is not known here)."""
        from kbuild_bolt.elf.place import EXTERNAL_SECTION

        section = self.image.section(EXTERNAL_SECTION)
        addrs = np.asarray(addrs, np.uint64)
        if section is None:
            return np.zeros(len(addrs), bool)
        return (addrs >= np.uint64(section.addr)) & (addrs < np.uint64(section.end))

    @classmethod
    def open(cls, path, **kw) -> "BinaryModel":
        return cls(open_vmlinux(path), **kw)

    # -- instruction lookups -----------------------------------------------

    def insn_index(self, addrs) -> np.ndarray:
        """Index of the instruction starting exactly at each address, or -1."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        i = np.searchsorted(self.insns.addr, addrs).astype(np.int64)
        i_clipped = np.minimum(i, len(self.insns.addr) - 1)
        hit = (i < len(self.insns.addr)) & (self.insns.addr[i_clipped] == addrs)
        return np.where(hit, i_clipped, -1)

    def insn_containing(self, addrs) -> np.ndarray:
        """Index of the decoded instruction covering each address, or -1."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        insns = self.insns
        i = np.searchsorted(insns.addr, addrs, side="right").astype(np.int64) - 1
        ok = i >= 0
        j = i[ok]       # (the end of these alone: see is_boundary)
        ok[ok] &= addrs[ok] < insns.addr[j] + insns.length[j]
        return np.where(ok, i, -1)

    def is_boundary(self, addrs) -> np.ndarray:
        """True where an address starts an instruction or ends the last one of a range."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        # (an end is the end of the last instruction starting before it: no column
        # of every instruction's end is made for it, as verifying an output would)
        insns = self.insns
        if not len(insns):
            return np.zeros(len(addrs), bool)
        at = np.searchsorted(insns.addr, addrs, side="left").astype(np.int64)
        starts = (at < len(insns)) & (insns.addr[np.minimum(at, len(insns) - 1)] == addrs)
        k = np.maximum(at - 1, 0)
        out = starts | ((at > 0) & (insns.addr[k] + insns.length[k] == addrs))
        out[~out] = self.in_int3_run(addrs[~out])
        return out

    def in_int3_run(self, addrs) -> np.ndarray:
        """True where an address is inside a run of int3 fill kept as one record
        (_split_int3_fill), past the record's first byte: every int3 byte starts
        an instruction of its own (a table entry kept at a function's old end can
        lie there once the function shrinks)."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        k = self.insn_containing(addrs)
        inside = k >= 0
        inside[inside] = self.insns.addr[k[inside]] != addrs[inside]
        sel = np.flatnonzero(inside)
        inside[sel] = self.is_int3_run(k[sel])
        return inside

    def is_int3_run(self, idx) -> np.ndarray:
        """True where an instruction record stands for a run of int3 fill bytes."""
        idx = np.asarray(idx, dtype=np.int64)
        out = (self.insns.length[idx] > 1) & (self.insns.flow[idx] == x86.INTERRUPT)
        sel = np.flatnonzero(out)
        if len(sel):
            # (the decoder makes a one-byte record of int3; a longer record that
            # starts with one is a run of fill)
            out[sel] = self.read_bytes(self.insns.addr[idx[sel]], 1)[:, 0] == x86.INT3
        return out

    @cached_property
    def function_of_insn(self) -> np.ndarray:
        """Function row of every instruction (-1 for region code)."""
        return self.functions.rows_containing(self.insns.addr)

    @cached_property
    def fill_insn(self) -> np.ndarray:
        """int3 or a nop at each instruction (found once: padding, alignment and
        the room after functions are asked about by several passes)."""
        insns = self.insns
        out = np.zeros(len(insns), bool)
        check = np.flatnonzero((insns.flow == x86.NEXT) | (insns.flow == x86.INTERRUPT))
        out[check] = is_fill(self, check)
        return out

    @cached_property
    def function_first_insn(self) -> np.ndarray:
        return np.searchsorted(self.insns.addr, self.functions.start).astype(np.int64)

    @cached_property
    def function_end_insn(self) -> np.ndarray:
        return np.searchsorted(self.insns.addr, self.functions.end).astype(np.int64)

    def read_bytes(self, addrs, count: int) -> np.ndarray:
        """``count`` bytes at each address, as an (n, count) uint8 array (0 past a section)."""
        return read_at(self.image, addrs, count)

    # -- sections and symbols ----------------------------------------------

    aux_sections = AUX_CODE_SECTIONS

    @cached_property
    def _alloc_index(self):
        alloc = sorted((s for s in self.image.sections if s.is_alloc and s.size),
                       key=lambda s: s.addr)
        return (np.array([s.addr for s in alloc], dtype=np.uint64),
                np.array([s.end for s in alloc], dtype=np.uint64),
                np.array([s.index for s in alloc], dtype=np.int64))

    def section_index_of(self, addrs) -> np.ndarray:
        """Index of the allocated section holding each address (-1: none)."""
        starts, ends, index = self._alloc_index
        addrs = np.asarray(addrs, dtype=np.uint64)
        i = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] &= addrs[ok] < ends[i[ok]]
        return np.where(ok, index[np.maximum(i, 0)], -1)

    @cached_property
    def symbol_values(self) -> np.ndarray:
        """Sorted unique addresses of all defined symbols."""
        symbols = self.image.symbols
        defined = (symbols.shndx > 0) & (symbols.shndx < 0xFF00)
        return unique(symbols.value[defined])

    def symbol_addresses(self, name: str, exact: bool = False) -> np.ndarray:
        """Addresses of defined symbols named ``name`` (or starting with it)."""
        key = (name, exact)
        cache = self.__dict__.setdefault("_symbol_address_cache", {})
        if key not in cache:
            symbols = self.image.symbols
            defined = (symbols.shndx > 0) & (symbols.shndx < 0xFF00)
            if name.isascii():   # (compared in the string table: a NUL ends an exact name)
                named = symbols.names_start_with((name + "\0",) if exact else (name,))
            else:
                named = np.array([n == name if exact else n.startswith(name)
                                  for n in symbols.names], bool)
            cache[key] = unique(symbols.value[named & defined].astype(np.uint64))
        return cache[key]

    @cached_property
    def patch_units(self) -> tuple[np.ndarray, np.ndarray]:
        """Merged [start, end) ranges in code the kernel patches as one unit
        (alternative and paravirt original sites): moved whole, never split."""
        starts, ends = [], []
        for data in self.tables.values():
            for ref in data.spec.refs:
                if ref.role != base.RANGE or "function" not in ref.places:
                    continue
                lengths = data.entries[ref.other][data.indices].astype(np.uint64)
                targets = data.targets(ref.field)
                keep = lengths > 0
                starts.append(targets[keep])
                ends.append(targets[keep] + lengths[keep])
        if not starts:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        start = np.concatenate(starts)
        end = np.concatenate(ends)
        order = np.argsort(start, kind="stable")
        start, end = start[order], end[order]
        # Merge overlapping ranges (ALTERNATIVE_2 and nested alternatives share sites).
        running = np.maximum.accumulate(end)
        new = np.ones(len(start), bool)
        new[1:] = start[1:] >= running[:-1]
        group = np.cumsum(new) - 1
        merged_start = start[new]
        merged_end = np.zeros(len(merged_start), np.uint64)
        np.maximum.at(merged_end, group, end)
        return merged_start, merged_end

    @cached_property
    def insn_inside_patch_unit(self) -> np.ndarray:
        """``inside_patch_unit`` for every instruction (bool per instruction)."""
        starts, ends = self.patch_units
        addr = self.insns.addr
        # Instructions after a unit's start and before its end, marked per unit.
        lo = np.searchsorted(addr, starts, side="right").astype(np.int64)
        counts = np.maximum(np.searchsorted(addr, ends, side="left") - lo, 0)
        inside = np.zeros(len(addr), bool)
        inside[concat_ranges(lo, counts)] = True
        return inside

    def inside_patch_unit(self, addrs) -> np.ndarray:
        """True where an address lies strictly inside a patch unit (not at its start)."""
        return self.in_patch_unit(addrs, at_start=False)

    def in_patch_unit(self, addrs, at_start: bool = True) -> np.ndarray:
        """True where an address lies in a patch unit (its start included unless
        ``at_start`` is False)."""
        starts, ends = self.patch_units
        addrs = np.asarray(addrs, dtype=np.uint64)
        i = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] &= addrs[ok] < ends[i[ok]]
        if not at_start:
            ok[ok] &= addrs[ok] > starts[i[ok]]
        return ok

    @cached_property
    def code_relocations(self) -> "RelocationIndex":
        """Relocations that apply to code sections, sorted by offset."""
        return RelocationIndex.build(self.image, exec_only=True)

    # -- naming ------------------------------------------------------------

    @cached_property
    def _label_index(self):
        """Sorted (address, name) of function starts and code labels, for symbolizing."""
        symbols = self.image.symbols
        names = symbols.names
        mask = isin(symbols.type, (0, 1, 2)) & (symbols.shndx > 0) & (symbols.shndx < 0xFF00)
        idx = np.flatnonzero(mask)
        idx = np.array([i for i in idx.tolist() if names[i] and not names[i].startswith(".L")],
                       dtype=np.int64)
        # Prefer function symbols and globals at equal addresses.
        rank = (symbols.type[idx] != 2).astype(np.int64) * 2 + (symbols.bind[idx] == 0)
        order = np.lexsort((rank, symbols.value[idx]))
        idx = idx[order]
        values = symbols.value[idx]
        first = np.ones(len(idx), bool)
        first[1:] = values[1:] != values[:-1]
        return values[first], [names[i] for i in idx[first].tolist()]

    def symbolize(self, addr: int) -> str:
        """``name+0xoff`` for an address (functions first, then the nearest label)."""
        row = self.functions.find(addr)
        if row >= 0:
            off = addr - int(self.functions.start[row])
            name = self.functions.names[row]
            return f"{name}+{off:#x}" if off else name
        values, names = self._label_index
        i = int(np.searchsorted(values, np.uint64(addr), side="right")) - 1
        if i >= 0:
            off = addr - int(values[i])
            if off < (1 << 20):
                return f"{names[i]}+{off:#x}" if off else names[i]
        return f"{addr:#x}"

    def code_place(self, addr: int) -> str:
        """Which kind of code an address is in: function, region kind, or section."""
        if self.functions.find(addr) >= 0:
            return "function"
        section = self.image.section_at(addr)
        if section is None:
            return "outside"
        if section.name in AUX_CODE_SECTIONS:
            return section.name
        return "region" if section.is_exec else section.name
