"""Kernel tables after code moved: entries follow their code, records follow the bytes.

Every pointer field of every table (except ORC, which is regenerated) is
read from the table itself, mapped through the address map and written back
(PC-relative fields keep their flag bits). Tables the kernel's build-time
``sorttable`` keeps sorted (``__ex_table`` by instruction) are sorted again.

The relocation records inside table ranges are then recomputed from the bytes:
``sorttable`` sorts tables after the link without touching ``.rela``, so in the
input those records may describe entries at other positions; after this pass
each record states exactly what its field holds.
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.elf.image import FIELD_SIZE, PC_RELATIVE, RELA, type_and_symbol
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel.tables import base

REGENERATED = (".orc_unwind_ip", ".orc_unwind")


# Fields that name an instruction's bytes (what the kernel patches there), not a
# place control arrives at: they follow the bytes (a promoted call entered at its
# cmp keeps its bytes, and its .retpoline_sites entry, in its fallback).
BYTES_ROLES = (base.SITE, base.BRANCH, base.RANGE, base.OPERAND)


def update_entries(model, amap, out) -> dict[str, int]:
    """Map every pointer field into moved code; returns entries changed per table."""
    changed = {}
    for name, data in model.tables.items():
        if name in REGENERATED or not data.count:
            continue
        n_changed = 0
        bytes_fields = {ref.field for ref in data.spec.refs if ref.role in BYTES_ROLES}
        entries = out.array(data.addr, data.layout.dtype, len(data.entries))
        index = data.indices
        for f in data.layout.fields:
            if not f.is_pointer:
                continue
            targets = data.targets(f.name)
            moved = amap.moved(targets) & data.present(f.name)
            if not moved.any():
                continue
            new, ok = amap.translate(targets[moved], bytes_of=f.name in bytes_fields)
            if not ok.all():
                k = int(np.flatnonzero(moved)[np.flatnonzero(~ok)[0]])
                raise KbbError(f"{name}[{int(index[k])}].{f.name} points to "
                               f"{model.symbolize(int(targets[k]))}, code that was dropped")
            # Only entries whose target really changed (the entry block stays put).
            really = new != targets[moved]
            moved[np.flatnonzero(moved)[~really]] = False
            new = new[really]
            if not moved.any():
                continue
            rows = index[moved]
            if f.kind == "abs64":
                entries[f.name][rows] = new
            else:
                where = data.entry_address(rows) + np.uint64(f.offset)
                value = (new - where).view(np.int64)
                if f.flag_mask:
                    value = value | data.flags(f.name, rows).astype(np.int64)
                entries[f.name][rows] = value.astype(entries.dtype[f.name])
            n_changed += int(moved.sum())
        if n_changed:
            # (a module's tables are sorted by the loader and ftrace when it loads,
            # and each entry keeps its relocation record, against the section of
            # the code it names: entries must not change places)
            if data.spec.sorted_field and not model.is_module:
                sort_entries(data, entries)
            changed[name] = n_changed
    return changed


def reverse_static_keys(model, amap, out, flipped: np.ndarray) -> int:
    """The ``__jump_table`` entries of reversed static-key sites (``flipped``: rows
    of (function, site instruction, instruction it now jumps to)): their target
    becomes where the site now jumps, and their branch bit flips (the form the
    key's initial state selects flips with it, as the emitted site did).
    Returns the entries changed."""
    data = model.tables.get("__jump_table")
    if data is None or not len(flipped):
        return 0
    insns = model.insns
    new_target, ok = amap.translate(insns.addr[flipped[:, 2]])
    if not ok.all():
        raise KbbError("a reversed static-key site jumps to code that was dropped")
    target_of = dict(zip(insns.addr[flipped[:, 1]].tolist(), new_target.tolist()))
    codes = data.targets("code")
    mine = np.flatnonzero(isin(codes, np.fromiter(target_of, np.uint64, len(target_of))))
    if len(mine) != len(target_of):
        raise KbbError(f"{len(target_of) - len(mine)} reversed static-key sites have no "
                       "__jump_table entry")
    rows = data.indices[mine]
    entries = out.array(data.addr, data.layout.dtype, len(data.entries))
    f = data.layout.field("target")
    where = data.entry_address(rows) + np.uint64(f.offset)
    new = np.array([target_of[int(c)] for c in codes[mine].tolist()], np.uint64)
    entries["target"][rows] = (new - where).view(np.int64).astype(entries.dtype["target"])
    entries["key"][rows] ^= np.array(1, entries.dtype["key"])
    return len(rows)


def sort_entries(data, entries) -> None:
    """Sort a table by one PC-relative field, as the kernel's sorttable does."""
    f = data.layout.field(data.spec.sorted_field)
    n = len(entries)
    base_addr = np.uint64(data.addr)
    size = np.uint64(data.entry_size)
    where = base_addr + size * np.arange(n, dtype=np.uint64)
    absolute = {}
    for g in data.layout.fields:
        raw = entries[g.name].astype(np.int64)
        if g.kind in ("prel32", "prel32f", "prel64f"):
            flags = raw & np.int64(g.flag_mask) if g.flag_mask else 0
            absolute[g.name] = (where + np.uint64(g.offset) + (raw - flags).view(np.uint64), flags)
        else:
            absolute[g.name] = (entries[g.name].copy(), None)
    key = absolute[f.name][0]
    order = np.argsort(key, kind="stable")
    if np.array_equal(order, np.arange(n)):
        return
    for g in data.layout.fields:
        value, flags = absolute[g.name]
        if flags is None:
            entries[g.name] = value[order]
        else:
            rel = (value[order] - where - np.uint64(g.offset)).view(np.int64)
            if g.flag_mask:
                rel = rel | flags[order]
            entries[g.name] = rel.astype(entries.dtype[g.name])


def recompute_records(model, out, tables: set[str], new_values) -> int:
    """Make every relocation record inside the changed ``tables`` state what its
    field holds. Records of unchanged tables are left as they were (in tables
    sorttable sorted they may name other slots of the same table; recomputing
    them could point an absolute relocation at a zeroed slot). ORC records are
    written with the regenerated table."""
    image = model.image
    ranges = sorted((d.addr, d.addr + d.size) for name, d in model.tables.items()
                    if name not in REGENERATED and name in tables)
    if not ranges:
        return 0
    lo = np.array([r[0] for r in ranges], dtype=np.uint64)
    hi = np.array([r[1] for r in ranges], dtype=np.uint64)
    total = 0
    for rela in image.rela_sections:
        r = image.relocations(rela)
        if not len(r):
            continue
        i = np.searchsorted(lo, r["offset"], side="right").astype(np.int64) - 1
        inside = i >= 0
        inside[inside] &= r["offset"][inside] < hi[i[inside]]
        if not inside.any():
            continue
        records = np.frombuffer(out.mem, RELA, len(r), rela.offset)
        rtype, sym = type_and_symbol(r["info"])
        for t, size in FIELD_SIZE.items():
            sel = np.flatnonzero(inside & (rtype == t))
            if not len(sel):
                continue
            where = r["offset"][sel]
            value = out.read_fields(where, size, signed=t != 10)  # R_X86_64_32 is unsigned
            s = new_values[sym[sel]]
            if t in PC_RELATIVE:
                addend = (value + where - s).view(np.int64)
            else:
                addend = (value - s).view(np.int64)
            records["addend"][sel] = addend
            total += len(sel)
    return total


def sorted_ranges(model) -> list[tuple[int, int]]:
    """Tables sorted after the link (their input relocation records may be stale)."""
    out = []
    for name, data in model.tables.items():
        if data.spec.sorted_field:
            out.append((data.addr, data.addr + data.size))
    return out


__all__ = ["update_entries", "reverse_static_keys", "recompute_records", "sorted_ranges",
           "base"]
