"""DWARF expressions: where their DW_OP_addr operands are."""

from __future__ import annotations

from kbuild_bolt.dwarf.leb import DwarfError, skip_leb, uleb

OP_ADDR = 0x03
# operand shapes: a fixed size, or a tuple of steps ("u"/"s": LEB128, "b": ULEB128
# length + block, "x": ULEB128 length + nested expression, int: fixed bytes)
_FIXED = {0x08: 1, 0x09: 1, 0x0a: 2, 0x0b: 2, 0x0c: 4, 0x0d: 4, 0x0e: 8, 0x0f: 8, 0x15: 1,
          0x28: 2, 0x2f: 2, 0x94: 1, 0x95: 1, 0x98: 2, 0x99: 4, 0x9a: 4, 0xfa: 4}
_STEPS = {0x10: ("u",), 0x11: ("s",), 0x23: ("u",), 0x90: ("u",), 0x91: ("s",), 0x92: ("u", "s"),
          0x93: ("u",), 0x9d: ("u", "u"), 0x9e: ("b",), 0xa0: (4, "s"), 0xa1: ("u",),
          0xa2: ("u",), 0xa3: ("x",), 0xa4: ("u", "c"), 0xa5: ("u", "u"), 0xa6: (1, "u"),
          0xa7: (1, "u"), 0xa8: ("u",), 0xa9: ("u",), 0xf2: (4, "s"), 0xf3: ("x",),
          0xf4: ("u", "c"), 0xf5: ("u", "u"), 0xf6: (1, "u"), 0xf7: ("u",), 0xf9: ("u",),
          0xfb: ("u",), 0xfc: ("u",), 0xfd: (4,)}
_NONE = (set(range(0x12, 0x28)) | set(range(0x29, 0x2f)) | set(range(0x30, 0x70)) | {
    0x06, 0x96, 0x97, 0x9b, 0x9c, 0x9f, 0xe0, 0xf0}) - set(_FIXED) - set(_STEPS)


def addr_operands(b, p: int, n: int) -> list[int]:
    """Positions of the 8-byte operands of every DW_OP_addr in the expression at
    ``p`` (``n`` bytes)."""
    if OP_ADDR not in b[p:p + n]:
        return []
    out = []
    end = p + n
    while p < end:
        op = b[p]
        p += 1
        if op == OP_ADDR:
            out.append(p)
            p += 8
        elif op in _NONE:
            continue
        elif 0x70 <= op <= 0x8f:
            p = skip_leb(b, p)
        elif op in _FIXED:
            p += _FIXED[op]
        elif op in _STEPS:
            for step in _STEPS[op]:
                if step == "u" or step == "s":
                    p = skip_leb(b, p)
                elif step == "b":
                    k, p = uleb(b, p)
                    p += k
                elif step == "c":
                    p += b[p] + 1
                elif step == "x":
                    k, p = uleb(b, p)
                    out += addr_operands(b, p, k)
                    p += k
                else:
                    p += step
        else:
            raise DwarfError(f"DWARF expression operation {op:#x} is not supported")
    if p != end:
        raise DwarfError("a DWARF expression runs past its end")
    return out
