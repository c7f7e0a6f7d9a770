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


# Indirect-call promotion: ``cmp $imm32, <what the call calls through>``.
REGISTERS = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di",
             "8", "9", "10", "11", "12", "13", "14", "15")
CALL32 = 5   # call rel32


def cmp_register(reg: int) -> bytes:
    """``cmp $imm32, %r64`` (REX.W 81 /7), the immediate left zero (the last 4 bytes)."""
    return bytes((0x48 | (reg >> 3), 0x81, 0xF8 | (reg & 7))) + bytes(4)


def cmp_like_call(call: bytes) -> bytes | None:
    """``cmp $imm32, X`` for an indirect ``call *X`` (FF /2, through a register or a
    base-register memory operand, at most a REX prefix before it): the same ModRM,
    SIB and displacement, so it reads exactly what the call reads. The immediate
    is left zero (the last 4 bytes). None for any other form (segment or other
    prefixes, RIP-relative or absolute memory: their operand depends on where the
    instruction is, or on a relocation)."""
    rex, at = 0, 0
    if call and 0x40 <= call[0] <= 0x4F:
        rex, at = call[0], 1
    if len(call) < at + 2 or call[at] != 0xFF or (call[at + 1] >> 3) & 7 != 2:
        return None
    modrm = call[at + 1]
    mod, rm = modrm >> 6, modrm & 7
    if mod != 3:
        if mod == 0 and rm == 5:
            return None                      # RIP-relative
        if rm == 4:
            if len(call) < at + 3:
                return None
            sib = call[at + 2]
            if mod == 0 and sib & 7 == 5:
                return None                  # no base register: an absolute address
    return bytes((0x48 | (rex & 0x03), 0x81, (modrm & 0xC7) | (7 << 3))) + call[at + 2:] \
        + bytes(4)


THUNK_PREFIXES = ("__x86_indirect_thunk_", "__x86_indirect_call_thunk_")


def thunk_register(name: str) -> int | None:
    """The register a retpoline thunk calls through (``__x86_indirect_thunk_rax``: 0)."""
    for prefix in THUNK_PREFIXES:
        if name.startswith(prefix):
            reg = name[len(prefix):]
            reg = reg[1:] if reg.startswith("r") else reg
            return REGISTERS.index(reg) if reg in REGISTERS else None
    return None
