"""Bulk x86-64 decoding with iced-x86 into flat numpy arrays.

Kernel code is millions of instructions; a Python object per instruction
would be too slow and too big. One pass over a code range keeps, per
instruction, its length and iced's flow-control class; for the few that need
it (branches, calls, RIP-relative operands) also the address they refer to.
Everything else about an instruction is decoded again on demand.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
from iced_x86 import Code, Decoder, Instruction

from kbuild_bolt.arrays import SparseColumn

# iced-x86 FlowControl values (kept as plain ints in the arrays).
NEXT = 0
JMP = 1          # direct unconditional branch
IND_JMP = 2      # indirect branch
JCC = 3          # conditional branch (jcc, jrcxz, loop)
RET = 4
CALL = 5         # direct call
IND_CALL = 6
INTERRUPT = 7    # int3, int n
XBEGIN = 8
EXCEPTION = 9    # ud0/ud1/ud2, invalid

FLOW_NAMES = {NEXT: "next", JMP: "jmp", IND_JMP: "ijmp", JCC: "jcc", RET: "ret", CALL: "call",
              IND_CALL: "icall", INTERRUPT: "int", XBEGIN: "xbegin", EXCEPTION: "exception"}

# ``ref_kind`` of an instruction: what its ``ref`` address is.
REF_NONE = 0
REF_BRANCH = 1   # near branch/call target
REF_RIPREL = 2   # RIP-relative memory operand address

UD2 = b"\x0f\x0b"
INT3 = 0xCC
ENDBR64 = b"\xf3\x0f\x1e\xfa"
# XEN_EMULATE_PREFIX / KVM_EMULATE_PREFIX: ud2 followed by a signature; the
# hypervisor emulates the next instruction. Not a trap, and the signature is
# not code.
EMULATE_PREFIXES = (b"\x0f\x0bxen", b"\x0f\x0bkvm")


FIELDS = ("addr", "length", "flow", "ref", "ref_kind", "field_off", "field_size", "invalid")


@dataclass
class Decoded:
    """Instructions of one or more code ranges, in address order."""

    addr: np.ndarray      # uint64 start address
    length: np.ndarray    # uint8
    flow: np.ndarray      # uint8, one of the flow constants
    # uint64 branch target / RIP-relative address (0: none), kept where it is not
    # 0 (one instruction in eight has one)
    ref: SparseColumn
    ref_kind: np.ndarray  # uint8 REF_*
    field_off: np.ndarray  # uint8 offset of the rel8/rel32/disp32 field holding ``ref``
    field_size: np.ndarray  # uint8 its size (0: no PC-relative field)
    invalid: np.ndarray   # bool: iced could not decode the bytes

    def __post_init__(self):
        if isinstance(self.ref, np.ndarray):
            self.ref = SparseColumn.from_dense(self.ref.astype(np.uint64, copy=False))

    def __len__(self) -> int:
        return len(self.addr)

    @classmethod
    def empty(cls) -> "Decoded":
        z8 = np.zeros(0, np.uint8)
        return cls(np.zeros(0, np.uint64), z8, z8, SparseColumn.zeros(0, np.uint64), z8, z8, z8,
                   np.zeros(0, bool))

    @classmethod
    def concatenate(cls, parts: list["Decoded"], consume: bool = False) -> "Decoded":
        """The parts one after the other. With ``consume``, each part's column is
        released as soon as it is copied (millions of instructions: the parts and
        the result are never all in memory at once)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        columns = {}
        for f in FIELDS:
            join = SparseColumn.concatenate if f == "ref" else np.concatenate
            columns[f] = join([getattr(p, f) for p in parts])
            if consume:
                for p in parts:
                    setattr(p, f, None)
        return cls(**columns)

    @classmethod
    def merge(cls, a: "Decoded", b: "Decoded") -> "Decoded":
        """Two address-sorted sets of instructions, in address order (``a`` first at
        equal addresses). Consumes both, column by column."""
        n = len(a) + len(b)
        # (the shorter list is searched in the longer: a binary search per
        # instruction is most of the cost)
        if len(a) <= len(b):
            from_a = np.zeros(n, bool)
            from_a[np.searchsorted(b.addr, a.addr, side="left") + np.arange(len(a))] = True
        else:
            from_a = np.ones(n, bool)
            from_a[np.searchsorted(a.addr, b.addr, side="right") + np.arange(len(b))] = False
        from_b = ~from_a
        # Where the entries of each ``ref`` go: an instruction of ``a`` comes after
        # the ones of ``b`` below its address, one of ``b`` after those of ``a`` at
        # or below its address.
        ia, ib = a.ref.index, b.ref.index
        at = np.concatenate([np.searchsorted(b.addr, a.addr[ia], side="left") + ia,
                             np.searchsorted(a.addr, b.addr[ib], side="right") + ib])
        order = np.argsort(at, kind="stable")
        columns = {"ref": SparseColumn(n, at[order],
                                       np.concatenate([a.ref.values, b.ref.values])[order])}
        a.ref = b.ref = None
        for f in FIELDS:
            if f == "ref":
                continue
            x, y = getattr(a, f), getattr(b, f)
            out = np.empty(n, x.dtype)
            out[from_a] = x
            out[from_b] = y
            columns[f] = out
            setattr(a, f, None)
            setattr(b, f, None)
        return cls(**columns)

    def take(self, index) -> "Decoded":
        return Decoded(*(self.ref.take(index) if f == "ref" else getattr(self, f)[index]
                         for f in FIELDS))

    def end_of(self, index):
        """Address after the instruction(s) at ``index`` (an int, an index array or
        a slice). Not kept as a column: a whole-kernel column of ends is 10 MB
        held for the whole rewrite, where callers want the ends of a few."""
        return self.addr[index] + self.length[index]

    def follows_on(self, chunk: int = 1 << 18) -> np.ndarray:
        """Per instruction: it starts where the one before it ends (bool; False
        for the first). Worked out ``chunk`` instructions at a time: the ends of
        a whole kernel at once are 20 MB of uint64 for a column of bools."""
        n = len(self.addr)
        out = np.zeros(n, bool)
        for lo in range(1, n, chunk):
            hi = min(lo + chunk, n)
            out[lo:hi] = self.addr[lo:hi] == self.end_of(slice(lo - 1, hi - 1))
        return out


