"""ORC unwind tables (asm/orc_types.h): ``.orc_unwind_ip``, ``.orc_unwind``, ``.orc_header``.

Two parallel arrays sorted by address: an instruction address (PC-relative s32)
and the 6-byte ORC entry that holds from there up to the next address. 6.4+
also has ``.orc_header``, a 20-byte hash of the ORC format that modules must match.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, ORC_IP, sorted_by,
)

ORC_TYPE_UNDEFINED = 0
ORC_TYPE_END_OF_STACK = 1
ORC_TYPE_CALL = 2
ORC_TYPE_REGS = 3
ORC_TYPE_REGS_PARTIAL = 4

IP = Layout(4, (Field("ip", 0, "prel32"),))
ENTRY = Layout(6, (
    Field("sp_offset", 0, "s16"),
    Field("bp_offset", 2, "s16"),
    # sp_reg:4 bp_reg:4 type:3 signal:1 (6.12; 6.1: type:2 signal:1 end:1)
    Field("bits", 4, "u16"),
))
HEADER = Layout(20, (Field("hash", 0, "u32"),))

SPECS = [
    TableSpec(
        name=".orc_unwind_ip",
        bounds=Bounds("__start_orc_unwind_ip", "__stop_orc_unwind_ip", ".orc_unwind_ip"),
        layouts=lambda version: [IP],
        description="ORC: instruction addresses",
        refs=(CodeRef("ip", ORC_IP),),
        check=lambda model, data: sorted_by(model, data, "ip"),
        sorted_field="ip",
    ),
    TableSpec(
        name=".orc_unwind",
        bounds=Bounds("__start_orc_unwind", "__stop_orc_unwind", ".orc_unwind"),
        layouts=lambda version: [ENTRY],
        description="ORC: unwind entries",
    ),
    TableSpec(
        name=".orc_header",
        bounds=Bounds("__start_orc_header", "__stop_orc_header", ".orc_header"),
        layouts=lambda version: [HEADER] if version >= (6, 4) else [],
        description="ORC: format hash",
    ),
]


# ---------------------------------------------------------------------------
# Regeneration after code moved


class OrcCapacityError(Exception):
    """The new layout needs more ORC entries than the table has room for."""


def loader_order(ips, sp_reg):
    """The order the module loader sorts a module's ORC table in
    (unwind_module_init(): by address; at one address, an entry without a CFA
    register first, so the lookup finds the real one), or None when ``ips`` is
    sorted already (vmlinux's table: sorttable sorted it at build time)."""
    import numpy as np

    if len(ips) < 2 or not (ips[1:] < ips[:-1]).any():
        return None
    return np.lexsort((np.asarray(sp_reg) != 0, ips))


FILL_UNKNOWN = 2


def regenerate(model, runs, branch_states, moved_ranges, capacity: int | None = None) -> tuple:
    """New (ips, entries) for the ORC tables after the rewrite moved code.

    ORC describes the stack at every instruction; an instruction's state does
    not depend on where it sits, so the new table is built from the old one:
    every copied run of bytes takes its old entries along (including those
    inside patch units, which describe the replacement's instructions), every
    emitted jump takes the state of the instruction it stands for (an added
    fall-through jump: the state where it lands), and the int3 fill after a
    shortened function keeps the state that followed the old function.
    Consecutive identical states are merged; the table keeps its size (the
    section cannot grow): it is padded with repeats of its last entry, or, when
    the new layout needs more entries, undefined entries in inter-function
    padding are dropped first. ``runs``: (new start, old start, length) of every
    copied run; ``branch_states``: (new addresses, old instruction indices) of the
    emitted branches; ``moved_ranges``: (start, old end, new end) of every
    rewritten slot and every fragment placed in free room (old end = start there).
    ``capacity``: entries the table holds (its size; less only to test giving
    entries up).
    """
    import numpy as np

    ip_table = model.tables[".orc_unwind_ip"]
    orc_table = model.tables[".orc_unwind"]
    old_ip = ip_table.targets("ip")
    old_e = np.array(orc_table.entries)
    capacity = len(old_ip) if capacity is None else capacity
    order = loader_order(old_ip, old_e["bits"] & 0xF)
    if order is not None:           # (a module's: as the loader will have it)
        old_ip, old_e = old_ip[order], old_e[order]

    def state_at(addrs):
        i = np.searchsorted(old_ip, np.asarray(addrs, dtype=np.uint64), side="right") - 1
        return np.maximum(i, 0)

    # Old entries outside every rewritten range stay.
    ranges = np.array(moved_ranges, dtype=np.uint64).reshape(-1, 3)
    range_end = np.maximum(ranges[:, 1], ranges[:, 2])
    order = np.argsort(ranges[:, 0])
    lo, hi = ranges[order, 0], range_end[order]
    j = np.searchsorted(lo, old_ip, side="right").astype(np.int64) - 1
    inside = (j >= 0)
    inside[inside] &= old_ip[inside] < hi[j[inside]]
    keep_ip = [old_ip[~inside]]
    keep_src = [np.flatnonzero(~inside)]
    # Entries that only describe fill (int3/nop between functions, after new code):
    # no instruction there ever runs, so they are the first to give up for room.
    # (FILL_UNKNOWN: an old entry kept where it was, looked at only if room runs out)
    keep_fill = [np.full(int((~inside).sum()), FILL_UNKNOWN, np.uint8)]
    keep_new = [np.zeros(int((~inside).sum()), bool)]

    runs = np.asarray(runs, dtype=np.uint64).reshape(-1, 3)
    code_starts = [runs[:, 0]]         # where new code is (no entry may be dropped over it)
    if len(runs):
        r_at, r_base, r_size = runs[:, 0], runs[:, 1], runs[:, 2]
        # An entry at the start of every copied run: the state there.
        keep_ip.append(r_at)
        keep_src.append(state_at(r_base))
        keep_fill.append(np.zeros(len(r_at), np.uint8))
        keep_new.append(np.ones(len(r_at), bool))
        # Old entries strictly inside a run move with it (patch-unit entries included).
        order = np.argsort(r_base)
        r_at, r_base, r_size = r_at[order], r_base[order], r_size[order]
        k = np.searchsorted(r_base, old_ip, side="right").astype(np.int64) - 1
        inside_run = k >= 0
        inside_run[inside_run] &= ((old_ip[inside_run] > r_base[k[inside_run]])
                                   & (old_ip[inside_run] < r_base[k[inside_run]]
                                      + r_size[k[inside_run]]))
        sel = np.flatnonzero(inside_run)
        keep_ip.append(old_ip[sel] - r_base[k[sel]] + r_at[k[sel]])
        keep_src.append(sel)
        keep_fill.append(np.zeros(len(sel), np.uint8))
        keep_new.append(np.ones(len(sel), bool))
    ats, state_insns = branch_states
    if len(ats):
        ats = np.asarray(ats, dtype=np.uint64)
        code_starts.append(ats)
        olds = model.insns.addr[np.asarray(state_insns, np.int64)]
        keep_ip.append(ats)
        keep_src.append(state_at(olds))
        keep_fill.append(np.zeros(len(ats), np.uint8))
        keep_new.append(np.ones(len(ats), bool))
    # After the new code: what followed the old code (int3 fill, the next function).
    # First in the lists, so that any other entry at the same address wins: where
    # one cold part ends the next may start, and the free room's old state
    # (undefined) must not cover its first instructions.
    keep_ip.insert(0, ranges[:, 2])
    keep_src.insert(0, state_at(range_end))
    keep_fill.insert(0, np.ones(len(ranges), np.uint8))
    keep_new.insert(0, np.ones(len(ranges), bool))

    ips = np.concatenate(keep_ip)
    src = np.concatenate(keep_src).astype(np.int64)
    fill = np.concatenate(keep_fill)
    new = np.concatenate(keep_new)
    order = np.argsort(ips, kind="stable")
    ips, src, fill, new = ips[order], src[order], fill[order], new[order]
    # The last entry at one address wins; then new entries that repeat the state
    # before them are merged away (old entries stay exactly as they were).
    last_at = np.ones(len(ips), bool)
    last_at[:-1] = ips[1:] != ips[:-1]
    ips, src, fill, new = ips[last_at], src[last_at], fill[last_at], new[last_at]
    states = old_e[src]
    same = np.zeros(len(ips), bool)
    same[1:] = ((states["sp_offset"][1:] == states["sp_offset"][:-1])
                & (states["bp_offset"][1:] == states["bp_offset"][:-1])
                & (states["bits"][1:] == states["bits"][:-1]))
    same &= new
    ips, states, fill = ips[~same], states[~same], fill[~same]

    if len(ips) > capacity:
        # Old entries that repeat the state before them say nothing: give them up.
        same = np.zeros(len(ips), bool)
        same[1:] = ((states["sp_offset"][1:] == states["sp_offset"][:-1])
                    & (states["bp_offset"][1:] == states["bp_offset"][:-1])
                    & (states["bits"][1:] == states["bits"][:-1]))
        ips, states, fill = ips[~same], states[~same], fill[~same]
    if len(ips) > capacity:
        unknown = np.flatnonzero(fill == FILL_UNKNOWN)
        fill = fill == 1
        fill[unknown] = _in_fill(model, ips[unknown])
        # Undefined entries over fill only stop the unwinder in bytes that never
        # run: the cheapest to give up.
        undefined = ((states["sp_offset"] == 0) & (states["bp_offset"] == 0)
                     & (states["bits"] == 0) & fill)
        # ... when fill is all they cover: objtool leaves functions it does not
        # check (vDSO helpers, non-standard objects) undefined too, and the entry
        # before the fill must not become theirs, nor new code's placed after it.
        starts = np.sort(np.concatenate([model.functions.start.astype(np.uint64)]
                                        + code_starts))
        nxt = np.searchsorted(starts, ips, side="right")
        next_start = np.where(nxt < len(starts), starts[np.minimum(nxt, len(starts) - 1)],
                              np.uint64(0xFFFFFFFFFFFFFFFF))
        next_ip = np.r_[ips[1:], np.uint64(0xFFFFFFFFFFFFFFFF)]
        undefined &= next_ip <= next_start
        extra = len(ips) - capacity
        candidates = np.flatnonzero(undefined)
        if len(candidates) < extra:
            raise OrcCapacityError(f"the new layout needs {len(ips)} ORC entries, "
                                   f"the table holds {capacity}")
        drop = np.zeros(len(ips), bool)
        drop[candidates[:extra]] = True
        ips, states = ips[~drop], states[~drop]
    if len(ips) < capacity:
        pad = capacity - len(ips)
        ips = np.concatenate([ips, np.full(pad, ips[-1], dtype=np.uint64)])
        states = np.concatenate([states, np.repeat(states[-1:], pad)])
    return ips, states


def _in_fill(model, ips):
    """True where an address is an int3/nop fill instruction outside every function."""
    import numpy as np

    from kbuild_bolt.x86.patterns import is_fill

    idx = model.insn_index(ips)
    out = np.zeros(len(ips), bool)
    ok = idx >= 0
    ok[ok] &= model.function_of_insn[idx[ok]] < 0
    sel = np.flatnonzero(ok)
    if len(sel):
        out[sel] = is_fill(model, idx[sel])
    # (inside a run of int3 kept as one record: only where no record starts)
    miss = np.flatnonzero(idx < 0)
    out[miss] = model.in_int3_run(ips[miss]) & (model.functions.rows_containing(ips[miss]) < 0)
    return out
