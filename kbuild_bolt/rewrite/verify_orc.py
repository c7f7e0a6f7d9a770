"""ORC read back from a written kernel, and checked against where code went.

The ORC tables are regenerated from the copied runs and emitted branches
(kernel.tables.orc.regenerate). This check reads them back from the output file
and compares, through the code image (where each old piece of code is now), the
state at every address where either table changes inside moved code: the new
address must have the old address's state. An undefined entry over moved code
(the unwinder stops there) or a stale CFA is caught before the output is written.
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.arrays import unique
from kbuild_bolt.dwarf.image import INHERIT, LINEAR
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.elf.place import orc_targets
from kbuild_bolt.kernel.tables.orc import loader_order

# ORC's registers for the CFA, as llvm-dwarfdump names them
_CFA_REG = {4: "RBP", 5: "RSP"}


class OrcTable:
    """.orc_unwind_ip / .orc_unwind of a file, read from the sections."""

    def __init__(self, path: str):
        with ElfImage(path) as image:
            ip_s, un_s = image.section(".orc_unwind_ip"), image.section(".orc_unwind")
            # (a separate debug file keeps the sections' headers without their bytes)
            self.present = all(s is not None and s.has_bits for s in (ip_s, un_s))
            if not self.present:
                rel = np.zeros(0, "<i4")
                raw = np.zeros(0, np.uint8)
                base = 0
            else:
                rel = np.frombuffer(image.read_file_range(ip_s.offset, ip_s.size), "<i4")
                raw = np.frombuffer(image.read_file_range(un_s.offset, un_s.size), np.uint8)
                base = ip_s.addr
        self.ip = orc_targets(base, rel)
        entries = raw[:len(rel) * 6].reshape(-1, 6)
        order = loader_order(self.ip, entries[:, 4] & 0xF)
        if order is not None:       # (a module's: as the loader will have it)
            self.ip, entries = self.ip[order], entries[order]
        self.sp_offset = entries[:, 0:2].copy().view("<i2").ravel()
        self.sp_reg = entries[:, 4] & 0xF
        # the whole entry as one number, to compare states
        self.state = np.zeros(len(rel), np.int64)
        for i in range(6):
            self.state |= entries[:, i].astype(np.int64) << (8 * i)

    def index(self, addrs: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ip, addrs, side="right").astype(np.int64) - 1

    def state_at(self, addrs: np.ndarray) -> np.ndarray:
        """The entry in effect at each address (-1: before the first entry)."""
        k = self.index(addrs)
        return np.where(k >= 0, self.state[np.maximum(k, 0)], -1)

    def cfa(self, addrs: np.ndarray) -> list:
        """'RSP+8' and the like; None where ORC gives no CFA by a register
        (undefined entries, indirect ones)."""
        if not len(self.ip):
            return [None] * len(addrs)
        out = []
        for i in self.index(addrs).tolist():
            reg = _CFA_REG.get(int(self.sp_reg[i])) if i >= 0 else None
            out.append(f"{reg}{int(self.sp_offset[i]):+d}" if reg else None)
        return out


def orc_follows_code(orc_in: OrcTable, orc_out: OrcTable, code) -> tuple[int, list[str]]:
    """(addresses checked, problems): at the start of every moved piece of code,
    at every input entry inside one and at every output entry inside one's new
    place, the output's state at the new address is the input's at the old."""
    if not len(orc_in.ip) or not len(orc_out.ip):
        return 0, []
    real = np.flatnonzero(code.kind != INHERIT)
    lin = real[code.kind[real] == LINEAR]
    old_lo = code.old_lo[lin].astype(np.uint64)
    old_hi = old_lo + code.old_len[lin].astype(np.uint64)
    new_lo = code.new_lo[lin].astype(np.uint64)
    new_hi = new_lo + code.old_len[lin].astype(np.uint64)
    points = [code.old_lo[real].astype(np.uint64)]
    # input entries inside moved code
    o = np.argsort(old_lo, kind="stable")
    k = np.searchsorted(old_lo[o], orc_in.ip, side="right") - 1
    ok = k >= 0
    ok[ok] &= orc_in.ip[ok] < old_hi[o][k[ok]]
    points.append(orc_in.ip[ok])
    # output entries inside moved code's new places, as old addresses
    o = np.argsort(new_lo, kind="stable")
    k = np.searchsorted(new_lo[o], orc_out.ip, side="right") - 1
    ok = k >= 0
    ok[ok] &= orc_out.ip[ok] < new_hi[o][k[ok]]
    kk = k[ok]
    points.append(orc_out.ip[ok] - new_lo[o][kk] + old_lo[o][kk])
    old = unique(np.concatenate(points))
    new, mapped = code.points(old)
    old, new = old[mapped], new[mapped]
    before, after = orc_in.state_at(old), orc_out.state_at(new)
    bad = np.flatnonzero(before != after)
    problems = [f"{int(old[i]):#x} -> {int(new[i]):#x}: ORC state {_show(after[i])}, "
                f"was {_show(before[i])}" for i in bad[:50].tolist()]
    if len(bad) > 50:
        problems.append(f"... {len(bad) - 50} more")
    return len(old), problems


def _show(state) -> str:
    state = int(state)
    if state < 0:
        return "none"
    sp_offset = (state & 0xFFFF) - ((state & 0x8000) << 1)
    bp_offset = ((state >> 16) & 0xFFFF) - (((state >> 16) & 0x8000) << 1)
    bits = (state >> 32) & 0xFFFF
    return f"sp_reg {bits & 0xF} sp{sp_offset:+d} bp_reg {(bits >> 4) & 0xF} bp{bp_offset:+d} " \
           f"type/flags {bits >> 8:#x}"
