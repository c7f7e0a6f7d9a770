"""Emit one function's blocks in a new order inside its own slot.

A block is emitted as its *body* (instructions copied byte for byte, with any
PC-relative field recomputed for the new address) followed by its terminator:
a direct jump or conditional jump to a block of the same function is encoded
anew (short or near, inverted when its taken side now falls through, removed
when its target follows), a static-key site keeps its nop/jmp state at 2 or 5
bytes, and a jump is added where a fall-through no longer falls through.
Everything else is part of the body: table sites (retpoline, return, static
call), patch units (alternatives, paravirt: never resized), calls, returns.

Branch sizes are relaxed: all start short and grow until every displacement
fits. The result is a :class:`FunctionPlan` with the new bytes, the new
address of every old instruction, and what the ORC regeneration needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from itertools import accumulate

import numpy as np

from kbuild_bolt.binary.cfg import FALLTHROUGH, STATIC_KEY, TAKEN
from kbuild_bolt.elf.writer import put_fields
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86 import encode as enc

# Item kinds
COPY, JMP, JCC, SITE, NOP = 0, 1, 2, 3, 4
# Target kinds for branch items
TO_BLOCK, TO_ADDR = 0, 1
# Branch item sizes: short (rel8 jmp/jcc, 2-byte static-key site) and long.
SHORT_SIZE = {JMP: enc.JMP8, JCC: enc.JCC8, SITE: 2}
LONG_SIZE = {JMP: enc.JMP32, JCC: enc.JCC32, SITE: 5}


class Item:
    """One piece of the new function: copied instructions or an emitted branch."""

    __slots__ = ("kind", "i0", "i1", "cc", "tkind", "target", "origin", "state",
                 "site_jmp", "nbytes")

    def __init__(self, kind, i0=0, i1=0, cc=0, tkind=TO_BLOCK, target=0, origin=-1, state=-1,
                 site_jmp=False, nbytes=0):
        self.kind = kind
        self.i0, self.i1 = i0, i1          # COPY: instructions [i0, i1)
        # Size in bytes: COPY/NOP as given; branches start short (see grow).
        self.nbytes = nbytes if kind == COPY or kind == NOP else SHORT_SIZE[kind]
        self.cc = cc                       # JCC: condition code
        self.tkind, self.target = tkind, target
        self.origin = origin               # old instruction this branch re-encodes (-1: new)
        self.state = state                 # old instruction whose ORC state applies
        self.site_jmp = site_jmp           # SITE: jmp (True) or nop (False)

    def grow(self) -> None:
        """Make this branch long (rel32 jmp/jcc, 5-byte site)."""
        self.nbytes = LONG_SIZE[self.kind]


class EmitError(Exception):
    """This function cannot be emitted in this order (left untouched)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class FunctionPlan:
    row: int
    start: int
    code: bytes                     # new bytes from ``start``
    new_addr: np.ndarray            # uint64 new address of every old instruction (0: dropped)
    first_insn: int                 # index of the function's first instruction
    # ORC: (new address, old instruction index whose state applies) for emitted branches,
    # and copied runs (new start, old start address, length).
    branch_states: list[tuple[int, int]] = field(default_factory=list)
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    # PC-relative fields that point into another function's interior: resolved
    # once every function has its new addresses: (field address, size, next ip, old target).
    deferred: list[tuple[int, int, int, int]] = field(default_factory=list)
    dropped_bytes: int = 0
    inserted_jumps: int = 0
    # Blocks that did not fit the slot: (address, bytes) in free room elsewhere in .text.
    fragment: tuple[int, bytes] | None = None


@dataclass
class EmitContext:
    """What emission needs from the whole-kernel model (computed once)."""

    model: object
    cfg: object
    is_site: np.ndarray         # bool per instruction: a table entry points at it
    in_unit: np.ndarray         # bool per instruction: inside (not at the start of) a patch unit
    fill: np.ndarray            # bool per instruction: int3 or a nop
    code: bytes                 # the bytes of the section being rewritten
    code_base: int
    # callable(uint64 array) -> bool array: inside (not at the start of) a function that moves
    moved_interior: object
    blocks: BlockTable = None


