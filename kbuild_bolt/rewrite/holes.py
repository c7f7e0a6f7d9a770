"""Free room inside .text for code that no longer fits its function's slot.

Linker alignment leaves megabytes of int3 fill inside .text (2.26 MB on the
6.12 lab kernel: before the 2 MiB-aligned entry text and after it; 3.85 MB on
Debian's 6.1 kernel). It is mapped and executable like the rest of .text and
lies between _stext and _etext (so the kernel keeps it, and ORC and
kernel_text_address() cover it), but no symbol covers it. A hole is usable when
it is a run of int3 of at least 4 KiB, no symbol lies inside it (a label at its
very start, such as __static_call_text_end, marks the end of what comes before)
and it is not inside a ``__X_start``/``__X_end`` range the kernel treats
specially (entry text, noinstr, kprobes, ...).
"""

from __future__ import annotations

import numpy as np

MIN_HOLE = 4096
MARGIN = 64
ALIGN = 16


def find_holes(model) -> list[tuple[int, int]]:
    image = model.image
    text = image.section(".text")
    if text is None:
        return []
    symbols = image.symbols
    lo = symbols.address("_stext") or text.addr
    hi = symbols.address("_etext") or text.end
    starts, ends = runs_of_byte(image.bytes[text.offset:text.offset + text.size], 0xCC)
    values = model.symbol_values
    names = symbols.names
    # Special ranges: __X_start ... __X_end (and X_start/X_end) label pairs.
    by_name = {}
    in_text = np.flatnonzero(symbols.shndx == text.index)
    for i, value in zip(in_text.tolist(), symbols.value[in_text].tolist()):
        name = names[i]
        if name.endswith(("_start", "_end")):
            by_name.setdefault(name, value)
    ranges = []
    for name, value in by_name.items():
        if name.endswith("_start"):
            end_name = name[:-len("_start")] + "_end"
            if end_name in by_name and by_name[end_name] > value:
                ranges.append((value, by_name[end_name]))
    holes = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < MIN_HOLE:
            continue
        a, b = text.addr + s, text.addr + e
        a, b = max(a, lo), min(b, hi)
        # Keep a margin at both ends (labels such as __static_call_text_end sit
        # right at the start of the fill that follows what they close).
        a = (a + MARGIN + ALIGN - 1) // ALIGN * ALIGN
        b = b - MARGIN
        if b - a < MIN_HOLE // 2:
            continue
        inside = values[(values >= np.uint64(a)) & (values < np.uint64(b))]
        if len(inside):
            continue
        if any(r0 <= a and b <= r1 for r0, r1 in ranges):
            continue
        holes.append((a, b))
    return holes


def slots_short_of_holes(starts: np.ndarray, slots: np.ndarray,
                         holes: list[tuple[int, int]]) -> np.ndarray:
    """Each function's slot end, cut at the first hole after its start. A slot
    runs over the fill after a function up to the next symbol, and a hole has no
    symbol at its start when no label marks it (Debian's 6.1 kernel: the slot of
    srso_alias_safe_ret runs over a whole hole): a function growing there would
    overwrite cold code placed in the hole."""
    if not holes:
        return slots
    first = np.array(sorted(a for a, _ in holes), np.uint64)
    i = np.searchsorted(first, np.asarray(starts, np.uint64), side="right")
    nxt = first[np.minimum(i, len(first) - 1)]
    return np.where(i < len(first), np.minimum(slots, nxt), slots).astype(np.uint64)


class HoleAllocator:
    """Bump allocation in the free holes, 16-byte aligned."""

    def __init__(self, holes: list[tuple[int, int]]):
        self.holes = [list(h) for h in holes]  # [next free, end]
        self.used: list[tuple[int, int]] = []

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in self.holes)

    def reserve(self, size: int) -> int | None:
        for hole in self.holes:
            base = (hole[0] + ALIGN - 1) // ALIGN * ALIGN
            if base + size <= hole[1]:
                hole[0] = base + size
                return base
        return None

    def shrink(self, base: int, reserved: int, used: int) -> None:
        """Give back the unused tail of the latest reservation."""
        for hole in self.holes:
            if hole[0] == base + reserved:
                hole[0] = base + used
                break
        self.used.append((base, base + used))


def runs_of_byte(data: np.ndarray, value: int,
                 chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every run of ``value`` in the bytes ``data``, as offsets.
    Looked for ``chunk`` bytes at a time: a kernel's .text is tens of MB, and a
    mask and its differences at once are several times that."""
    n = len(data)
    flips = []       # offsets where a byte is ``value`` and the one before is not, or the reverse
    for lo in range(0, n, chunk):
        hi = min(lo + chunk + 1, n)     # (one byte more: flips at the chunk's end)
        same = data[lo:hi] == value
        flips.append(np.flatnonzero(same[1:] != same[:-1]) + (lo + 1))
    flips = np.concatenate(flips) if flips else np.zeros(0, np.int64)
    into = data[flips] == value
    starts, ends = flips[into], flips[~into]
    if n and data[0] == value:
        starts = np.r_[0, starts]
    if n and data[n - 1] == value:
        ends = np.r_[ends, n]
    return starts.astype(np.int64), ends.astype(np.int64)
