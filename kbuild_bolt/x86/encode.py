"""The few x86 encodings the rewriter emits itself: jumps, conditional jumps, nops.

Everything else is copied byte for byte from the input, with only its
PC-relative field recomputed, so relocations keep their offset inside the
instruction.
"""

from __future__ import annotations

NOP2 = b"\x66\x90"
NOP5 = b"\x0f\x1f\x44\x00\x00"
JMP8, JMP32 = 2, 5
JCC8, JCC32 = 2, 6


def rel(target: int, next_ip: int) -> int:
    """``target - next_ip`` as the CPU sees it: modulo 2**64, signed. (Per-CPU data
    sits near address 0 and kernel code at -2 GiB: %gs:var(%rip) wraps around.)"""
    disp = (target - next_ip) & 0xFFFFFFFFFFFFFFFF
    return disp - (1 << 64) if disp >= (1 << 63) else disp


def fits8(disp: int) -> bool:
    return -128 <= disp <= 127


def fits32(disp: int) -> bool:
    return -(1 << 31) <= disp < (1 << 31)


def jmp(size: int, disp: int) -> bytes:
    """``jmp rel8``/``jmp rel32``; ``disp`` is relative to the end of the jump."""
    if size == JMP8:
        return bytes((0xEB, disp & 0xFF))
    return b"\xe9" + (disp & 0xFFFFFFFF).to_bytes(4, "little")


def jcc(cc: int, size: int, disp: int) -> bytes:
    """``jcc rel8``/``jcc rel32`` with condition code ``cc`` (0..15)."""
    if size == JCC8:
        return bytes((0x70 | cc, disp & 0xFF))
    return bytes((0x0F, 0x80 | cc)) + (disp & 0xFFFFFFFF).to_bytes(4, "little")


def condition_code(code: bytes) -> int | None:
    """Condition code of a plain jcc (no prefixes), or None."""
    if len(code) == 2 and 0x70 <= code[0] <= 0x7F:
        return code[0] & 0xF
    if len(code) == 6 and code[0] == 0x0F and 0x80 <= code[1] <= 0x8F:
        return code[1] & 0xF
    return None


def is_plain_jmp(code: bytes) -> bool:
    return (len(code) == 2 and code[0] == 0xEB) or (len(code) == 5 and code[0] == 0xE9)


# The kernel's x86_nops[] (asm/nops.h): what it writes itself for each size.
KERNEL_NOPS = {
    1: b"\x90",
    2: b"\x66\x90",
    3: b"\x0f\x1f\x00",
    4: b"\x0f\x1f\x40\x00",
    5: b"\x0f\x1f\x44\x00\x00",
    6: b"\x66\x0f\x1f\x44\x00\x00",
    7: b"\x0f\x1f\x80\x00\x00\x00\x00",
    8: b"\x0f\x1f\x84\x00\x00\x00\x00\x00",
}


def nop(size: int) -> bytes:
    """A nop of ``size`` bytes, as the kernel writes it (static-key sites use 2 or 5)."""
    out = b""
    while size > 0:
        chunk = min(size, 8)
        out += KERNEL_NOPS[chunk]
        size -= chunk
    return out


def put_disp(buf: bytearray, offset: int, size: int, value: int) -> bool:
    """Store a signed displacement; False when it does not fit ``size`` bytes."""
    lo, hi = -(1 << (8 * size - 1)), (1 << (8 * size - 1))
    if not lo <= value < hi:
        return False
    buf[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    return True
