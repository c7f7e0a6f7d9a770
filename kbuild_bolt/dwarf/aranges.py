""".debug_aranges: each unit's address ranges, written again as the images of
the old ones."""

from __future__ import annotations

import numpy as np

from kbuild_bolt.dwarf.image import CodeImage
from kbuild_bolt.dwarf.leb import DwarfError, u16, u32, unit_length


def read_sets(b) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(version, .debug_info offset, [(address, length)]) per set."""
    sets = []
    p = 0
    while p < len(b):
        end, q = unit_length(b, p, ".debug_aranges set")
        version, info_off, asize, ssize = u16(b, q), u32(b, q + 2), b[q + 6], b[q + 7]
        if asize != 8 or ssize != 0:
            raise DwarfError(f".debug_aranges set at {p:#x}: address size {asize}, segment size {ssize}")
        q = p + 16          # header (12 bytes) padded to a tuple's size
        tuples = []
        while q + 16 <= end:
            a, n = int.from_bytes(b[q:q + 8], "little"), int.from_bytes(b[q + 8:q + 16], "little")
            q += 16
            if a == 0 and n == 0:
                break
            tuples.append((a, n))
        sets.append((version, info_off, tuples))
        p = end
    return sets


def write_sets(sets) -> bytes:
    out = bytearray()
    for version, info_off, tuples in sets:
        body = bytearray(version.to_bytes(2, "little") + info_off.to_bytes(4, "little") + bytes((8, 0)))
        body += bytes(4)
        for a, n in tuples:
            body += a.to_bytes(8, "little") + n.to_bytes(8, "little")
        body += bytes(16)
        out += len(body).to_bytes(4, "little") + body
    return bytes(out)


def update(b, image: CodeImage) -> bytes:
    sets = read_sets(b)
    lo, hi, which = [], [], []
    for k, (_, _, tuples) in enumerate(sets):
        for a, n in tuples:
            lo.append(a)
            hi.append(a + n)
            which.append(k)
    idx, nlo, nhi = image.ranges(np.array(lo, np.uint64), np.array(hi, np.uint64))
    new = [[] for _ in sets]
    owner = np.array(which, np.int64)[idx] if len(idx) else idx
    for k, a, c in zip(owner.tolist(), nlo.tolist(), nhi.tolist()):
        new[k].append((a, c))
    out = []
    for k, (version, info_off, _) in enumerate(sets):
        ranges = sorted(new[k])
        merged = []
        for a, c in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], c)
            else:
                merged.append([a, c])
        out.append((version, info_off, [(a, c - a) for a, c in merged]))
    return write_sets(out)