def decode_ranges(data, base: int, ranges: list[tuple[int, int]],
                  offsets: list[int] | None = None) -> Decoded:
    """Decode each ``(start, end)`` address range of ``data`` (mapped at ``base``;
    or, given ``offsets``, each range's bytes at its offset in ``data``).

    Every range is decoded on its own from its start, so a function's decoding
    never depends on the bytes before it. An instruction that would run past
    the end of its range is recorded as invalid.
    """
    lengths = array("B")
    flows = array("B")
    addrs = array("Q")
    ref_index = array("q")
    ref_value = array("Q")
    ref_kinds = array("B")
    ref_field = array("B")
    ref_fsize = array("B")
    bad = array("q")
    count = 0
    data = bytes(data)
    decoder = Decoder(64, data, ip=base)
    for k, (start, end) in enumerate(ranges):
        if end <= start:
            continue
        # (the offset in ``data`` of an address of this range, less the address)
        delta = offsets[k] - start if offsets is not None else -base
        decoder.position = start + delta
        decoder.ip = start
        pos = start
        for ins in decoder:
            n = ins.len
            f = ins.flow_control
            addrs.append(pos)
            lengths.append(n)
            flows.append(f)
            if f:
                if f == JMP or f == JCC or f == CALL:
                    co = decoder.get_constant_offsets(ins)
                    ref_index.append(count)
                    ref_value.append(ins.near_branch_target)
                    ref_kinds.append(REF_BRANCH)
                    ref_field.append(co.immediate_offset)
                    ref_fsize.append(co.immediate_size)
                elif f == EXCEPTION:
                    if ins.code == Code.INVALID:
                        bad.append(count)
                    elif data[pos + delta:pos + delta + 5] in EMULATE_PREFIXES:
                        # ud2 + "xen"/"kvm": a hypervisor-emulated prefix, one 5-byte unit.
                        lengths[-1] = n = 5
                        flows[-1] = f = NEXT
                        decoder.position = pos + delta + 5
                        decoder.ip = pos + 5
                elif (f == IND_JMP or f == IND_CALL) and ins.is_ip_rel_memory_operand:
                    co = decoder.get_constant_offsets(ins)
                    ref_index.append(count)
                    ref_value.append(ins.ip_rel_memory_address)
                    ref_kinds.append(REF_RIPREL)
                    ref_field.append(co.displacement_offset)
                    ref_fsize.append(co.displacement_size)
            elif ins.is_ip_rel_memory_operand:
                co = decoder.get_constant_offsets(ins)
                ref_index.append(count)
                ref_value.append(ins.ip_rel_memory_address)
                ref_kinds.append(REF_RIPREL)
                ref_field.append(co.displacement_offset)
                ref_fsize.append(co.displacement_size)
            pos += n
            count += 1
            if pos >= end:
                break
        if pos > end:  # the last instruction runs past the end of its range
            bad.append(count - 1)
    idx = np.frombuffer(ref_index, np.int64) if len(ref_index) else np.zeros(0, np.int64)
    out = Decoded(
        addr=np.frombuffer(addrs, np.uint64).copy() if count else np.zeros(0, np.uint64),
        length=np.frombuffer(lengths, np.uint8).copy() if count else np.zeros(0, np.uint8),
        flow=np.frombuffer(flows, np.uint8).copy() if count else np.zeros(0, np.uint8),
        ref=SparseColumn(count, idx.copy(), np.frombuffer(ref_value, np.uint64).copy()
                         if len(ref_index) else np.zeros(0, np.uint64)),
        ref_kind=np.zeros(count, np.uint8),
        field_off=np.zeros(count, np.uint8),
        field_size=np.zeros(count, np.uint8),
        invalid=np.zeros(count, bool),
    )
    if len(ref_index):
        out.ref_kind[idx] = np.frombuffer(ref_kinds, np.uint8)
        out.field_off[idx] = np.frombuffer(ref_field, np.uint8)
        out.field_size[idx] = np.frombuffer(ref_fsize, np.uint8)
    if len(bad):
        out.invalid[np.frombuffer(bad, np.int64)] = True
    return out


def decode_one(data: bytes, addr: int) -> Instruction:
    """The full iced Instruction at ``addr`` (``data`` starts there)."""
    decoder = Decoder(64, data, ip=addr)
    return decoder.decode()
