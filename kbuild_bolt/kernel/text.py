"""Where the kernel expects its functions to be: text regions and code that stays put.

The linker script (arch/x86/kernel/vmlinux.lds.S, include/asm-generic/vmlinux.lds.h)
groups code into ranges bounded by ``__X_start``/``__X_end`` marker symbols, and
the kernel tests membership at run time: ``in_sched_functions`` (sched),
``in_lock_functions`` (lock), ``cpu_in_idle`` (cpuidle), the kprobe blacklist
(kprobes, noinstr, entry), PTI cloning the entry text, the function-graph
tracer (irq/softirq entry), and so on. So a function may move only inside the
interval between markers it was linked into.

Some code stays where it is altogether (FUNCTION-LAYOUT.md):

- head text: the bootstrap code at ``_text`` (the ELF entry, PVH entry, early
  page-table code that runs at its physical address). The linker script has no
  marker for its end; it is the run of ``.head.text`` at the start of ``.text``,
  which ends where the first object of the main text begins (found from the
  symbol table's file groups, generously: a few extra functions stay put);
- entry text (cloned into user page tables by PTI), the indirect/return thunk
  area and the static-call trampolines;
- code the kernel copies or checks by address range: ``ftrace_caller`` ..
  ``ftrace_caller_end`` (and the regs variant), ``relocate_kernel``, the optprobe
  template.

Everything here is read from marker and function symbols: nothing is decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import isin, unique
from kbuild_bolt.elf.image import STT_FILE, STT_FUNC, STT_NOTYPE

# The alignment of entry text under page-table isolation (PMD_SIZE).
ENTRY_ALIGN = 2 << 20
# Regions whose code never moves.
PINNED_KINDS = ("head", "entry", "irqentry", "thunks", "static_call")
# Plain text: no run-time membership test, so its cold code may also go to the
# free room between regions.
PLAIN = "text"

_MARKER = re.compile(r"^__(?P<name>[a-z0-9_]+?)(?:_text)?_(?P<edge>start|end)$")
# Marker pairs with other spellings.
_ALIASES = {"indirect_thunk": "thunks"}

# Code copied or checked by address range: (first symbol, symbol just past it).
COPIED_RANGES = (
    ("ftrace_caller", "ftrace_caller_end"),
    ("ftrace_regs_caller", "ftrace_regs_caller_end"),
    ("optprobe_template_entry", "optprobe_template_end"),
    ("__relocate_kernel_start", "__relocate_kernel_end"),
)
# Functions copied whole (their symbol covers what is copied, or the code after
# them is unnamed and stays anyway).
COPIED_FUNCTIONS = ("relocate_kernel", "optprobe_template_func", "ftrace_stub",
                    "ftrace_stub_graph", "return_to_handler", "ftrace_graph_caller")

# Source files whose functions make up .head.text (basenames, as STT_FILE records
# them). Generous on purpose: a file named here only makes head text end later.
HEAD_FILES = ("head_64.S", "head_64.o", "head64.c", "head64.o", "head.S", "head.o",
              "head_32.S", "sev.c", "sev-shared.c", "core.c", "shared.c", "startup.c",
              "mem_encrypt_identity.c", "xen-head.S", "xen-head.o", "verify_cpu.S",
              "map_kernel.c", "gdt_idt.c", "sme.c", "la57toggle.S")


@dataclass
class TextRegion:
    start: int
    end: int
    section: str
    kind: str                  # "head", "text", "noinstr", "sched", ... ("init" for .init.text)
    movable: bool
    markers: tuple = ()        # the marker names whose ranges contain it

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class TextLayout:
    regions: list[TextRegion]
    # [start, end) ranges of code that stays put although its region is movable.
    pinned: list[tuple[int, int, str]] = field(default_factory=list)

    def region_index(self, addrs) -> np.ndarray:
        """Index of the region holding each address (-1: none)."""
        starts = np.array([r.start for r in self.regions], np.uint64)
        ends = np.array([r.end for r in self.regions], np.uint64)
        addrs = np.asarray(addrs, np.uint64)
        i = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] &= addrs[ok] < ends[i[ok]]
        return np.where(ok, i, -1)


def text_layout(image) -> TextLayout:
    """The regions of ``.text``, ``.init.text`` and ``.exit.text`` and the code
    that must not move."""
    symbols = image.symbols
    names = symbols.names
    regions: list[TextRegion] = []
    text = image.section(".text")
    if text is not None:
        regions += _text_regions(image, text)
    for name, kind in ((".init.text", "init"), (".exit.text", "exit")):
        section = image.section(name)
        if section is not None and section.size:
            regions.append(TextRegion(section.addr, section.end, name, kind, True))
    regions.sort(key=lambda r: r.start)
    pinned = []
    for first, past in COPIED_RANGES:
        a, b = symbols.address(first), symbols.address(past)
        if a is not None and b is not None and b > a:
            pinned.append((a, b, f"{first}..{past}"))
    funcs = np.flatnonzero((symbols.type == STT_FUNC) & symbols.named(COPIED_FUNCTIONS)).tolist()
    for i in funcs:
        start = int(symbols.value[i])
        pinned.append((start, start + max(1, int(symbols.size[i])), names[i]))
    return TextLayout(regions, sorted(pinned))


def region_markers(image, layout: TextLayout) -> np.ndarray:
    """Per symbol: a marker at a region edge (``_sinittext``, ``__sched_text_start``,
    ``__cpuidle_text_end``). A marker shares its address with the first function
    after it, but names the edge: it stays when that function moves."""
    symbols = image.symbols
    edges = unique(np.array([b for r in layout.regions for b in (r.start, r.end)],
                               np.uint64))
    defined = (symbols.shndx > 0) & (symbols.shndx < 0xFF00)
    return (symbols.type == STT_NOTYPE) & defined & isin(symbols.value, edges)


def _text_regions(image, text) -> list[TextRegion]:
    symbols = image.symbols
    names = symbols.names
    # Marker pairs: NOTYPE symbols __X_start/__X_end (or __X_text_start/_end) in .text.
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    candidates = np.flatnonzero((symbols.shndx == text.index) & (symbols.type == STT_NOTYPE))
    for i in candidates.tolist():
        m = _MARKER.match(names[i])
        if not m:
            continue
        target = starts if m.group("edge") == "start" else ends
        target.setdefault(m.group("name"), int(symbols.value[i]))
    pairs = []
    for name, a in starts.items():
        b = ends.get(name)
        if b is not None and text.addr <= a < b <= text.end:
            pairs.append((_ALIASES.get(name, name), a, b))
    # (a module has no head text: the loader calls into it only through its
    # symbols and relocations)
    module = image.section(".gnu.linkonce.this_module") is not None
    head_end = text.addr if module else _head_end(image, text)
    if head_end > text.addr:
        pairs.append(("head", text.addr, head_end))
    cuts = {text.addr, text.end}
    for _name, a, b in pairs:
        cuts.update((a, b))
    cuts = sorted(cuts)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        inside = tuple(sorted(n for n, lo, hi in pairs if lo <= a and b <= hi))
        # The innermost range names the region (cpuidle inside noinstr, irqentry
        # inside entry).
        kind = PLAIN
        if inside:
            kind = min(((hi - lo, n) for n, lo, hi in pairs if n in inside))[1]
        movable = not any(n in PINNED_KINDS for n in inside)
        out.append(TextRegion(a, b, ".text", kind, movable, inside))
    return _entry_padding(out)


def _entry_padding(regions: list[TextRegion]) -> list[TextRegion]:
    """With page-table isolation the linker aligns entry text to 2 MiB on both
    sides (ALIGN_ENTRY_TEXT_BEGIN/END) and PTI maps that whole PMD into user
    page tables: the padding after entry text, up to the next 2 MiB boundary,
    must stay empty, or the code put there would be mapped for user space too."""
    entry = [r for r in regions if r.kind in ("entry", "irqentry")]
    if not entry:
        return regions
    start, end = min(r.start for r in entry), max(r.end for r in entry)
    if start % ENTRY_ALIGN:
        return regions   # (no PTI alignment: entry text shares its PMD anyway)
    limit = (end + ENTRY_ALIGN - 1) & -ENTRY_ALIGN
    for r in regions:
        if r.kind == PLAIN and end <= r.start and r.end <= limit:
            r.kind, r.movable = "entry_padding", False
    return regions


def _head_end(image, text) -> int:
    """Where .head.text ends: the lowest local function of a source file that is
    not a head file. (Head code comes first in .text; every object's local
    functions follow its file symbol in the symbol table.)"""
    symbols = image.symbols
    types = symbols.type
    # The file group of every symbol: the last STT_FILE at or before it.
    is_file = types == STT_FILE
    group = np.maximum.accumulate(np.where(is_file, np.arange(len(types)), -1))
    local_text = np.flatnonzero((types == STT_FUNC) & (symbols.bind == 0)
                                & (symbols.shndx == text.index) & (group >= 0))
    head_file = symbols.named(HEAD_FILES)[group[local_text]]
    others = local_text[~head_file] if len(local_text) else local_text
    best = int(symbols.value[others].min()) if len(others) else None
    if best is None:
        # No file symbols: keep the whole first 2 MiB page (head text is far smaller).
        return min(text.end, (text.addr + (2 << 20)) & ~((2 << 20) - 1))
    # Functions starting below it belong to head text or to the first object's
    # globals: all stay. The ELF entry must be inside.
    return best
