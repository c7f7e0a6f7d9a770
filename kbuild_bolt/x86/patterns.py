"""Instruction patterns the kernel's tables expect at their sites.

Each pattern is vectorized: ``pattern(code, addrs, idx) -> bool array`` for
site addresses ``addrs`` that start the decoded instructions ``idx``. The
kernel checks the same things when it patches (e.g. apply_returns() warns
"missing return thunk" when a .return_sites entry is not a jump to it).

``code`` is any :class:`CodeView`: decoded instructions, bytes by address and
addresses by symbol name. This layer knows nothing of functions or tables.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kbuild_bolt.arrays import in_sorted, isin, unique
from kbuild_bolt.x86 import decode as x86


class CodeView(Protocol):
    """What the patterns read (the binary model above provides it)."""

    insns: x86.Decoded

    def read_bytes(self, addrs, count: int) -> np.ndarray:
        """``count`` bytes at each address, as an (n, count) uint8 array."""

    def symbol_addresses(self, name: str, exact: bool = False) -> np.ndarray:
        """Sorted addresses of the symbols named ``name`` (or starting with it)."""

NOP2 = (0x66, 0x90)
NOP5 = (0x0F, 0x1F, 0x44, 0x00, 0x00)

INDIRECT_THUNK_PREFIXES = ("__x86_indirect_thunk_", "__x86_indirect_call_thunk_",
                           "__x86_indirect_jump_thunk_")
RETURN_THUNK = "__x86_return_thunk"
FENTRY = "__fentry__"
STATIC_CALL_TRAMPOLINE_PREFIX = "__SCT__"


def _bytes(code, addrs, n):
    return code.read_bytes(addrs, n)


def _is(b, pattern):
    mask = np.ones(len(b), bool)
    for i, value in enumerate(pattern):
        mask &= b[:, i] == value
    return mask


def lock_prefix(code, addrs, idx):
    return _bytes(code, addrs, 1)[:, 0] == 0xF0


def ud2(code, addrs, idx):
    return _is(_bytes(code, addrs, 2), x86.UD2)


def endbr64(code, addrs, idx):
    return _is(_bytes(code, addrs, 4), x86.ENDBR64)


def static_key_site(code, addrs, idx):
    """A 2- or 5-byte jmp or nop (asm/jump_label.h)."""
    b = _bytes(code, addrs, 5)
    n = code.insns.length[idx]
    two = (n == 2) & ((b[:, 0] == 0xEB) | _is(b, NOP2))
    five = (n == 5) & ((b[:, 0] == 0xE9) | _is(b, NOP5))
    return two | five


def _direct_to(code, idx, flows, targets):
    flow = code.insns.flow[idx]
    ok = isin(flow, flows) & (code.insns.ref_kind[idx] == x86.REF_BRANCH)
    targets = unique(np.asarray(targets, dtype=np.uint64))
    return ok & in_sorted(targets, code.insns.ref[idx])


def static_call_site(code, addrs, idx):
    """A call (or tail-call jmp) to a static call trampoline."""
    return _direct_to(code, idx, (x86.CALL, x86.JMP),
                      code.symbol_addresses(STATIC_CALL_TRAMPOLINE_PREFIX))


def retpoline_site(code, addrs, idx):
    """A call, jmp or jcc to an __x86_indirect_thunk_<reg>."""
    thunks = np.concatenate([code.symbol_addresses(p) for p in INDIRECT_THUNK_PREFIXES])
    return _direct_to(code, idx, (x86.CALL, x86.JMP, x86.JCC), thunks)


def return_site(code, addrs, idx):
    """A jmp or jcc to __x86_return_thunk."""
    return _direct_to(code, idx, (x86.JMP, x86.JCC), code.symbol_addresses(RETURN_THUNK,
                                                                            exact=True))


def direct_call(code, addrs, idx):
    return (code.insns.flow[idx] == x86.CALL) & (code.insns.ref_kind[idx] == x86.REF_BRANCH)


def fentry_site(code, addrs, idx):
    """``call __fentry__``, or the 5-byte nop objtool/recordmcount left instead."""
    call = _direct_to(code, idx, (x86.CALL,), code.symbol_addresses(FENTRY, exact=True))
    return call | ((code.insns.length[idx] == 5) & _is(_bytes(code, addrs, 5), NOP5))


def pv_call(code, addrs, idx):
    """A paravirt site: an indirect call through pv_ops."""
    return code.insns.flow[idx] == x86.IND_CALL


def imm64_operand(code, addrs, idx):
    """The 8-byte immediate that ends a ``mov $imm64, %reg`` (REX.W B8+r)."""
    b = _bytes(code, code.insns.addr[idx], 2)
    ends = code.insns.addr[idx] + code.insns.length[idx]
    movabs = ((b[:, 0] & 0xF8) == 0x48) & ((b[:, 1] & 0xF8) == 0xB8)
    return movabs & (addrs + np.uint64(8) == ends)


def imm8_operand(code, addrs, idx):
    """The 1-byte immediate that ends a shift by an immediate (C1 /5 ib)."""
    ends = code.insns.addr[idx] + code.insns.length[idx]
    return addrs + np.uint64(1) == ends


def is_fill(code, idx: np.ndarray) -> np.ndarray:
    """int3 or a nop (90 or 0f 1f, after any 66/2e prefixes) at each instruction."""
    addrs = code.insns.addr[idx]
    # Two bytes for all; eight only for the few with a prefix (this runs over
    # millions of instructions).
    b = code.read_bytes(addrs, 2)
    out = (b[:, 0] == x86.INT3) | (b[:, 0] == 0x90) | ((b[:, 0] == 0x0F) & (b[:, 1] == 0x1F))
    prefixed = np.flatnonzero((b[:, 0] == 0x66) | (b[:, 0] == 0x2E))
    if len(prefixed):
        b = code.read_bytes(addrs[prefixed], 8)
        first = np.argmin((b == 0x66) | (b == 0x2E), axis=1)   # first byte not a prefix
        rows = np.arange(len(prefixed))
        op = b[rows, np.minimum(first, 7)]
        op2 = b[rows, np.minimum(first + 1, 7)]
        out[prefixed] = (op == 0x90) | ((op == 0x0F) & (op2 == 0x1F))
    return out


PATTERNS = {
    "lock_prefix": lock_prefix,
    "ud2": ud2,
    "endbr64": endbr64,
    "static_key_site": static_key_site,
    "static_call_site": static_call_site,
    "retpoline_site": retpoline_site,
    "return_site": return_site,
    "direct_call": direct_call,
    "fentry_site": fentry_site,
    "pv_call": pv_call,
    "imm64_operand": imm64_operand,
    "imm8_operand": imm8_operand,
}

DESCRIPTIONS = {
    "lock_prefix": "a lock prefix",
    "ud2": "ud2",
    "endbr64": "endbr64",
    "static_key_site": "a 2- or 5-byte jmp/nop",
    "static_call_site": "a call/jmp to a static call trampoline",
    "retpoline_site": "a call/jmp/jcc to __x86_indirect_thunk_*",
    "return_site": "a jmp/jcc to __x86_return_thunk",
    "direct_call": "a direct call",
    "fentry_site": "call __fentry__ or a 5-byte nop",
    "pv_call": "an indirect call (paravirt)",
    "imm64_operand": "the imm64 of a mov $imm64, %reg",
    "imm8_operand": "the imm8 ending a shift",
}
