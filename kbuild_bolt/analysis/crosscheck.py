"""Cross-check every kernel table entry, and every relocation, against the code.

Each pointer field of a table says what it must point at (a
:class:`~kbuild_bolt.kernel.tables.base.CodeRef`); this module checks it for
every entry, vectorized: the place (function, code region, replacement code),
an instruction start, the expected instruction, a patch unit's end on an
instruction boundary. Nothing is dropped: each failed entry is a
:class:`Mismatch`; entries that are fine for a documented reason that is not
the usual one (an ORC address inside an alternative, at the end of a code
section) are counted under ``explained``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import in_sorted, isin, unique
from kbuild_bolt.elf.image import FIELD_SIZE, PC_RELATIVE, RELOCATION_PART, type_and_symbol
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.x86 import patterns


@dataclass
class Mismatch:
    table: str
    index: int
    field: str
    address: int
    where: str
    message: str

    def to_json(self) -> dict:
        return {"table": self.table, "index": self.index, "field": self.field,
                "address": self.address, "where": self.where, "message": self.message}


@dataclass
class TableCheck:
    table: str
    entries: int
    checked_fields: list[str]
    mismatches: list[Mismatch] = field(default_factory=list)
    explained: Counter = field(default_factory=Counter)
    places: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def places_of(model, addrs: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Place of each address, as an index into the names returned with them:
    "function", "region", an aux code section, a data section name, or
    "outside". (Numbers, not a string per address: ORC alone has hundreds of
    thousands of entries.)"""
    names = ["outside", "function"]
    codes = np.zeros(len(addrs), np.int32)
    sec = model.section_index_of(addrs)
    for index in unique(sec).tolist():
        if index < 0:
            continue
        section = model.image.sections[index]
        name = section.name
        if section.is_exec and name not in model.aux_sections:
            name = "region"
        if name not in names:
            names.append(name)
        codes[sec == index] = names.index(name)
    codes[model.functions.rows_containing(addrs) >= 0] = names.index("function")
    return codes, names


