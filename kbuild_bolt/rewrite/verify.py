"""``kbuild-bolt verify``: check a rewritten vmlinux before anything relies on it.

On the output alone:
- it reads as a kernel: every table parses;
- every table entry matches the code (the same cross-check as ``dump``):
  static-key sites are 2/5-byte jmp/nop, lock prefixes, ud2, return/retpoline
  sites, fentry calls, ORC sorted, __ex_table sorted, ...;
- every relocation agrees with the bytes it describes (S + A - P, S + A).

Against the input (``--against``; code ranges whose bounds and bytes are the
same as the input's take the input's decoding, the rest is decoded anew):
- ELF header, program headers and the allocated section headers are identical,
  non-allocated ones too apart from the debug sections (rewritten for the new
  layout, or removed; ``verify --debug`` judges their contents); the symbol table
  is identical;
- data sections differ only inside kernel tables and relocated fields;
- code differs only inside rewritten functions' slots and in PC-relative
  fields that point into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import eq, itemgetter

import numpy as np

from kbuild_bolt.analysis.crosscheck import check_all, check_relocations
from kbuild_bolt.arrays import concat_ranges, inside_ranges, isin, union_ranges, unique
from kbuild_bolt.binary.model import BinaryModel, check_readable, default_jobs, same_bytes
from kbuild_bolt.elf.image import (
    FIELD_SIZE, SHT_RELA, SHT_STRTAB, SHT_SYMTAB, ElfImage, type_and_symbol,
)
from kbuild_bolt.elf.notes import build_id, read_build_id
from kbuild_bolt.elf.notes import compute as compute_build_id
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel import tables as kernel_tables
from kbuild_bolt.kernel.version import kernel_version
from kbuild_bolt.kernel.vmlinux import open_vmlinux
from kbuild_bolt.memory import trim
from kbuild_bolt.processes import ForkedCall, OnThread


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_problem(self) -> str:
        return self.problems[0] if self.problems else ""

    def add(self, check: str, count: int, problems: list[str]) -> None:
        self.checks[check] = (count, len(problems))
        self.problems.extend(f"{check}: {p}" for p in problems[:20])
        if len(problems) > 20:
            self.problems.append(f"{check}: ... {len(problems) - 20} more")

    def summary(self) -> str:
        lines = ["verify: " + ("ok" if self.ok else f"FAILED ({len(self.problems)} problems)")]
        for name, (count, bad) in self.checks.items():
            state = "ok" if not bad else f"{bad} bad"
            lines.append(f"  {name:<36} {count:>10,} checked  {state}")
        for p in self.problems[:40]:
            lines.append(f"  ! {p}")
        return "\n".join(lines)


def _header_problems(a: ElfImage, b: ElfImage) -> list[str]:
    problems = []
    ha, hb = a.header, b.header
    for name in ("type", "machine", "entry", "phoff", "flags", "phnum", "phentsize"):
        if ha[name] != hb[name]:
            problems.append(f"ELF header {name}: {ha[name]} != {hb[name]}")
    if not np.array_equal(a.phdrs, b.phdrs):
        problems.append("program headers differ")
    sa = {s.name: s for s in a.sections}
    sb = {s.name: s for s in b.sections}
    for name, s in sa.items():
        other = sb.get(name)
        if name.startswith((".debug", ".rela.debug")) and (other is None or other.size == 0):
            continue  # emptied on purpose: they described the old layout
        if other is None:
            problems.append(f"section {name} missing")
            continue
        fields = ("type", "flags", "addr", "size", "addralign", "entsize")
        if name.startswith(".debug") and not s.is_alloc:
            fields = ("type", "flags", "addr", "addralign", "entsize")   # DWARF written again
        if s.is_alloc:
            fields += ("offset",)
        elif s.type in (SHT_SYMTAB, SHT_STRTAB) and s.index in (a.symtab.index, a.symtab.link):
            fields = fields[:3]   # (symbols may be added: the symbol check judges them)
        elif s.type == SHT_RELA and 0 < s.info < len(a.sections) and a.sections[s.info].is_exec \
                and other.size >= s.size:
            # (relocations of promoted calls are appended: every record is checked
            # against the bytes it describes)
            fields = tuple(f for f in fields if f != "size")
        for f in fields:
            if getattr(s, f) != getattr(other, f):
                problems.append(f"section {name}: {f} {getattr(s, f):#x} != {getattr(other, f):#x}")
    for name in sb:
        if name not in sa:
            problems.append(f"section {name} added")
    return problems


def _symbol_problems(inp: BinaryModel, b: ElfImage, moved: np.ndarray | None,
                     code: np.ndarray) -> list[str]:
    """The symbol table is the input's, but for sizes of functions that grew into
    the fill after them; with whole functions moved (``moved``: the (n, 2) ranges
    their code was placed in), their symbols may move and change size within
    those ranges. Local ``.cold`` function symbols may follow the input's locals,
    for cold parts in ``code`` (where code was rewritten or placed)."""
    a = inp.image
    x, y = a.symbols, b.symbols
    problems = []
    index = np.arange(len(x))
    out_index = index
    names_a, y_names = x.names, y.names
    added = len(y) - len(x)
    first_x, first_y = a.symtab.info, b.symtab.info
    if added > 0 and first_y - first_x == added:
        out_index = np.where(index < first_x, index, index + added)
        y_names = y_names[:first_x] + y_names[first_y:]
        new = np.arange(first_x, first_y)
        info = y.raw["info"][new]
        ok = ((info & 0xF) == 2) & ((info >> 4) == 0) & inside_ranges(code, y.value[new])
        names = y.names
        for j, fine in zip(new.tolist(), ok.tolist()):
            if not (fine and ".cold" in names[j]):
                problems.append(f"symbol {names[j]} added at {int(y.value[j]):#x}: "
                                "not a cold part")
    elif added:
        # objcopy --strip-debug drops the section symbols of the debug sections.
        gone = {s.index for s in a.sections if s.name.startswith(".debug")
                and b.section(s.name) is None}
        keep = ~((x.type == 3) & isin(x.shndx, list(gone)))
        if int(keep.sum()) != len(y):
            return [f"{len(x)} symbols became {len(y)}"]
        index = out_index = np.flatnonzero(keep)
        out_index = np.arange(len(y))
        names_a = [x.names[i] for i in index.tolist()]
    if names_a != y_names:
        problems.append("symbol names differ")
    codes: dict[str, int] = {}
    sec_a = _section_keys(a, x.shndx[index], codes)
    sec_b = _section_keys(b, y.shndx[out_index], codes)
    for i in np.flatnonzero(sec_a != sec_b)[:5].tolist():
        problems.append(f"symbol {y_names[i]}: section changed")
    xr = x.raw[index]
    yr = y.raw[out_index]
    placed = np.zeros(len(index), bool)
    if moved is not None and len(moved):
        placed = inside_ranges(moved, xr["value"]) & inside_ranges(moved, yr["value"])
    for f in ("value", "info", "other"):
        changed = xr[f] != yr[f]
        if f == "value":
            changed &= ~placed
        for i in np.flatnonzero(changed)[:5].tolist():
            problems.append(f"symbol {y_names[i]}: {f} changed")
    # A function may grow into the alignment fill that followed it, nothing more
    # (or change size where whole functions were placed anew).
    grown = np.flatnonzero((xr["size"] != yr["size"]) & ~placed)
    if len(grown):
        i = index[grown]
        old_end = x.value[i] + x.size[i]
        new_end = yr['value'][grown] + yr['size'][grown]
        lo = np.searchsorted(inp.insns.addr, old_end)
        hi = np.searchsorted(inp.insns.addr, new_end)
        covered = concat_ranges(lo, np.maximum(hi - lo, 0))
        fill = np.ones(len(inp.insns.addr), bool)
        fill[covered] = inp.fill_insn[covered] & (inp.function_of_insn[covered] < 0)
        kinds = x.type[i]
        for k, j in enumerate(grown.tolist()):
            ok = (new_end[k] > old_end[k] and kinds[k] == 2
                  and bool(fill[lo[k]:hi[k]].all()))
            if not ok:
                problems.append(f"symbol {y_names[j]}: size {int(x.size[i[k]])} -> "
                                f"{int(yr['size'][j])}")
    return problems


def _output_hash(a: ElfImage, path, note, stamping: bool) -> OnThread | None:
    """The build-id the output's bytes give (elf.notes.compute, which zeroes the
    note: whatever it holds yet), hashed on a thread while the comparison goes
    on; None (not hashed) where the note is the input's and no new one is to be
    stamped: such an output is judged by its bytes instead."""
    before = build_id(a)
    if note is None or (not stamping and before is not None and note.value == before.value):
        return None
    return OnThread(compute_build_id, path, note)


def _section_keys(image: ElfImage, shndx: np.ndarray, codes: dict) -> np.ndarray:
    """The section of each symbol as a number that two images share by section
    name (``codes``: name -> number, filled as met); a special index (undefined,
    absolute, common) as its negative."""
    table = np.array([codes.setdefault(s.name, len(codes)) for s in image.sections], np.int64)
    i = shndx.astype(np.int64)
    named = (i > 0) & (i < len(table))
    return np.where(named, table[np.where(named, i, 0)], -1 - i)


def _build_id_problems(a: ElfImage, b: ElfImage, note, hashed: OnThread | None) -> list[str]:
    """A rewritten kernel is a new binary (the debug vmlinux and the running
    kernel must match by build-id): its build-id is the hash of the output. An
    output whose loaded bytes are the input's keeps the input's."""
    before = build_id(a)
    if hashed is None or (before is not None and note.value == before.value):
        same = all(b.section(s.name) is not None
                   and a.section_data(s) == b.section_data(b.section(s.name))
                   for s in a.sections if s.is_alloc and s.has_bits and s.size)
        return [] if same else [f"build-id {note.hex()} is the input's: the output is "
                                "another binary"]
    value = hashed.result()
    return [] if note.value == value else [f"build-id {note.hex()} is not the output's "
                                           f"({value.hex()})"]


def _kallsyms_ranges(table) -> list[tuple[int, int]]:
    """Where the kallsyms arrays a new layout rewrites lie."""
    n = table.count
    sizes = {"kallsyms_num_syms": 4, "kallsyms_names": table.names_size,
             "kallsyms_markers": 4 * ((n + 255) // 256), "kallsyms_offsets": 4 * n,
             "kallsyms_addresses": 8 * n, "kallsyms_seqs_of_names": 3 * n}
    return [(at, at + sizes[name]) for name, at in table.arrays.items() if name in sizes]


def _kallsyms_problems(out: BinaryModel, table) -> tuple[int, list[str]]:
    """Every kallsyms entry names a symbol of the symbol table at its address, in
    address order, and the name index is sorted."""
    symbols = out.image.symbols
    problems = []
    absolute = table.absolute if table.absolute is not None else np.zeros(table.count, bool)
    names = table.bare_names if table.bare_names is not None else [n[1:] for n in table.names]
    # The symbols at each entry's address (a binary search in their values, not a
    # lookup per name), their names compared with the entry's (most are equal:
    # hashing them first would only add work).
    order = np.argsort(symbols.value, kind="stable")
    values = symbols.value[order]
    lo = np.searchsorted(values, table.addresses, side="left")
    count = np.searchsorted(values, table.addresses, side="right") - lo
    entry = np.repeat(np.arange(table.count), count)
    symbol = order[concat_ranges(lo, count)]
    symbol_names = symbols.names
    equal = np.fromiter(map(eq, itemgetter(*entry.tolist())(names) if len(entry) > 1
                            else [names[i] for i in entry.tolist()],
                            itemgetter(*symbol.tolist())(symbol_names) if len(symbol) > 1
                            else [symbol_names[k] for k in symbol.tolist()]),
                        bool, len(entry))
    found = np.zeros(table.count, bool)
    found[entry[equal]] = True
    for i in np.flatnonzero(~found & ~absolute)[:20].tolist():
        problems.append(f"{names[i]} at {int(table.addresses[i]):#x}: no such symbol there")
    rel = table.addresses[~absolute]
    bad = np.flatnonzero(rel[1:] < rel[:-1])
    for i in bad[:5].tolist():
        problems.append(f"entry {i + 1} lies below the one before it")
    return table.count, problems


def _data_problems(inp: BinaryModel, out: BinaryModel, extra=()) -> tuple[int, list[str]]:
    """Changed bytes in allocated non-code sections must lie in tables, in
    ``extra`` ranges or in relocated fields."""
    a, b = inp.image, out.image
    covered = list(extra)
    for data in out.tables.values():
        covered.append((data.addr, data.addr + data.size))
    # Field size by relocation type (0: unknown type, the last entry).
    field_size = np.zeros(max(FIELD_SIZE) + 2, np.uint64)
    for t, n in FIELD_SIZE.items():
        field_size[t] = n
    problems = []
    checked = 0
    for s in a.sections:
        if not (s.is_alloc and s.has_bits and s.size) or s.is_exec:
            continue
        other = b.section(s.name)
        if other is None or other.size != s.size:
            continue  # (the header check reports it)
        x = a.bytes[s.offset:s.offset + s.size]
        y = b.bytes[other.offset:other.offset + other.size]
        changed = x != y
        checked += s.size
        # (both sections' pages go as soon as they are compared: the data of
        # two kernels at once was this process's largest memory)
        a.release_pages(s.offset, s.size)
        b.release_pages(other.offset, other.size)
        for lo, hi in covered:   # (tables change wholesale: not listed byte by byte)
            lo, hi = int(lo), int(hi)
            if lo < s.end and hi > s.addr:
                changed[max(lo, s.addr) - s.addr:min(hi, s.end) - s.addr] = False
        diff = np.flatnonzero(changed).astype(np.uint64) + np.uint64(s.addr)
        del changed
        if not len(diff):
            continue
        # The relocated fields of this section: those of the relocations that
        # apply to it (reading them checks each field lies inside it), read only
        # for a section with changes outside tables.
        rr = b.relocations_for(s.name)
        rtype, _ = type_and_symbol(rr["info"])
        size = field_size[np.minimum(rtype, len(field_size) - 1)]
        order = np.argsort(rr["offset"])
        starts, ends = rr["offset"][order], (rr["offset"] + size)[order]
        i = np.searchsorted(starts, diff, side="right").astype(np.int64) - 1
        ok = (i >= 0)
        ok[ok] &= diff[ok] < ends[i[ok]]
        for addr in diff[~ok][:5].tolist():
            problems.append(f"{s.name}: byte at {int(addr):#x} changed outside tables and "
                            "relocated fields")
    return checked, problems


def _rewritten_ranges(inp: BinaryModel, rewritten: set, fragments) -> np.ndarray:
    """Rewritten functions' slots (up to the next symbol after each one's end) and
    the fragments placed in free room, as (n, 2) ranges."""
    functions = inp.functions
    rows = np.array(sorted(rewritten), np.int64)
    ends = functions.end[rows].astype(np.uint64)
    labels = inp.symbol_values
    k = np.searchsorted(labels, ends)
    nxt = np.where(k < len(labels), labels[np.minimum(k, len(labels) - 1)], ends) \
        if len(labels) else ends
    frag = np.array(list(fragments), dtype=np.uint64).reshape(-1, 2)
    s_lo = np.concatenate([functions.start[rows].astype(np.uint64), frag[:, 0]])
    s_hi = np.concatenate([np.maximum(nxt, ends), frag[:, 1]])
    return np.stack([s_lo, s_hi], axis=1)


def _code_problems(inp: BinaryModel, out: BinaryModel,
                   ranges: np.ndarray) -> tuple[int, list[str]]:
    """Changed code bytes must lie in ``ranges`` (where code was rewritten or
    placed) or in fields pointing there."""
    a, b = inp.image, out.image
    spans = np.asarray(ranges, np.uint64).reshape(-1, 2)
    spans = union_ranges(spans[spans[:, 1] > spans[:, 0]])
    insns = inp.insns
    with_field = np.flatnonzero(insns.field_size > 0)
    # (instruction fields are disjoint and in address order; relocated fields are
    # all 4 bytes, so the last one starting at or before an address reaches
    # furthest: each is checked by a binary search, not as millions of ranges)
    f_lo = insns.addr[with_field] + insns.field_off[with_field]
    fields = np.stack([f_lo, f_lo + insns.field_size[with_field]], axis=1)
    del with_field, f_lo
    r_lo = np.sort(inp.code_relocations.offset)
    relocated = np.stack([r_lo, r_lo + np.uint64(4)], axis=1)
    problems = []
    checked = 0
    for s in a.sections:
        if not (s.is_alloc and s.is_exec and s.has_bits and s.size):
            continue
        other = b.section(s.name)
        if other is None or other.size != s.size:
            continue  # (the header check reports it)
        checked += s.size
        # (a part at a time, the addresses of its changed bytes: masks or counts
        # over the whole text were the largest memory of a rewrite)
        bad: list[int] = []
        for at in range(0, s.size, _CODE_PART):
            n = min(_CODE_PART, s.size - at)
            x = a.bytes[s.offset + at:s.offset + at + n]
            y = b.bytes[other.offset + at:other.offset + at + n]
            changed = np.uint64(s.addr + at) + np.flatnonzero(x != y).astype(np.uint64)
            a.release_pages(s.offset + at, n)      # (as in _data_problems)
            b.release_pages(other.offset + at, n)
            outside = changed[~inside_ranges(spans, changed)]
            outside = outside[~(inside_ranges(fields, outside) | inside_ranges(relocated, outside))]
            bad += outside[:5 - len(bad)].tolist()
            if len(bad) >= 5:
                break
        for addr in bad:
            problems.append(f"{s.name}: {inp.symbolize(addr)} changed outside "
                            "rewritten functions")
    return checked, problems


_CODE_PART = 1 << 22


def verify(path, against: BinaryModel | ElfImage | str | None = None,
           expect_rewritten: set | None = None, fragments=None,
           moved_ranges: np.ndarray | None = None, beside=(),
           stamp_build_id=None, known_code=None) -> VerifyReport:
    """``moved_ranges``: where whole functions were placed anew (their code and
    symbols may change anywhere there); found from the symbols when not given.
    ``beside``: more checks of the output, ``check(path) -> (name, checked,
    problems)``, run here while the output's code is decoded in a child.
    ``stamp_build_id``: called before the output's build-id is read (a rewrite
    writes it then, hashed on a thread meanwhile): until then the note may hold
    anything, nothing else reads it (the child, the comparison of the data and
    the hash of the output all pass over it).
    ``known_code``: code decoded before it was written (binary.model.KnownCode),
    which the decoding of the output takes where its bytes are the same."""
    report = VerifyReport()
    inp = None
    if against is not None:
        inp = against if isinstance(against, BinaryModel) else BinaryModel.open(
            against.path if isinstance(against, ElfImage) else against)
    try:
        image = open_vmlinux(path)
    except KbbError as err:
        report.add("output reads as a kernel", 1, [str(err)])
        return report
    # The output decoded, its tables checked against its code and the
    # relocations of its code against its bytes on the other CPU, while this
    # process compares it with the input and checks the other relocations.
    against_code = ForkedCall(_code_agreement, image, inp, True, known_code) \
        if default_jobs() > 1 else _Done(_code_agreement, image, inp, False, known_code)
    compared = VerifyReport()
    try:
        try:
            tables_of = _TablesOf(image)
            _compare(compared, tables_of, inp, path, expect_rewritten, fragments, moved_ranges,
                     stamp_build_id)
            # (they read bytes, symbols and tables, not decoded code: split so that
            # neither process waits long for the other)
            in_data = check_relocations(tables_of, code=False)
            image.release_pages()
            for check in beside:
                compared.add(*check(path))
        except KbbError:
            raise
        except Exception:
            # (an output the decoding refuses is reported as such, as it was when
            # it was decoded before anything else)
            against_code.result()
            raise
        entries, bad, in_code = against_code.result()
        total, problems = in_code[0] + in_data[0], in_code[1] + in_data[1]
    except KbbError as err:
        against_code.cancel()
        report.add("output reads as a kernel", 1, [str(err)])
        return report
    except BaseException:
        against_code.cancel()
        raise
    report.add("table entries match the code", entries, bad)
    report.add("relocations agree with the bytes", total, problems)
    report.checks.update(compared.checks)
    report.problems.extend(compared.problems)
    return report


class _TablesOf:
    """What the comparison with the input reads of the output: its image and
    its kernel tables (no decoded code)."""

    def __init__(self, image: ElfImage):
        check_readable(image)          # (as the decoding model would)
        self.image = image
        self.version = kernel_version(image)
        self.tables = kernel_tables.read_all(image, self.version.series)


class _Done:
    """A call made here (no CPU to spare), when its result is asked for, read as
    a ForkedCall's."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)

    def cancel(self) -> None:
        pass


