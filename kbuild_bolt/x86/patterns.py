"""Instruction patterns the kernel's tables expect at their sites.

Each pattern is vectorized: ``pattern(model, addrs, idx) -> bool array`` for
site addresses ``addrs`` that start the decoded instructions ``idx``. The
kernel checks the same things when it patches (e.g. apply_returns() warns
"missing return thunk" when a .return_sites entry is not a jump to it).
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.binary.model import in_sorted
from kbuild_bolt.x86 import decode as x86

NOP2 = (0x66, 0x90)
NOP5 = (0x0F, 0x1F, 0x44, 0x00, 0x00)

INDIRECT_THUNK_PREFIXES = ("__x86_indirect_thunk_", "__x86_indirect_call_thunk_",
                           "__x86_indirect_jump_thunk_")
RETURN_THUNK = "__x86_return_thunk"
FENTRY = "__fentry__"
STATIC_CALL_TRAMPOLINE_PREFIX = "__SCT__"


def _bytes(model, addrs, n):
    return model.read_bytes(addrs, n)


def _is(b, pattern):
    mask = np.ones(len(b), bool)
    for i, value in enumerate(pattern):
        mask &= b[:, i] == value
    return mask


def lock_prefix(model, addrs, idx):
    return _bytes(model, addrs, 1)[:, 0] == 0xF0


def ud2(model, addrs, idx):
    return _is(_bytes(model, addrs, 2), x86.UD2)


def endbr64(model, addrs, idx):
    return _is(_bytes(model, addrs, 4), x86.ENDBR64)


def static_key_site(model, addrs, idx):
    """A 2- or 5-byte jmp or nop (asm/jump_label.h)."""
    b = _bytes(model, addrs, 5)
    n = model.insns.length[idx]
    two = (n == 2) & ((b[:, 0] == 0xEB) | _is(b, NOP2))
    five = (n == 5) & ((b[:, 0] == 0xE9) | _is(b, NOP5))
    return two | five


def _direct_to(model, idx, flows, targets):
    flow = model.insns.flow[idx]
    ok = np.isin(flow, flows) & (model.insns.ref_kind[idx] == x86.REF_BRANCH)
    targets = np.unique(np.asarray(targets, dtype=np.uint64))
    return ok & in_sorted(targets, model.insns.ref[idx])


def static_call_site(model, addrs, idx):
    """A call (or tail-call jmp) to a static call trampoline."""
    return _direct_to(model, idx, (x86.CALL, x86.JMP),
                      model.symbol_addresses(STATIC_CALL_TRAMPOLINE_PREFIX))


def retpoline_site(model, addrs, idx):
    """A call, jmp or jcc to an __x86_indirect_thunk_<reg>."""
    thunks = np.concatenate([model.symbol_addresses(p) for p in INDIRECT_THUNK_PREFIXES])
    return _direct_to(model, idx, (x86.CALL, x86.JMP, x86.JCC), thunks)


def return_site(model, addrs, idx):
    """A jmp or jcc to __x86_return_thunk."""
    return _direct_to(model, idx, (x86.JMP, x86.JCC), model.symbol_addresses(RETURN_THUNK,
                                                                            exact=True))


def direct_call(model, addrs, idx):
    return (model.insns.flow[idx] == x86.CALL) & (model.insns.ref_kind[idx] == x86.REF_BRANCH)


def fentry_site(model, addrs, idx):
    """``call __fentry__``, or the 5-byte nop objtool/recordmcount left instead."""
    call = _direct_to(model, idx, (x86.CALL,), model.symbol_addresses(FENTRY, exact=True))
    return call | ((model.insns.length[idx] == 5) & _is(_bytes(model, addrs, 5), NOP5))


def pv_call(model, addrs, idx):
    """A paravirt site: an indirect call through pv_ops."""
    return model.insns.flow[idx] == x86.IND_CALL


def imm64_operand(model, addrs, idx):
    """The 8-byte immediate that ends a ``mov $imm64, %reg`` (REX.W B8+r)."""
    b = _bytes(model, model.insns.addr[idx], 2)
    ends = model.insns.addr[idx] + model.insns.length[idx]
    movabs = ((b[:, 0] & 0xF8) == 0x48) & ((b[:, 1] & 0xF8) == 0xB8)
    return movabs & (addrs + np.uint64(8) == ends)


def imm8_operand(model, addrs, idx):
    """The 1-byte immediate that ends a shift by an immediate (C1 /5 ib)."""
    ends = model.insns.addr[idx] + model.insns.length[idx]
    return addrs + np.uint64(1) == ends


def is_fill(model, idx: np.ndarray) -> np.ndarray:
    """int3 or a nop (90 or 0f 1f, after any 66/2e prefixes) at each instruction."""
    addrs = model.insns.addr[idx]
    # Two bytes for all; eight only for the few with a prefix (this runs over
    # millions of instructions).
    b = model.read_bytes(addrs, 2)
    out = (b[:, 0] == x86.INT3) | (b[:, 0] == 0x90) | ((b[:, 0] == 0x0F) & (b[:, 1] == 0x1F))
    prefixed = np.flatnonzero((b[:, 0] == 0x66) | (b[:, 0] == 0x2E))
    if len(prefixed):
        b = model.read_bytes(addrs[prefixed], 8)
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