def check_table(model, data: base.TableData) -> TableCheck:
    spec = data.spec
    result = TableCheck(spec.name, data.count, [r.field for r in spec.refs])
    index = data.indices

    def fail(mask, ref, targets, where, message):
        for k in np.flatnonzero(mask).tolist():
            result.mismatches.append(Mismatch(
                spec.name, int(index[k]), ref.field, int(targets[k]),
                model.symbolize(int(targets[k])), message if isinstance(message, str)
                else message(k)))

    for ref in spec.refs:
        if ref.role == base.DATA or not len(index):
            continue
        targets = data.targets(ref.field)
        live = data.present(ref.field)
        if ref.role == base.RANGE:
            lengths = data.entries[ref.other][index].astype(np.int64)
            live = lengths > 0  # an empty replacement points nowhere in particular
        codes, place_names = places_of(model, targets)
        counts = np.bincount(codes[live], minlength=len(place_names)).tolist()
        result.places.update({name: n for name, n in zip(place_names, counts) if n})
        where = _Places(codes, place_names)

        if ref.role == base.SYMBOL:
            known = in_sorted(model.symbol_values, targets)
            fail(live & ~known, ref, targets, where, "not the address of any symbol")
            continue
        if ref.role == base.FUNCTION:
            known = in_sorted(model.functions.start, targets) | in_sorted(model.symbol_values,
                                                                           targets)
            fail(live & ~known, ref, targets, where, "not a function start")
            continue

        allowed = where.any_of(list(ref.places) + ["function"])
        if ref.role == base.OPERAND:
            fail(~allowed, ref, targets, where,
                 lambda k: f"points into {where[k]}, expected {' or '.join(ref.places)}")
            idx = model.insn_containing(targets)
            fail(allowed & (idx < 0), ref, targets, where, "not inside a decoded instruction")
            live = allowed & (idx >= 0)
            good = np.zeros(len(targets), bool)
            good[live] = patterns.PATTERNS[ref.expect](model, targets[live], idx[live])
            fail(live & ~good, ref, targets, where, f"expected {patterns.DESCRIPTIONS[ref.expect]}")
            continue
        if ref.role == base.ORC_IP:
            result.explained.update(_check_orc_ips(model, targets, fail, ref, where))
            continue
        fail(live & ~allowed, ref, targets, where,
             lambda k: f"points into {where[k]}, expected {' or '.join(ref.places)}")
        live &= allowed
        idx = model.insn_index(targets)
        fail(live & (idx < 0), ref, targets, where, "not an instruction start")
        live &= idx >= 0
        if ref.expect is not None and live.any():
            good = np.zeros(len(targets), bool)
            good[live] = patterns.PATTERNS[ref.expect](model, targets[live], idx[live])
            fail(live & ~good, ref, targets, where,
                 f"expected {patterns.DESCRIPTIONS[ref.expect]}")
        if ref.role == base.RANGE:
            ends = targets + lengths.astype(np.uint64)
            fail(live & ~model.is_boundary(ends), ref, targets, where,
                 lambda k: f"patch range of {lengths[k]} bytes ends inside an instruction")
        if ref.role == base.BRANCH:
            # A jmp site must jump exactly to the entry's target.
            other = data.targets(ref.other)
            jmp = live.copy()
            jmp[live] = model.insns.ref_kind[idx[live]] == 1
            wrong = jmp.copy()
            wrong[jmp] = model.insns.ref[idx[jmp]] != other[jmp]
            fail(wrong, ref, targets, where, "jump site does not jump to the entry's target")

    if spec.check is not None:
        for entry, message in spec.check(model, data):
            addr = int(data.entry_address(entry))
            result.mismatches.append(Mismatch(spec.name, entry, "", addr, model.symbolize(addr),
                                              message))
    return result


class _Places:
    """Each target's place (see places_of): its name by index, as the messages
    want it; a mask of the targets in some of them."""

    def __init__(self, codes: np.ndarray, names: list[str]):
        self.codes, self.names = codes, names

    def __getitem__(self, k: int) -> str:
        return self.names[int(self.codes[k])]

    def any_of(self, names) -> np.ndarray:
        return isin(self.codes, [i for i, name in enumerate(self.names) if name in names])


def _check_orc_ips(model, targets, fail, ref, where) -> Counter:
    """ORC addresses: an instruction start; or inside an alternative/paravirt unit
    (objtool gives the replacement's instructions their own entries at the
    original site); or the end of a code section (terminator entries)."""
    explained = Counter()
    ok = model.insn_index(targets) >= 0
    ok[~ok] = model.in_int3_run(targets[~ok])
    inside_unit = ~ok & model.inside_patch_unit(targets)
    explained["inside an alternative or paravirt site"] = int(inside_unit.sum())
    ends = np.array([s.end for s in model.image.sections if s.is_exec and s.is_alloc],
                    dtype=np.uint64)
    at_end = ~ok & ~inside_unit & isin(targets, ends)
    explained["end of a code section"] = int(at_end.sum())
    fail(~(ok | inside_unit | at_end), ref, targets, where,
         "not an instruction start, patch site or code end")
    return +explained


def check_all(model) -> dict[str, TableCheck]:
    return {name: check_table(model, data) for name, data in model.tables.items()}