# What a forked child may drop of the input's model (whole-kernel columns,
# cached): decoding the output with the input's help does not read them.
_NOT_READ_BY_THE_CHILD = ("function_of_insn", "fill_insn")


def _code_agreement(image: ElfImage, inp: BinaryModel | None, forked: bool, known=None):
    """The output decoded (with the input's decoding of what did not change):
    (entries, problems) of its tables, checked against its code, and (count,
    problems) of the relocations that apply to its code, checked against its
    bytes (they read no decoded code: here, they balance the comparison in the
    parent, which checks the others). ``forked``:
    this is a child, its copy of the input's model its own. ``known``: code
    decoded before (BinaryModel's ``known``)."""
    if forked and inp is not None:
        for name in _NOT_READ_BY_THE_CHILD:   # (their pages leave the child)
            inp.__dict__.pop(name, None)
    out = BinaryModel(image, like=inp, consume_like=forked, known=known)
    _release(image, inp)
    checks = check_all(out)
    _release(image, inp)
    entries = sum(c.entries for c in checks.values())
    bad = [f"{m.table}[{m.index}] {m.field} -> {m.where}: {m.message}"
           for c in checks.values() for m in c.mismatches]
    relocations = check_relocations(out, code=True)
    _release(image, inp)
    return entries, bad, relocations


