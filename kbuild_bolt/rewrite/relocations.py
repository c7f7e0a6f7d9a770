"""Relocations after code moved: where they are, what they point at, the bytes they make.

With --emit-relocs every reference between sections has a relocation: data
pointing into code (jump tables, exception and other kernel tables, function
pointers), code into data, code into other code. When code moves:

- a relocation *in* moved code moves with its instruction (same offset inside it);
- a relocation *to* moved code (symbol+addend inside a rewritten function, where
  the symbol is a section symbol or lies in that function: anything else is
  address arithmetic such as ``_text + 0xfff``) gets the new addend; in code a
  PC-relative field refers to S + A + (end of instruction - P);
- the field it describes is recomputed (S + A - P for PC-relative, S + A for
  absolute), so bytes and records always agree, which is what x86's ``relocs``
  tool needs to derive ``vmlinux.relocs`` for KASLR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import inside_ranges, isin, union_ranges
from kbuild_bolt.elf.image import FIELD_SIZE, PC_RELATIVE, RELA, SIGNED, type_and_symbol
from kbuild_bolt.errors import KbbError

def field_values(rtype: int, s: np.ndarray, a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The relocated values (int64, wrapping as the 64-bit arithmetic does; kernel
    addresses are negative), checked to fit the field."""
    s, a, p = (np.asarray(x).astype(np.uint64).view(np.int64) for x in (s, a, p))
    value = (s + a - p) if rtype in PC_RELATIVE else (s + a)
    bits = 8 * FIELD_SIZE[rtype]
    if bits < 64:
        lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if SIGNED[rtype] else (0, 1 << bits)
        bad = np.flatnonzero((value < lo) | (value >= hi))
        if len(bad):
            raise KbbError(f"relocation type {rtype}: value {int(value[bad[0]]) & (2**64 - 1):#x} "
                           f"at {int(p[bad[0]]) & (2**64 - 1):#x} does not fit")
    return value


@dataclass
class RelocationUpdate:
    rela_section: object
    index: np.ndarray      # relocations changed (indices into the section)
    offset: np.ndarray     # their new offsets
    addend: np.ndarray     # their new addends
    rewrite_field: np.ndarray  # bool: recompute the field bytes


def names_moved_code(model, sym: np.ndarray, target: np.ndarray,
                     fixed: np.ndarray | None = None) -> np.ndarray:
    """True where symbol+addend refers to code inside the function it lands in
    (the symbol is a section, or lies in that same function). A symbol in
    ``fixed`` (a region marker: ``_sinittext``, ``__sched_text_start``) names
    its own place, not the function that happened to start there."""
    symbols = model.image.symbols
    functions = model.functions
    row = functions.rows_containing(target)
    same = functions.rows_containing(symbols.value[sym]) == row
    if fixed is not None:
        same &= ~fixed[sym]
    return (symbols.type[sym] == 3) | same


def plan_updates(model, amap, new_values, skip_ranges=(), fixed=None) -> list[RelocationUpdate]:
    """Relocation changes for every .rela section, given the address map and the
    symbols' values in the output; records located in ``skip_ranges`` (kernel
    tables, handled from their own bytes) are left to the caller. ``fixed``:
    symbols that stay although code at their address moved (region markers).

    A record that names moved code gets the addend that makes S' + A' the new
    target; a record whose symbol moved but that does not name moved code (address
    arithmetic relative to the symbol) keeps its addend, and its field follows the
    symbol."""
    image = model.image
    symbols = image.symbols
    updates = []
    # (the ranges skipped, merged and sorted: each record is looked up once)
    skip = np.array([(lo, hi) for lo, hi in skip_ranges if hi > lo], np.uint64).reshape(-1, 2)
    skip = union_ranges(skip)
    for rela in image.rela_sections:
        r = image.relocations(rela)
        if not len(r):
            continue
        rtype, _ = type_and_symbol(r["info"])
        # (only the records handled here are looked at further: ORC's alone are
        # hundreds of thousands, all in a table)
        records = np.flatnonzero(isin(rtype, list(FIELD_SIZE))
                                 & ~inside_ranges(skip, r["offset"]))
        if not len(records):
            continue
        r = r[records]
        rtype, sym = type_and_symbol(r["info"])
        offset = r["offset"]
        addend = r["addend"]

        off_moved = amap.moved(offset)
        new_offset, ok_off = amap.translate(offset, moved=off_moved)
        if (off_moved & ~ok_off).any():
            bad = int(offset[off_moved & ~ok_off][0])
            raise KbbError(f"{rela.name}: relocation at {bad:#x} is in code that was dropped")

        valid_sym = sym < len(symbols)
        s_value = np.zeros(len(sym), np.int64)
        s_value[valid_sym] = symbols.value[sym[valid_sym]].astype(np.int64)
        s_new = s_value.copy()
        s_new[valid_sym] = new_values[sym[valid_sym]].astype(np.int64)
        sym_moved = s_new != s_value
        target = (s_value + addend).astype(np.uint64)
        if image.sections[rela.info].is_exec:
            # A PC-relative field in an instruction is relative to the instruction's
            # end: the address it refers to is S + A + (end - P) (call foo: A = -4).
            pc_code = isin(rtype, PC_RELATIVE)
            idx = model.insn_containing(offset[pc_code])
            ends = np.where(idx >= 0, model.insns.end_of(np.maximum(idx, 0)), offset[pc_code])
            target[pc_code] += ends - offset[pc_code]
        target_moved = amap.moved(target)
        tgt_moved = valid_sym & target_moved
        if tgt_moved.any():
            tgt_moved[tgt_moved] &= names_moved_code(model, sym[tgt_moved], target[tgt_moved],
                                                      fixed)
        new_target, ok_t = amap.translate(target, moved=target_moved)
        if (tgt_moved & ~ok_t).any():
            k = np.flatnonzero(tgt_moved & ~ok_t)[0]
            raise KbbError(f"{rela.name}: relocation at {int(offset[k]):#x} points to "
                           f"{model.symbolize(int(target[k]))}, code that was dropped")
        new_addend = addend.copy()
        delta = (new_target[tgt_moved] - target[tgt_moved]).view(np.int64)
        new_addend[tgt_moved] = addend[tgt_moved] + delta - (s_new - s_value)[tgt_moved]
        pc = isin(rtype, PC_RELATIVE)
        rewrite = tgt_moved | sym_moved | (off_moved & pc)
        changed = off_moved | tgt_moved | sym_moved
        idx = np.flatnonzero(changed)
        if len(idx):
            updates.append(RelocationUpdate(
                rela, records[idx], new_offset[idx].astype(np.uint64), new_addend[idx],
                rewrite[idx]))
        image.release_pages()   # (each section's records are read once)
    return updates


def apply_updates(model, out, updates, new_values) -> int:
    """Write new relocation records and recompute their fields in ``out``."""
    image = model.image
    fields = 0
    for u in updates:
        rela = u.rela_section
        r = image.relocations(rela)
        records = np.frombuffer(out.mem, RELA, len(r), rela.offset)
        records["offset"][u.index] = u.offset
        records["addend"][u.index] = u.addend
        info = r["info"][u.index]
        rtype, sym = type_and_symbol(info)
        rewrite = np.flatnonzero(u.rewrite_field)
        for t, size in FIELD_SIZE.items():
            k = rewrite[rtype[rewrite] == t]
            if not len(k):
                continue
            p = u.offset[k]
            value = field_values(t, new_values[sym[k]], u.addend[k], p)
            out.write_fields(p, size, value)
            fields += len(k)
        out.release_pages()     # (written: the page cache has them)
    return fields
