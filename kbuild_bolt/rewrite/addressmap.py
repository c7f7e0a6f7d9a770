"""AddressMap: where every old address of rewritten code is now.

Built from the emission: for each old instruction of a rewritten
function its new address (or none when the instruction was dropped: a jump
that now falls through, alignment fill nobody reaches). An old address inside
an instruction maps to the same offset inside the moved instruction (operand
references such as runtime constants), where its bytes are: a promoted call
entered at its cmp has its address at the cmp and its bytes in its fallback.

A function rewritten in place keeps its entry (the entry block stays first), so
its start is not "moved"; a function placed anew moves whole, its call padding
included.
"""

from __future__ import annotations

import numpy as np


class AddressMap:
    def __init__(self, model, emission):
        lo = emission.extent if emission.placed else emission.start
        order = np.argsort(lo)
        self.func_start = lo[order]
        self.func_end = emission.end[order]
        self.entry = emission.start[order]
        self.entry_moves = (emission.new_start != emission.start)[order]
        # Instructions in address order, and where each now is (0: not moved or dropped).
        self.old = model.insns.addr
        self.new = emission.new_addr
        # Where each one's bytes now are, for addresses inside it (relocated fields,
        # operands): the same, except where its address names other code (a promoted
        # call entered at its cmp keeps its bytes in its fallback).
        self.body = self.new
        if len(emission.bodies):
            self.body = self.new.copy()
            self.body[emission.bodies[:, 0].astype(np.int64)] = emission.bodies[:, 1]

    def __len__(self) -> int:
        return len(self.func_start)

    def moved(self, addrs) -> np.ndarray:
        """True where an address lies inside a rewritten function (its entry only
        when the function moved whole)."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        i = np.searchsorted(self.func_start, addrs, side="right").astype(np.int64) - 1
        ok = i >= 0
        j = i[ok]
        ok[ok] &= (addrs[ok] < self.func_end[j]) & ((addrs[ok] != self.entry[j])
                                                   | self.entry_moves[j])
        return ok

    def is_moved(self, addr: int) -> bool:
        return bool(self.moved(np.array([addr], dtype=np.uint64))[0])

    def translate(self, addrs, bytes_of: bool = False,
                  moved: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(new addresses as uint64, ok mask). Addresses outside rewritten functions
        map to themselves; ``ok`` is False where the address was in dropped code.
        ``bytes_of``: the addresses name instructions' bytes (a site the kernel
        patches), not where control arrives: an instruction start maps to where
        its bytes are, as addresses inside it always do. ``moved``: what
        :meth:`moved` says of ``addrs``, when the caller has it already."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        out = addrs.copy()
        ok = np.ones(len(addrs), bool)
        moved = self.moved(addrs) if moved is None else moved
        if moved.any():
            a = addrs[moved]
            i = np.searchsorted(self.old, a, side="right").astype(np.int64) - 1
            base_new = self.body[i] if bytes_of else \
                np.where(a == self.old[i], self.new[i], self.body[i])
            good = base_new != 0
            out[moved] = np.where(good, base_new + (a - self.old[i]), np.uint64(0))
            ok[moved] = good
        return out, ok