def _release(image: ElfImage, inp: BinaryModel | None) -> None:
    """Between checks: the pages of both files read so far go back to the page
    cache (the next check maps what it reads; see ElfImage.release_pages)."""
    image.release_pages()
    if inp is not None:
        inp.image.release_pages()


def _compare(report, out, inp, path, expect_rewritten, fragments, moved_ranges,
             stamp_build_id=None) -> None:
    from kbuild_bolt.kernel.tables import kallsyms

    note = build_id(out.image)     # (where it is; its value is read when stamped)
    # (the output's own hash, on the side, from the start)
    hashed = _output_hash(inp.image, path, note, stamp_build_id is not None) \
        if inp is not None else None
    table = kallsyms.read(out.image, records=False)
    if table is not None:
        report.add("kallsyms agree with the symbols", *_kallsyms_problems(out, table))
        table.bare_names = None
        _release(out.image, inp)
        trim()
    if inp is not None:
        report.add("ELF and section headers", len(inp.image.sections),
                   _header_problems(inp.image, out.image))
        if moved_ranges is None and _functions_moved(inp.image, out.image):
            # Whole functions placed anew: anywhere in the movable regions; and
            # functions that had to stay may have their blocks laid out in place.
            functions = inp.functions
            changed = np.flatnonzero(_changed_functions(inp, out))
            own = np.stack([functions.start[changed], functions.end[changed]],
                           axis=1).astype(np.uint64)
            moved_ranges = union_ranges(np.concatenate([_movable_ranges(inp.image), own]))
        if moved_ranges is not None:
            ranges = np.asarray(moved_ranges, np.uint64).reshape(-1, 2)
        else:
            if expect_rewritten is None:
                expect_rewritten = set(np.flatnonzero(_changed_functions(inp, out)).tolist())
            if fragments is None:
                from kbuild_bolt.rewrite.holes import find_holes
                fragments = find_holes(inp)  # standalone: anything in the free room
            ranges = _rewritten_ranges(inp, expect_rewritten, fragments)
            ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
        report.add("symbol table", len(inp.image.symbols),
                   _symbol_problems(inp, out.image, moved_ranges, ranges))
        _release(out.image, inp)
        report.add("region markers keep their places", *_marker_problems(inp.image, out.image))
        own = [(note.addr, note.addr + note.size)] if note is not None and note.addr else []
        checked, problems = _data_problems(inp, out, own + (
            _kallsyms_ranges(table) if table is not None else []))
        report.add("data changed only in tables/fields", checked, problems)
        _release(out.image, inp)
        if note is not None:
            if stamp_build_id is not None:
                stamp_build_id()
            note = read_build_id(path, note)
            report.add("build-id is the output's own", 1,
                       _build_id_problems(inp.image, out.image, note, hashed))
            _release(out.image, inp)
        checked, problems = _code_problems(inp, out, ranges)
        report.add("code changed only where rewritten", checked, problems)
        _release(out.image, inp)
        if ".orc_unwind_ip" in inp.tables and (out.tables[".orc_unwind_ip"].count
                                                != inp.tables[".orc_unwind_ip"].count):
            report.add("ORC table size", 1, ["ORC entry count changed"])


