"""Functions and other code regions of a vmlinux, from its symbol table.

A function is an STT_FUNC symbol with a size in a code section; aliases (same
address) are one function. Bytes of a code section that no function covers
are *regions*: padding (int3/nop fill), ``__pfx_`` call padding in front of
functions, and assembly code the kernel marks SYM_CODE (entry code), which has
no STT_FUNC symbol. Regions are decoded too, so table entries that point
there can be checked, but they are never moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import isin, unique
from kbuild_bolt.elf.image import STT_FUNC, STT_NOTYPE, STT_OBJECT

# Code sections whose functions kbuild-bolt models (and may lay out again).
FUNCTION_SECTIONS = (".text", ".init.text", ".exit.text")
# Code that only tables point into (replacement and auxiliary code of alternatives).
AUX_CODE_SECTIONS = (".altinstr_replacement", ".altinstr_aux")
# A module's code keeps the sections the compiler gave it (vmlinux's linker
# script merges them into .text): static call trampolines, noinstr, cold...
MODULE_INFO_SECTION = ".gnu.linkonce.this_module"


def function_sections(image) -> tuple[str, ...]:
    """The sections whose functions are laid out: vmlinux's three, or every
    code section of a module but the alternatives' replacement code."""
    if image.section(MODULE_INFO_SECTION) is None:
        return FUNCTION_SECTIONS
    return tuple(s.name for s in image.sections
                 if s.is_alloc and s.is_exec and s.name not in AUX_CODE_SECTIONS)
PREFIX_SYMBOLS = ("__pfx_", "__cfi_")


@dataclass
class FunctionTable:
    """All functions, sorted by start address (numpy columns, one row per function)."""

    start: np.ndarray        # uint64
    end: np.ndarray          # uint64 (start + symbol size)
    section: np.ndarray      # int32 section index
    symbol: np.ndarray       # int64 symbol index of the primary name
    names: list[str]
    aliases: dict[int, list[str]] = field(default_factory=dict)  # row -> other names

    def __len__(self) -> int:
        return len(self.start)

    def find(self, addr: int) -> int:
        """Row of the function containing ``addr``, or -1."""
        i = int(np.searchsorted(self.start, np.uint64(addr), side="right")) - 1
        if i >= 0 and addr < int(self.end[i]):
            return i
        return -1

    def rows_containing(self, addrs: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`find` (-1 where no function contains the address), as
        int32 (millions of instructions: a column of rows is kept per instruction)."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        if len(addrs) > 4 * len(self.start) and bool(np.all(addrs[1:] >= addrs[:-1])):
            # (every instruction of a kernel, in order: the functions' starts are
            # searched among the addresses, and each row repeated over its run)
            n = len(addrs)
            first = np.searchsorted(addrs, self.start, side="left")
            runs = np.diff(np.concatenate(([0], first, [n])))
            i = np.repeat(np.arange(-1, len(self.start), dtype=np.int32), runs)
            # Inside row r: from its first address to its end, or the next
            # function's start if that comes first. How many rows cover each
            # address: +1 at each first, -1 at each stop, summed (int32 and in
            # place: a kernel has millions of addresses).
            stop = np.minimum(np.searchsorted(addrs, self.end, side="left"),
                              np.append(first[1:], n))
            stop = np.maximum(stop, first)
            depth = np.zeros(n + 1, np.int32)
            np.add.at(depth, first, 1)
            np.add.at(depth, stop, -1)
            np.cumsum(depth, out=depth)
            i[depth[:n] <= 0] = -1
            return i
        i = np.searchsorted(self.start, addrs, side="right").astype(np.int32) - 1
        ok = i >= 0
        ok[ok] &= addrs[ok] < self.end[i[ok]]
        return np.where(ok, i, np.int32(-1))

    def by_name(self, name: str) -> int:
        for i, n in enumerate(self.names):
            if n == name:
                return i
        for i, others in self.aliases.items():
            if name in others:
                return i
        return -1


@dataclass
class CodeRegion:
    start: int
    end: int
    section: str
    kind: str      # "prefix", "code", "aux" (REGION_KINDS)
    label: str     # a symbol covering it, or ""


def discover_functions(image) -> FunctionTable:
    symbols = image.symbols
    sections = [image.section(n) for n in function_sections(image)]
    indices = [s.index for s in sections if s is not None]
    if not len(symbols) or not indices:
        z = np.zeros(0, np.uint64)
        return FunctionTable(z, z, np.zeros(0, np.int32), np.zeros(0, np.int64), [])
    mask = (symbols.type == STT_FUNC) & isin(symbols.shndx, indices)
    idx = np.flatnonzero(mask & ~symbols.names_start_with(PREFIX_SYMBOLS)).astype(np.int64)
    names = symbols.names
    value = symbols.value[idx]
    size = symbols.size[idx]
    bind = symbols.bind[idx]
    # Sort by address, then prefer sized, global symbols as the primary name.
    order = np.lexsort((-bind.astype(np.int64), -size.astype(np.int64), value))
    idx, value, size = idx[order], value[order], size[order]
    first = np.ones(len(idx), bool)
    first[1:] = value[1:] != value[:-1]
    rows = np.flatnonzero(first)
    aliases: dict[int, list[str]] = {}
    group = np.cumsum(first) - 1
    for j in np.flatnonzero(~first).tolist():
        aliases.setdefault(int(group[j]), []).append(names[int(idx[j])])
    return FunctionTable(
        start=value[rows].astype(np.uint64),
        end=(value[rows] + size[rows]).astype(np.uint64),
        section=symbols.shndx[idx[rows]].astype(np.int32),
        symbol=idx[rows],
        names=[names[int(i)] for i in idx[rows]],
        aliases=aliases,
    )


# Region kinds, by their code in RegionTable.kind.
REGION_KINDS = ("code", "prefix", "aux")
CODE, PREFIX, AUX = range(3)


@dataclass
class RegionTable:
    """Code-section bytes outside every function (numpy columns, one row per
    region: section by section, each by address). Tens of thousands of rows,
    one per call padding: columns, not objects (the verification child finds
    them again for the output); iterating gives :class:`CodeRegion` rows."""

    start: np.ndarray        # uint64
    end: np.ndarray          # uint64
    section: np.ndarray      # int32 section index
    kind: np.ndarray         # uint8: REGION_KINDS
    label: np.ndarray        # int64 symbol index of the label at the start, -1: none
    image: object = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, row: int) -> CodeRegion:
        section = self.image.sections[int(self.section[row])].name
        kind = int(self.kind[row])
        label = int(self.label[row])
        name = section if kind == AUX else (self.image.symbols.names[label] if label >= 0 else "")
        return CodeRegion(int(self.start[row]), int(self.end[row]), section,
                          REGION_KINDS[kind], name)

    def __iter__(self):
        return (self[row] for row in range(len(self)))