# How a block ends, for emission (BlockTable.kind).
END_COPY, END_SITE, END_JMP, END_JCC, END_UNIT_JMP = 0, 1, 2, 3, 4


def _replacements_never_fall_through(model, site: int) -> bool:
    """True when every replacement of the alternative at ``site`` ends in a
    return or jump: once patched, nothing falls through the site, so what
    follows it may change."""
    from iced_x86 import Decoder

    alt = model.tables.get(".altinstructions")
    if alt is None:
        return False
    instr = alt.targets("instr")
    hits = np.flatnonzero(instr == np.uint64(site))
    if not len(hits):
        return False
    repl = alt.targets("repl")[hits]
    lengths = alt.entries["replacementlen"][alt.indices[hits]]
    for addr, n in zip(repl.tolist(), lengths.tolist()):
        if n == 0:
            return False
        last = None
        for ins in Decoder(64, model.image.read(int(addr), int(n)), ip=int(addr)):
            last = ins
        if last is None or last.flow_control not in (x86.RET, x86.JMP, x86.IND_JMP):
            return False
    return True


class BlockTable:
    """Per-block facts emission needs, computed for all blocks at once (numpy),
    kept as Python lists for fast access while laying out functions."""

    def __init__(self, model, cfg, is_site: np.ndarray, in_unit: np.ndarray):
        insns = model.insns
        nb = len(cfg.block_first)
        first, end, term = cfg.block_first, cfg.block_end, cfg.block_term
        ends = insns.addr + insns.length
        fall = np.full(nb, -1, np.int64)
        taken = np.full(nb, -1, np.int64)
        ft = cfg.edge_kind == FALLTHROUGH
        fall[cfg.edge_src[ft]] = cfg.edge_dst[ft]
        tk = np.isin(cfg.edge_kind, (TAKEN, STATIC_KEY))
        taken[cfg.edge_src[tk]] = cfg.edge_dst[tk]
        flow = insns.flow[term]
        direct = np.isin(flow, (x86.JMP, x86.JCC)) & (insns.ref_kind[term] == x86.REF_BRANCH)
        target = insns.ref[term]
        t_idx = model.insn_index(target)
        block_of = np.searchsorted(first, np.maximum(t_idx, 0), side="right").astype(np.int64) - 1
        t_block = np.where((t_idx >= 0) & (first[np.maximum(block_of, 0)] == t_idx)
                           & (cfg.block_func[np.maximum(block_of, 0)] == cfg.block_func),
                           block_of, -1)
        b = model.read_bytes(insns.addr[term], 2)
        n = insns.length[term]
        is_jmp = flow == x86.JMP
        plain_jmp = ((n == 2) & (b[:, 0] == 0xEB)) | ((n == 5) & (b[:, 0] == 0xE9))
        short_jcc = (n == 2) & (b[:, 0] >= 0x70) & (b[:, 0] <= 0x7F)
        near_jcc = (n == 6) & (b[:, 0] == 0x0F) & (b[:, 1] >= 0x80) & (b[:, 1] <= 0x8F)
        plain = np.where(is_jmp, plain_jmp, short_jcc | near_jcc)
        cc = np.where(short_jcc, b[:, 0] & 0xF, b[:, 1] & 0xF)
        site = is_site[term]
        external_short = direct & (t_block < 0) & (n == 2) & plain & ~site
        rebranch = direct & plain & ~site & ~in_unit[term] & ((t_block >= 0) | external_short)
        kind = np.full(nb, END_COPY, np.int8)
        kind[rebranch & is_jmp] = END_JMP
        kind[rebranch & ~is_jmp] = END_JCC
        static_key = cfg.static_key_insn[term]
        kind[static_key] = END_SITE
        # An alternative whose original site is exactly one direct jump within the
        # function (static_cpu_has, ALTERNATIVE "jmp .L", ...): when the kernel does
        # not patch it, it jumps; if its target is laid out right behind it, the
        # jump can become a nop of the same size.
        unit_start, unit_end = model.patch_units
        exact_unit_jmp = np.zeros(nb, bool)
        if len(unit_start):
            ta = insns.addr[term]
            u = np.searchsorted(unit_start, ta, side="right").astype(np.int64) - 1
            ok = (u >= 0) & is_jmp & direct & (t_block >= 0)
            ok[ok] &= (unit_start[u[ok]] == ta[ok]) & (unit_end[u[ok]] == ta[ok] + n[ok])
            exact_unit_jmp = ok & (kind == END_COPY)
            for b in np.flatnonzero(exact_unit_jmp).tolist():
                if not _replacements_never_fall_through(model, int(insns.addr[term[b]])):
                    exact_unit_jmp[b] = False
        kind[exact_unit_jmp] = END_UNIT_JMP
        # Where each static-key site jumps (its __jump_table target).
        site_target = np.zeros(nb, np.uint64)
        jump_table = model.tables.get("__jump_table")
        if jump_table is not None and static_key.any():
            codes = jump_table.targets("code")
            targets = jump_table.targets("target")
            order = np.argsort(codes)
            codes, targets = codes[order], targets[order]
            sites = insns.addr[term[static_key]]
            k = np.minimum(np.searchsorted(codes, sites), len(codes) - 1)
            site_target[static_key] = np.where(codes[k] == sites, targets[k], 0)
        self.site_target = [int(t) for t in site_target.tolist()]
        self.kind = kind.tolist()
        self.first = first.tolist()
        self.end = end.tolist()
        self.term = term.tolist()
        self.fall = fall.tolist()
        self.taken = taken.tolist()
        self.t_block = t_block.tolist()
        self.target = [int(t) for t in target.tolist()]
        self.cc = cc.astype(np.int64).tolist()
        self.site_jmp = is_jmp.tolist()
        start = insns.addr[first]
        self.whole = (ends[end - 1] - start).astype(np.int64).tolist()
        self.body = (insns.addr[term] - start).astype(np.int64).tolist()
        self.tail = (ends[end - 1] - ends[term]).astype(np.int64).tolist()
        self.term_addr = [int(a) for a in insns.addr[term].tolist()]