def _marker_problems(a: ElfImage, b: ElfImage) -> tuple[int, list[str]]:
    """Region markers (``_sinittext``, ``__sched_text_start``) keep their values,
    and every relocation against one keeps its addend: the kernel compares
    addresses with the region edge, not with whatever function started there."""
    from kbuild_bolt.kernel.text import region_markers, text_layout

    x = a.symbols
    marker = region_markers(a, text_layout(a))
    names = {x.names[i]: int(x.value[i]) for i in np.flatnonzero(marker).tolist()}
    problems = [f"marker {name} moved from {value:#x} to {b.symbols.address(name):#x}"
                for name, value in names.items()
                if b.symbols.address(name) not in (None, value)]
    y = b.symbols
    y_marker = y.named(names)
    checked = len(names)
    for rela in a.rela_sections:
        other = b.section(rela.name)
        if other is None:
            continue
        r_in, r_out = a.relocations(rela), b.relocations(other)
        if len(r_in) != len(r_out):
            continue   # (reported with the headers)
        _, sym = type_and_symbol(r_out["info"])
        on_marker = np.flatnonzero(y_marker[np.minimum(sym, len(y) - 1)] & (sym < len(y)))
        checked += len(on_marker)
        bad = on_marker[r_in["addend"][on_marker] != r_out["addend"][on_marker]]
        for k in bad[:5].tolist():
            problems.append(f"{rela.name}: relocation at {int(r_out['offset'][k]):#x} against "
                            f"{y.names[int(sym[k])]} now has addend "
                            f"{int(r_out['addend'][k]):#x}, was {int(r_in['addend'][k]):#x}")
    return checked, problems


