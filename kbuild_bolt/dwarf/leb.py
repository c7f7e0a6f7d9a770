"""LEB128 and fixed-size fields, the variable-length numbers every DWARF section uses."""

from __future__ import annotations

from kbuild_bolt.errors import KbbError


class DwarfError(KbbError):
    """DWARF that cannot be read as the standard says (one line, no traceback)."""


def uleb(b, p: int) -> tuple[int, int]:
    """(value, next position) of the unsigned LEB128 at ``p``."""
    x = b[p]
    if x < 0x80:
        return x, p + 1
    r = x & 0x7F
    s = 7
    p += 1
    while True:
        x = b[p]
        p += 1
        r |= (x & 0x7F) << s
        if x < 0x80:
            return r, p
        s += 7


def sleb(b, p: int) -> tuple[int, int]:
    r = 0
    s = 0
    while True:
        x = b[p]
        p += 1
        r |= (x & 0x7F) << s
        s += 7
        if x < 0x80:
            if x & 0x40:
                r -= 1 << s
            return r, p


def skip_leb(b, p: int) -> int:
    while b[p] >= 0x80:
        p += 1
    return p + 1


def enc_uleb(v: int) -> bytes:
    if 0 <= v < 0x80:
        return bytes((v,))
    out = bytearray()
    while True:
        x = v & 0x7F
        v >>= 7
        if v:
            out.append(x | 0x80)
        else:
            out.append(x)
            return bytes(out)


def enc_sleb(v: int) -> bytes:
    if -0x40 <= v < 0x40:
        return bytes((v & 0x7F,))
    out = bytearray()
    while True:
        x = v & 0x7F
        v >>= 7
        if (v == 0 and not x & 0x40) or (v == -1 and x & 0x40):
            out.append(x)
            return bytes(out)
        out.append(x | 0x80)


def enc_uleb_padded(v: int, size: int) -> bytes:
    """``v`` as a ULEB128 of exactly ``size`` bytes (continuation bytes pad it), so
    a value can be rewritten in place; None when it does not fit."""
    if v < 0 or v >= 1 << (7 * size):
        return None
    out = bytearray()
    for i in range(size):
        x = v & 0x7F
        v >>= 7
        out.append(x | (0x80 if i < size - 1 else 0))
    return bytes(out)


def u16(b, p: int) -> int:
    return b[p] | b[p + 1] << 8


def u32(b, p: int) -> int:
    return int.from_bytes(b[p:p + 4], "little")


def u64(b, p: int) -> int:
    return int.from_bytes(b[p:p + 8], "little")


def unit_length(b, p: int, what: str) -> tuple[int, int]:
    """(end of the unit, position after its length field). Only 32-bit DWARF:
    the kernel's sections are far below 4 GiB."""
    n = u32(b, p)
    if n >= 0xFFFFFFF0:
        raise DwarfError(f"{what} at {p:#x}: 64-bit DWARF is not supported")
    end = p + 4 + n
    if end > len(b):
        raise DwarfError(f"{what} at {p:#x}: unit runs past the end of the section")
    return end, p + 4