def check_relocations(model, code: bool | None = None) -> tuple[int, list[str]]:
    """Every relocation's field holds S + A (- P). ``code``: only those that apply
    to code (True) or only the others (False); None: all.

    Tables the kernel's sorttable sorts after the link keep the records of the
    unsorted order, so there the targets must be a permutation of what the
    records say (compared as multisets of absolute targets)."""
    image = model.image
    symbols = image.symbols
    problems: list[str] = []
    total = 0
    sorted_tables = [d for d in model.tables.values() if d.spec.sorted_field]
    expected_sorted = {d.spec.name: [] for d in sorted_tables}
    for rela in image.rela_sections:
        target_section = image.sections[rela.info]
        if code is not None and target_section.is_exec != code:
            continue
        records = image.relocations(rela)
        if not len(records) or not target_section.has_bits:
            continue
        data = image.bytes[target_section.offset:target_section.offset + target_section.size]
        outside = {t: 0 for t in FIELD_SIZE}
        disagree = {t: 0 for t in FIELD_SIZE}
        for lo in range(0, len(records), RELOCATION_PART):
            r = records[lo:lo + RELOCATION_PART]
            rtype, sym = type_and_symbol(r["info"])
            for t, size in FIELD_SIZE.items():
                sel = np.flatnonzero(rtype == t)
                if not len(sel):
                    continue
                total += len(sel)
                off = (r["offset"][sel] - np.uint64(target_section.addr)).astype(np.int64)
                inside = (off >= 0) & (off + size <= target_section.size)
                if not inside.all():
                    outside[t] += int((~inside).sum())
                    sel, off = sel[inside], off[inside]
                value = np.zeros(len(sel), np.uint64)
                for k in range(size):
                    value |= data[off + k].astype(np.uint64) << np.uint64(8 * k)
                where = r["offset"][sel]
                target = symbols.value[sym[sel]] + r["addend"][sel].view(np.uint64)   # S + A
                expect = target - where if t in PC_RELATIVE else target
                mask = np.uint64((1 << (8 * size)) - 1) if size < 8 \
                    else np.uint64(0xFFFFFFFFFFFFFFFF)
                bad = (expect & mask) != value
                for d in sorted_tables:
                    inside = (where >= np.uint64(d.addr)) & (where < np.uint64(d.addr + d.size))
                    if inside.any():
                        expected_sorted[d.spec.name].append(target[inside])
                        bad[inside] = False
                # (the first five of each type are shown)
                for k in np.flatnonzero(bad)[:max(0, 5 - disagree[t])].tolist():
                    problems.append(f"{rela.name}[{lo + int(sel[k])}] at {int(where[k]):#x}: "
                                    f"field {int(value[k]):#x}, relocation says "
                                    f"{int(expect[k] & mask):#x}")
                disagree[t] += int(bad.sum())
        for t in FIELD_SIZE:
            if outside[t]:
                problems.append(f"{rela.name}: {outside[t]} relocations outside "
                                f"{target_section.name}")
            if disagree[t] > 5:
                problems.append(f"{rela.name}: {disagree[t] - 5} more disagreeing fields")
        image.release_pages()     # (this section's records and fields were read once)
    for d in sorted_tables:
        want = np.sort(np.concatenate(expected_sorted[d.spec.name])) \
            if expected_sorted[d.spec.name] else np.zeros(0, np.uint64)
        if not len(want):
            continue
        got = np.sort(np.concatenate([d.targets(f.name) for f in d.layout.fields
                                      if f.is_pointer]))
        # sorttable also zeroes __mcount_loc entries of overridden weak functions:
        # their records stay, the entries become padding.
        if not _sub_multiset(got, want) or len(want) - len(got) > d.padding * len(
                [f for f in d.layout.fields if f.is_pointer]):
            problems.append(f"{d.spec.name}: entries are not the targets its relocations name "
                            f"({len(got)} entries, {len(want)} relocations)")
    return total, problems


def _sub_multiset(small: np.ndarray, big: np.ndarray) -> bool:
    values, counts = np.unique(small, return_counts=True)
    big_values, big_counts = np.unique(big, return_counts=True)
    i = np.searchsorted(big_values, values)
    i = np.minimum(i, len(big_values) - 1)
    return bool(len(big_values) and np.all(big_values[i] == values) and np.all(big_counts[i] >= counts))