def _functions_moved(a: ElfImage, b: ElfImage) -> bool:
    """Some input function symbol is not at its old address in the output. Matched
    by name and address, not by index: the output may have gained local symbols
    (``name.cold`` for parts placed in free room), which renumbers the rest."""
    x, y = a.symbols, b.symbols
    rows = np.flatnonzero(x.type == 2)
    # Most are the same symbol at the same index (past the locals added in
    # front of the globals, when some were): only the others are looked for by
    # name and address among all of the output's functions.
    added = len(y) - len(x)
    if added == 0 or (added > 0 and b.symtab.info - a.symtab.info == added):
        j = np.where(rows < a.symtab.info, rows, rows + added)
        xn, yn = x.names, y.names
        same = (y.type[j] == 2) & (y.value[j] == x.value[rows])
        same[same] = [xn[i] == yn[k] for i, k in zip(rows[same].tolist(), j[same].tolist())]
        rows = rows[~same]
        if not len(rows):
            return False

    def functions(symbols, rows=None):
        rows = np.flatnonzero(symbols.type == 2) if rows is None else rows
        names = symbols.names
        return set(zip([names[i] for i in rows.tolist()], symbols.value[rows].tolist()))

    return not functions(x, rows) <= functions(y)


def _movable_ranges(image: ElfImage) -> np.ndarray:
    from kbuild_bolt.kernel.text import text_layout

    regions = [(r.start, r.end) for r in text_layout(image).regions if r.movable]
    return np.array(sorted(regions), np.uint64).reshape(-1, 2)


def _changed_functions(inp: BinaryModel, out: BinaryModel) -> np.ndarray:
    """Functions whose bytes differ at their address (section by section: a
    running count of differing bytes that grows over a function)."""
    functions = inp.functions
    changed = np.ones(len(functions), bool)
    for k in unique(functions.section).tolist():
        rows = np.flatnonzero(functions.section == k)
        same = same_bytes(inp.image, out.image, inp.image.sections[k], functions.start[rows],
                          functions.end[rows])
        if same is not None:
            changed[rows] = ~same
            continue
        for row in rows.tolist():   # (elsewhere in the output: compared by address)
            start, end = int(functions.start[row]), int(functions.end[row])
            changed[row] = inp.image.read(start, end - start) != out.image.read(start, end - start)
    return changed
