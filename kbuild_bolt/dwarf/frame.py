""".debug_frame: the call-frame information gdb, drgn and systemtap unwind with.

For now the FDEs of code that moved are dropped rather than left wrong (an
unwinder without an FDE falls back to ORC or prologue analysis; one with a
stale FDE unwinds through the wrong registers). CIEs and the FDEs of code that
stayed are kept byte for byte.
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.dwarf.image import CodeImage
from kbuild_bolt.dwarf.leb import DwarfError, u32, u64, unit_length

CIE_ID = 0xFFFFFFFF


def records(b) -> list[tuple[int, int, int, int]]:
    """(offset, end, CIE pointer (-1 for a CIE), initial location, range) per record."""
    out = []
    p = 0
    while p < len(b):
        if u32(b, p) == 0:          # zero terminator / padding
            out.append((p, p + 4, -2, 0, 0))
            p += 4
            continue
        end, q = unit_length(b, p, ".debug_frame record")
        cie = u32(b, q)
        if cie == CIE_ID:
            out.append((p, end, -1, 0, 0))
        else:
            if end < q + 20:
                raise DwarfError(f".debug_frame FDE at {p:#x} is too short")
            out.append((p, end, cie, u64(b, q + 4), u64(b, q + 12)))
        p = end
    return out


def update(b, image: CodeImage) -> tuple[bytes, int]:
    recs = records(b)
    fde = [r for r in recs if r[2] >= 0]
    lo = np.array([r[3] for r in fde], np.uint64)
    hi = lo + np.array([r[4] for r in fde], np.uint64)
    idx, nlo, nhi = image.ranges(lo, hi)
    count = np.bincount(idx, minlength=len(fde))
    first = np.minimum(np.searchsorted(idx, np.arange(len(fde))), max(len(idx) - 1, 0))
    same = (count == 1) & (nlo[first] == lo) & (nhi[first] == hi) if len(idx) else count == 0
    same |= lo == hi
    drop = {fde[k][0] for k in np.flatnonzero(~same).tolist()}
    if not drop:
        return bytes(b), 0
    # CIE pointers are offsets from the section start: keep every CIE where it is
    # by replacing dropped FDEs with... nothing; CIEs move, so renumber them.
    new_off = {}
    out = bytearray()
    for off, end, cie, _, _ in recs:
        if off in drop:
            continue
        new_off[off] = len(out)
        rec = bytearray(b[off:end])
        if cie >= 0:
            if cie not in new_off:
                raise DwarfError(f".debug_frame FDE at {off:#x} refers to a CIE after it")
            rec[4:8] = new_off[cie].to_bytes(4, "little")
        out += rec
    return bytes(out), len(drop)
