"""Kernel self-patching tables described as data.

A table is a run of fixed-size entries between two bounds (``__start_*`` /
``__stop_*`` symbols, or its own output section).  Each entry is a handful of
fields of a few kinds; the kinds say how a field points at code:

``prel32``  s32, target = address of the field + value (most x86 tables)
``prel32f`` s32 PC-relative with flag bits in the low bits (static call key)
``prel64f`` s64 PC-relative with flag bits in the low bits (static key pointer)
``abs64``   u64 absolute address (``__mcount_loc``, ``.parainstructions``)
plain integers ``u8``/``u16``/``u32``/``s16``/``s32``/``u64`` are data.

One generic reader (:func:`read_table`) turns any described table into a
numpy record array plus the resolved target address of every pointer field.
What is special about a table (padding, layouts that depend on the kernel
version or config) lives in its own module beside this one, as data where it
can and as a small hook where it must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kbuild_bolt.errors import KbbError

POINTER_KINDS = ("prel32", "prel32f", "prel64f", "abs64")
_NUMPY = {
    "prel32": "<i4", "prel32f": "<i4", "prel64f": "<i8", "abs64": "<u8",
    "u8": "u1", "u16": "<u2", "u32": "<u4", "u64": "<u8", "s16": "<i2", "s32": "<i4",
}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    kind: str
    # For prel32f/prel64f: the low bits that carry flags, not address.
    flag_mask: int = 0
    # A zero value means "no pointer" rather than "points at this field"
    # (6.1's assembly EXPORT_SYMBOL writes ``.long 0`` for "no namespace").
    null_if_zero: bool = False

    def __post_init__(self):
        if self.kind not in _NUMPY:
            raise ValueError(f"unknown field kind {self.kind}")

    @property
    def is_pointer(self) -> bool:
        return self.kind in POINTER_KINDS

    @property
    def size(self) -> int:
        return np.dtype(_NUMPY[self.kind]).itemsize


@dataclass(frozen=True)
class Layout:
    """One entry layout: its size and fields (several may exist per table)."""

    entry_size: int
    fields: tuple[Field, ...]
    note: str = ""

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({
            "names": [f.name for f in self.fields],
            "formats": [_NUMPY[f.kind] for f in self.fields],
            "offsets": [f.offset for f in self.fields],
            "itemsize": self.entry_size,
        })

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


# How a pointer field relates to the code it points at.
SITE = "site"          # an instruction start; the entry follows the instruction when it moves
ENTRY = "entry"        # control arrives there from elsewhere: a basic-block leader
BRANCH = "branch"      # a patchable jump/nop site: ends its block, ``target`` field is the other edge
RANGE = "range"        # instructions [addr, addr + length field) patched as one unit
FUNCTION = "function"  # a function start
SYMBOL = "symbol"      # any symbol: a function start or data
DATA = "data"          # data, not code (static keys, strings)
ORC_IP = "orc-ip"      # an ORC address: instruction start, inside a patch unit, or a code end
OPERAND = "operand"    # inside an instruction: an operand the kernel patches in place


@dataclass(frozen=True)
class CodeRef:
    """What one pointer field of a table must point at."""

    field: str
    role: str
    # Name of an instruction pattern in kbuild_bolt.x86.patterns the target must match.
    expect: str | None = None
    # RANGE: the field holding the unit's length; BRANCH: the field holding the target.
    other: str | None = None
    # Code places the target may be in besides functions ("region": code no
    # function symbol covers; or a section name such as .altinstr_replacement).
    places: tuple[str, ...] = ("function", "region")


# objtool also records sites in alternative replacement code (the kernel patches
# them there before the replacement is copied over its original).
WITH_REPLACEMENTS = ("function", "region", ".altinstr_replacement", ".altinstr_aux")


@dataclass(frozen=True)
class Bounds:
    """Where a table lives: start/stop symbols, or a whole output section."""

    start: str | None = None
    stop: str | None = None
    section: str | None = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    bounds: Bounds
    # Candidate layouts for a kernel version (major, minor); the first one whose
    # probe accepts the data is used.
    layouts: Callable[[tuple[int, int]], list[Layout]]
    description: str = ""
    # All-zero entries that are padding, not entries: "trailing" (page-aligned
    # .smp_locks) or "any" (__mcount_loc: the linker pads between objects and
    # resolves references to discarded code to 0; ftrace skips zeros).
    zero_padding: str | None = None
    # Optional check that a layout fits the data (config-dependent entry sizes).
    probe: Callable[["object", "TableData"], bool] | None = None
    # What each pointer field points at (checked against the decoded code).
    refs: tuple[CodeRef, ...] = ()
    # Extra whole-table check: (model, data) -> list of (entry index, message).
    check: Callable | None = None
    # The kernel's build-time sorttable sorts the table by this field (after the
    # link, leaving the .rela records as they were).
    sorted_field: str | None = None


@dataclass
class TableData:
    spec: TableSpec
    layout: Layout
    addr: int            # address of the first entry
    size: int            # bytes between the bounds
    entries: np.ndarray  # record array of all entries (padding included)
    valid: np.ndarray    # bool per entry: False for padding
    located_by: str      # "symbols" or "section"

    @property
    def count(self) -> int:
        return int(self.valid.sum())

    @property
    def padding(self) -> int:
        return len(self.entries) - self.count

    @property
    def entry_size(self) -> int:
        return self.layout.entry_size

    def entry_address(self, index) -> np.ndarray:
        return np.uint64(self.addr) + np.asarray(index, dtype=np.uint64) * np.uint64(self.entry_size)

    @property
    def indices(self) -> np.ndarray:
        """Indices of the real (non-padding) entries."""
        return np.flatnonzero(self.valid)

    def targets(self, field_name: str, index=None) -> np.ndarray:
        """Resolved target addresses (uint64) of pointer field ``field_name``
        for the entries ``index`` (default: every real entry)."""
        f = self.layout.field(field_name)
        if index is None:
            index = self.indices
        raw = self.entries[field_name][index]
        if f.kind == "abs64":
            return raw.astype(np.uint64)
        where = self.entry_address(index) + np.uint64(f.offset)
        value = raw.astype(np.int64)
        if f.flag_mask:
            value = value & ~np.int64(f.flag_mask)
        return (where.astype(np.int64) + value).astype(np.uint64)

    def present(self, field_name: str, index=None) -> np.ndarray:
        """bool per entry ``index`` (default: every real entry): the pointer field
        holds a pointer (False only for the null value of a ``null_if_zero`` field)."""
        f = self.layout.field(field_name)
        if index is None:
            index = self.indices
        raw = self.entries[field_name][index]
        if f.null_if_zero:
            return raw != 0
        return np.ones(len(raw), bool)

    def flags(self, field_name: str, index=None) -> np.ndarray:
        f = self.layout.field(field_name)
        if index is None:
            index = self.indices
        return (self.entries[field_name][index].astype(np.int64)
                & np.int64(f.flag_mask)).astype(np.uint64)


def sorted_by(model, data: TableData, field_name: str) -> list[tuple[int, str]]:
    """Check hook: the kernel binary-searches the table, so it must be sorted
    (vmlinux's, by sorttable at build time; a module's the loader sorts itself,
    in module_sort_exception_table()/unwind_module_init(): no order to check)."""
    if model.is_module:
        return []
    targets = data.targets(field_name)
    bad = np.flatnonzero(targets[1:] < targets[:-1])
    return [(int(data.indices[i + 1]), f"not sorted: {field_name} below the previous entry's")
            for i in bad]


def locate(image, spec: TableSpec) -> tuple[int, int, str] | None:
    """(address, size, how) of a table, or None when this kernel has none."""
    symbols = image.symbols
    b = spec.bounds
    if b.start and b.stop:
        start, stop = symbols.address(b.start), symbols.address(b.stop)
        if start is not None and stop is not None:
            if stop < start:
                raise KbbError(f"{image.path}: {spec.name}: {b.stop} lies before {b.start}")
            return start, stop - start, "symbols"
    if b.section:
        section = image.section(b.section)
        if section is not None and section.is_alloc:
            return section.addr, section.size, "section"
    return None


def read_table(image, spec: TableSpec, version: tuple[int, int]) -> TableData | None:
    """Read table ``spec`` from ``image``; None when the kernel has no such table."""
    where = locate(image, spec)
    if where is None:
        return None
    addr, size, how = where
    section = image.section_at(addr) if size else None
    if size and (section is None or addr + size > section.end):
        raise KbbError(f"{image.path}: {spec.name}: {size:,} bytes at {addr:#x} are not inside "
                       "one section (its bounds are wrong)")
    candidates = spec.layouts(version)
    if not candidates:
        return None
    fitting = [layout for layout in candidates if size % layout.entry_size == 0]
    if not fitting:
        sizes = " or ".join(str(layout.entry_size) for layout in candidates)
        raise KbbError(f"{spec.name} at {addr:#x}: {size} bytes is not a whole number of "
                       f"{sizes}-byte entries (truncated or not this kernel's layout)")
    problems = []
    for layout in fitting:
        data = _read_entries(image, spec, layout, addr, size, how)
        # The probe only decides between layouts that all fit the size.
        if len(fitting) > 1 and spec.probe is not None and not spec.probe(image, data):
            problems.append(f"{layout.entry_size}-byte entries do not fit ({layout.note})")
            continue
        return data
    raise KbbError(f"{spec.name} at {addr:#x}: {'; '.join(problems)}")


def _read_entries(image, spec: TableSpec, layout: Layout, addr: int, size: int,
                  how: str) -> TableData:
    count = size // layout.entry_size
    entries = image.array_at(addr, layout.dtype, count) if count else np.zeros(0, layout.dtype)
    valid = np.ones(count, bool)
    if spec.zero_padding and count:
        raw = image.array_at(addr, np.dtype(("u1", layout.entry_size)), count)
        nonzero = raw.any(axis=1)
        if spec.zero_padding == "any":
            valid = nonzero
        else:
            last = np.flatnonzero(nonzero)
            valid[int(last[-1]) + 1 if len(last) else 0:] = False
    return TableData(spec, layout, addr, size, entries, valid, how)