def discover_regions(image, functions: FunctionTable) -> RegionTable:
    """Code-section bytes outside every function, split at symbols."""
    symbols = image.symbols
    # (call padding named __pfx_/__cfi_ wins over a marker at the same address:
    # _sinittext is where __pfx_ of the first init function is)
    prefix_symbol = symbols.names_start_with(PREFIX_SYMBOLS)
    labelled_type = isin(symbols.type, (STT_NOTYPE, STT_FUNC, STT_OBJECT))
    parts = []
    for section_name in function_sections(image) + AUX_CODE_SECTIONS:
        section = image.section(section_name)
        if section is None or section.size == 0:
            continue
        if section_name in AUX_CODE_SECTIONS:
            parts.append((np.array([section.addr], np.uint64), np.array([section.end], np.uint64),
                          section.index, np.array([AUX], np.uint8), np.array([-1], np.int64)))
            continue
        rows = np.flatnonzero(functions.section == section.index)
        # Labels: non-function symbols in the section (SYM_CODE, __pfx_, local labels).
        in_sec = np.flatnonzero((symbols.shndx == section.index) & labelled_type)
        label_addr = symbols.value[in_sec]
        order = np.lexsort((in_sec, prefix_symbol[in_sec], label_addr))
        label_addr = label_addr[order]
        label_idx = in_sec[order]
        # Gaps between functions (functions may overlap: aliases, nested symbols).
        starts = functions.start[rows].astype(np.uint64)
        ends = functions.end[rows].astype(np.uint64)
        # Before each function: from the furthest end so far to its start; then up
        # to the section's end.
        g_start = np.maximum.accumulate(np.r_[np.uint64(section.addr), ends])
        g_end = np.r_[starts, np.uint64(section.end)]
        gap = g_end > g_start
        g_start, g_end = g_start[gap], g_end[gap]
        # Each gap is cut at every label inside it.
        k = np.searchsorted(g_start, label_addr, side="right").astype(np.int64) - 1
        inside = k >= 0
        inside[inside] &= label_addr[inside] < g_end[k[inside]]
        cuts = unique(np.concatenate([g_start, label_addr[inside]]))
        if not len(cuts):
            continue
        g = np.searchsorted(g_start, cuts, side="right").astype(np.int64) - 1
        stop = np.r_[cuts[1:], np.uint64(0)]
        last_of_gap = np.r_[g[1:] != g[:-1], True]
        stop[last_of_gap] = g_end[g[last_of_gap]]
        # The label at a cut: the last symbol (in symbol order, padding last) there.
        j = np.searchsorted(label_addr, cuts, side="right").astype(np.int64) - 1
        has = j >= 0
        if len(label_idx):
            has[has] &= label_addr[j[has]] == cuts[has]
        label = np.where(has, label_idx[np.maximum(j, 0)] if len(label_idx) else -1,
                         -1).astype(np.int64)
        kind = np.where((label >= 0) & prefix_symbol[np.maximum(label, 0)], PREFIX,
                        CODE).astype(np.uint8)
        parts.append((cuts.astype(np.uint64), stop.astype(np.uint64), section.index, kind, label))
    return RegionTable(
        start=np.concatenate([p[0] for p in parts] or [np.zeros(0, np.uint64)]),
        end=np.concatenate([p[1] for p in parts] or [np.zeros(0, np.uint64)]),
        section=np.concatenate([np.full(len(p[0]), p[2], np.int32) for p in parts]
                               or [np.zeros(0, np.int32)]),
        kind=np.concatenate([p[3] for p in parts] or [np.zeros(0, np.uint8)]),
        label=np.concatenate([p[4] for p in parts] or [np.zeros(0, np.int64)]),
        image=image)