def plan_function(ctx: EmitContext, row: int, order: list[int], slot_end: int,
                  allocator=None) -> FunctionPlan:
    """Emit function ``row`` with its blocks in ``order``.

    Blocks that do not fit the slot (in layout order) go to one fragment placed
    by ``allocator`` in free room elsewhere in .text (no allocator: the
    function is left alone instead)."""
    model, cfg = ctx.model, ctx.cfg
    insns = model.insns
    functions = model.functions
    start = int(functions.start[row])
    end = int(functions.end[row])
    blocks = list(cfg.blocks_of(row))
    first_insn = int(cfg.block_first[blocks[0]])
    last_insn = int(cfg.block_end[blocks[-1]])
    ref = insns.ref
    addr_of = insns.addr
    length = insns.length

    # Blocks nobody reaches that are only alignment fill are dropped.
    lo_b, hi_b = blocks[0], blocks[-1]
    e_lo, e_hi = np.searchsorted(cfg.edge_src, [lo_b, hi_b + 1])
    preds = set(cfg.edge_dst[e_lo:e_hi].tolist())
    firsts = cfg.block_first[lo_b:hi_b + 1]
    entry_mask = cfg.entry_insn[firsts] | cfg.external_entry_insn[firsts]
    entries = {blocks[0]} | {lo_b + k for k in np.flatnonzero(entry_mask).tolist()}
    dropped = 0
    layout = []
    bt = ctx.blocks
    for b in order:
        if b not in preds and b not in entries:
            i0, i1 = bt.first[b], bt.end[b]
            if ctx.fill[i0:i1].all():
                dropped += bt.whole[b]
                continue
        layout.append(b)

    def build_items(part: list[int], items: list, block_item: dict,
                    elided: list) -> tuple[int, int]:
        """Items for blocks ``part`` laid out contiguously; returns (inserted jumps,
        dropped bytes). Jumps that fall away are listed in ``elided`` as (jump, block
        it went to)."""
        inserted = dropped_here = 0
        for k, b in enumerate(part):
            nxt = part[k + 1] if k + 1 < len(part) else None
            block_item[b] = len(items)
            i0, i1, term = bt.first[b], bt.end[b], bt.term[b]
            fall = bt.fall[b]
            kind = bt.kind[b]
            if kind == END_UNIT_JMP and bt.t_block[b] == nxt and term + 1 == i1:
                # The alternative's jump lands right behind it: a nop of its size.
                if i0 < term:
                    items.append(Item(COPY, i0, term, nbytes=bt.body[b]))
                items.append(Item(NOP, origin=term, state=term, nbytes=bt.whole[b] - bt.body[b]))
                fall = -1  # (what followed the site is no longer what follows it)
            elif kind in (END_COPY, END_UNIT_JMP):
                items.append(Item(COPY, i0, i1, nbytes=bt.whole[b]))
            else:
                if i0 < term:
                    items.append(Item(COPY, i0, term, nbytes=bt.body[b]))
                if kind == END_SITE:
                    if bt.taken[b] >= 0:
                        items.append(Item(SITE, target=bt.taken[b], origin=term, state=term,
                                          site_jmp=bt.site_jmp[b]))
                    elif bt.site_target[b] and not ctx.moved_interior(
                            np.array([bt.site_target[b]], np.uint64))[0]:
                        # The jump side leaves the function (to code that stays put).
                        items.append(Item(SITE, tkind=TO_ADDR, target=bt.site_target[b],
                                          origin=term, state=term, site_jmp=bt.site_jmp[b]))
                    else:
                        raise EmitError("static-key-target", f"site at {bt.term_addr[b]:#x}")
                else:
                    t_block = bt.t_block[b]
                    tkind, tgt = (TO_BLOCK, t_block) if t_block >= 0 else (TO_ADDR, bt.target[b])
                    if kind == END_JMP:
                        if tkind == TO_BLOCK and tgt == nxt:
                            # The jump (and any int3 after it) falls away.
                            dropped_here += bt.whole[b] - bt.body[b]
                            elided.append((term, nxt))
                            continue
                        items.append(Item(JMP, tkind=tkind, target=tgt, origin=term, state=term))
                    else:
                        cc = bt.cc[b]
                        if fall < 0:
                            raise EmitError("jcc-without-fallthrough", f"{bt.term_addr[b]:#x}")
                        if fall == nxt:
                            items.append(Item(JCC, cc=cc, tkind=tkind, target=tgt, origin=term,
                                              state=term))
                            fall = -1
                        elif tkind == TO_BLOCK and tgt == nxt:
                            items.append(Item(JCC, cc=cc ^ 1, tkind=TO_BLOCK, target=fall,
                                              origin=term, state=term))
                            fall = -1
                        else:
                            items.append(Item(JCC, cc=cc, tkind=tkind, target=tgt, origin=term,
                                              state=term))
                    if term + 1 < i1:
                        items.append(Item(COPY, term + 1, i1, nbytes=bt.tail[b]))
                    if kind == END_JMP:
                        continue
            if fall >= 0 and fall != nxt:
                items.append(Item(JMP, tkind=TO_BLOCK, target=fall, state=bt.first[fall]))
                inserted += 1
        return inserted, dropped_here

    def arrange(parts: list[list[int]], bases: list[int]):
        """Items for ``parts`` placed at ``bases`` with relaxed branch sizes."""
        items: list[Item] = []
        block_item: dict[int, int] = {}
        part_of_item: list[int] = []
        inserted = dropped_jumps = 0
        elided: list = []
        ranges = []
        for p, part in enumerate(parts):
            before = len(items)
            ins, drop = build_items(part, items, block_item, elided)
            inserted += ins
            dropped_jumps += drop
            part_of_item += [p] * (len(items) - before)
            ranges.append((before, len(items)))
        item_addr = [0] * len(items)

        def destination(it) -> int:
            # A block emitted as nothing (a jump to the next block) starts where
            # the next block's items start; build_items guarantees that is an item.
            return item_addr[block_item[it.target]] if it.tkind == TO_BLOCK else it.target

        # Relaxation: every branch starts short and grows until it reaches. Sizes
        # only grow, so this ends; each round re-places the items (prefix sums)
        # and checks the branches still short.
        sizes = [it.nbytes for it in items]
        # Short branches as (item, item it goes to or -1, address when -1).
        short = [(n, block_item[it.target] if it.tkind == TO_BLOCK else -1, it.target)
                 for n, it in enumerate(items) if it.kind != COPY and it.kind != NOP]
        ends = list(bases[:len(parts)])
        while True:
            for p, (lo, hi) in enumerate(ranges):
                placed = list(accumulate(sizes[lo:hi], initial=bases[p]))
                item_addr[lo:hi] = placed[:-1]
                ends[p] = placed[-1]
            still = []
            for branch in short:
                n, to, addr = branch
                disp = (item_addr[to] if to >= 0 else addr) - item_addr[n] - sizes[n]
                if disp < -128 or disp > 127:
                    items[n].grow()
                    sizes[n] = items[n].nbytes
                else:
                    still.append(branch)
            if len(still) == len(short):
                break
            short = still
        return (items, block_item, part_of_item, item_addr, ends, destination,
                inserted, dropped_jumps, elided)

    slot = slot_end - start
    parts = [layout]
    arranged = arrange(parts, [start])
    if arranged[4][0] - start > slot:
        if allocator is None:
            raise EmitError("does-not-fit", f"{arranged[4][0] - start} bytes for a {slot}-byte slot")
        # The longest prefix of the layout that surely fits stays (sizes with every
        # branch near, plus a jump to the fragment); the rest goes to a fragment.
        items0, block_item0 = arranged[0], arranged[1]
        long_size = [LONG_SIZE.get(it.kind, it.nbytes) for it in items0]
        cum = np.concatenate([[0], np.cumsum(long_size)])
        block_end_size = []
        for k, b in enumerate(layout):
            nxt_item = block_item0[layout[k + 1]] if k + 1 < len(layout) else len(items0)
            block_end_size.append(int(cum[nxt_item]) + enc.JMP32)
        far = start + (1 << 30)
        best = None
        keep = int(np.searchsorted(np.array(block_end_size), slot, side="right"))
        while keep >= 1 and best is None:
            if keep >= len(layout):
                keep = len(layout) - 1
                continue
            trial = arrange([layout[:keep], layout[keep:]], [start, far])
            if trial[4][0] - start <= slot:
                best = (keep, trial)
            else:
                keep -= 1
        if best is None:
            raise EmitError("does-not-fit", "not even its entry block fits the slot")
        keep, trial = best
        reserved = trial[4][1] - far
        frag_base = allocator.reserve(reserved)
        if frag_base is None:
            raise EmitError("no-room-for-cold-code", f"{reserved} bytes")
        parts = [layout[:keep], layout[keep:]]
        # The trial placed the fragment far away, so every branch into, out of or
        # inside it that leaves it is already long: moving it to frag_base keeps
        # every size, and the slot and the reservation fit exactly as measured.
        arranged = trial
        item_addr, ends = trial[3], trial[4]
        shift = frag_base - far
        for n, p in enumerate(trial[2]):
            if p == 1:
                item_addr[n] += shift
        ends[1] += shift
    (items, block_item, part_of_item, item_addr, part_end, destination,
     inserted, dropped_jumps, elided) = arranged
    dropped += dropped_jumps
    bases = [start] + ([frag_base] if len(parts) > 1 else [])

    fragment = None
    if len(parts) > 1:
        used = part_end[1] - frag_base
        allocator.shrink(frag_base, reserved, used)
        fragment = (frag_base, used)

    # --- new addresses ---------------------------------------------------------
    new_addr = np.zeros(last_insn - first_insn, np.uint64)
    branch_states = []
    copy_i0, copy_i1, copy_at, copy_len = [], [], [], []
    for n, it in enumerate(items):
        if it.kind == COPY:
            copy_i0.append(it.i0)
            copy_i1.append(it.i1)
            copy_at.append(item_addr[n])
            copy_len.append(it.nbytes)
        else:
            branch_states.append((item_addr[n], it.state))
    # Copied runs move as a whole: every instruction of a run by the run's shift.
    i0 = np.array(copy_i0, np.int64)
    counts = np.array(copy_i1, np.int64) - i0
    old_base = addr_of[i0]
    idx = np.repeat(i0 - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    new_addr[idx - first_insn] = addr_of[idx] + np.repeat(
        np.array(copy_at, np.uint64) - old_base, counts)
    copied = np.zeros(last_insn - first_insn, bool)
    copied[idx - first_insn] = True
    runs = list(zip(copy_at, old_base.tolist(), copy_len))
    for n, it in enumerate(items):
        if it.kind != COPY and it.origin >= 0:
            new_addr[it.origin - first_insn] = item_addr[n]
    # A jump that fell away is where its target now starts: code that lands on it
    # (an exception fixup such as "jmp back to the loop") lands on what it ran next.
    for term, nxt in elided:
        new_addr[term - first_insn] = item_addr[block_item[nxt]]

    # --- bytes -----------------------------------------------------------------
    out = [bytearray(part_end[p] - bases[p]) for p in range(len(parts))]
    for n, it in enumerate(items):
        p = part_of_item[n]
        buf = out[p]
        here = item_addr[n]
        at = here - bases[p]
        if it.kind == COPY:
            base = int(addr_of[it.i0]) - ctx.code_base
            buf[at:at + it.nbytes] = ctx.code[base:base + it.nbytes]
            continue
        size = it.nbytes
        dest = destination(it) if it.kind != NOP else 0
        if it.kind == JMP:
            buf[at:at + size] = enc.jmp(size, dest - (here + size))
        elif it.kind == JCC:
            buf[at:at + size] = enc.jcc(it.cc, size, dest - (here + size))
        elif it.kind == NOP:
            buf[at:at + size] = enc.nop(size)
        elif it.site_jmp:
            buf[at:at + size] = enc.jmp(size, dest - (here + size))
        else:
            buf[at:at + size] = enc.nop(size)

    # PC-relative fields of copied instructions, all at once: the target moves
    # with this function, lies in another moved function (resolved later), or stays.
    fields = np.flatnonzero(insns.field_size[first_insn:last_insn] > 0)
    fields = fields[copied[fields]] if len(fields) else fields
    deferred = []
    if len(fields):
        idx = fields + first_insn
        new_i = new_addr[fields]
        next_ip = new_i + length[idx]
        target = ref[idx]
        new_target = target.copy()
        local = (target >= np.uint64(start)) & (target < np.uint64(end))
        if local.any():
            t = target[local]
            j = np.searchsorted(addr_of[first_insn:last_insn], t, side="right").astype(np.int64) - 1
            mapped = new_addr[np.maximum(j, 0)]
            bad = (j < 0) | (mapped == 0)
            if bad.any():
                k = int(np.flatnonzero(local)[np.flatnonzero(bad)[0]])
                raise EmitError("reference-to-dropped-code",
                                f"{int(addr_of[idx[k]]):#x} -> {int(target[k]):#x}")
            new_target[local] = mapped + (t - addr_of[first_insn + j])
        fo = insns.field_off[idx]
        fs = insns.field_size[idx]
        disp = (new_target - next_ip).view(np.int64)
        elsewhere = np.flatnonzero(~local)
        if len(elsewhere):
            later = elsewhere[ctx.moved_interior(target[elsewhere])]
            deferred = list(zip((new_i[later] + fo[later].astype(np.uint64)).tolist(),
                                fs[later].tolist(), next_ip[later].tolist(),
                                target[later].tolist()))
        limit = np.where(fs == 1, 1 << 7, 1 << 31).astype(np.int64)
        out_of_range = (disp < -limit) | (disp >= limit)
        if out_of_range.any():
            k = int(np.flatnonzero(out_of_range)[0])
            raise EmitError("branch-out-of-range", f"{int(fs[k])}-byte field at "
                            f"{int(addr_of[idx[k]]):#x} cannot reach {int(new_target[k]):#x}")
        field_addr = new_i + fo.astype(np.uint64)
        for p in range(len(parts)):
            in_part = (field_addr >= np.uint64(bases[p])) & (field_addr < np.uint64(part_end[p]))
            if not in_part.any():
                continue
            view = np.frombuffer(out[p], np.uint8)
            pos = (field_addr[in_part] - np.uint64(bases[p])).astype(np.int64)
            d = disp[in_part]
            size = fs[in_part]
            for width in (1, 2, 4):
                sel = size == width
                if sel.any():
                    put_fields(view, pos[sel], width, d[sel])

    return FunctionPlan(row=row, start=start, code=bytes(out[0]), new_addr=new_addr,
                        first_insn=first_insn, branch_states=branch_states, runs=runs,
                        deferred=deferred, dropped_bytes=dropped, inserted_jumps=inserted,
                        fragment=(fragment[0], bytes(out[1])) if fragment else None)
