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

import numpy as np

from kbuild_bolt.binary.cfg import FALLTHROUGH, STATIC_KEY, TAKEN
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86 import encode as enc

# Item kinds
COPY, JMP, JCC, SITE = 0, 1, 2, 3
# Target kinds for branch items
TO_BLOCK, TO_ADDR = 0, 1


class Item:
    """One piece of the new function: copied instructions or an emitted branch."""

    __slots__ = ("kind", "i0", "i1", "cc", "tkind", "target", "long", "origin", "state",
                 "site_jmp")

    def __init__(self, kind, i0=0, i1=0, cc=0, tkind=TO_BLOCK, target=0, origin=-1, state=-1,
                 site_jmp=False):
        self.kind = kind
        self.i0, self.i1 = i0, i1          # COPY: instructions [i0, i1)
        self.cc = cc                       # JCC: condition code
        self.tkind, self.target = tkind, target
        self.long = False                  # rel32 (jmp/jcc) or 5-byte site
        self.origin = origin               # old instruction this branch re-encodes (-1: new)
        self.state = state                 # old instruction whose ORC state applies
        self.site_jmp = site_jmp           # SITE: jmp (True) or nop (False)

    def size(self, copy_size: int = 0) -> int:
        if self.kind == COPY:
            return copy_size
        if self.kind == JMP:
            return enc.JMP32 if self.long else enc.JMP8
        if self.kind == JCC:
            return enc.JCC32 if self.long else enc.JCC8
        return 5 if self.long else 2


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
    moved_interior: object      # callable(addrs) -> bool mask: inside another moved function


def block_successors(cfg, b: int) -> tuple[int | None, int | None]:
    """(fall-through block, taken block) of block ``b`` (None when absent)."""
    fall = taken = None
    for dst, kind in cfg.successors(b):
        if kind == FALLTHROUGH:
            fall = dst
        elif kind in (TAKEN, STATIC_KEY):
            taken = dst
    return fall, taken


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
    flow, ref, ref_kind = insns.flow, insns.ref, insns.ref_kind
    addr_of = insns.addr
    length = insns.length

    # Blocks nobody reaches that are only alignment fill are dropped.
    lo_b, hi_b = blocks[0], blocks[-1]
    src_in = (cfg.edge_src >= lo_b) & (cfg.edge_src <= hi_b)
    preds = set(cfg.edge_dst[src_in].tolist())
    entries = {blocks[0]}
    for b in blocks:
        i = int(cfg.block_first[b])
        if cfg.entry_insn[i] or cfg.external_entry_insn[i]:
            entries.add(b)
    dropped = 0
    layout = []
    for b in order:
        i0, i1 = int(cfg.block_first[b]), int(cfg.block_end[b])
        if b not in preds and b not in entries and ctx.fill[i0:i1].all():
            dropped += int(addr_of[i1 - 1] + length[i1 - 1] - addr_of[i0])
            continue
        layout.append(b)

    def internal_block(target: int) -> int | None:
        if not (start <= target < end):
            return None
        i = int(np.searchsorted(addr_of[first_insn:last_insn], np.uint64(target))) + first_insn
        if i >= last_insn or int(addr_of[i]) != target:
            return None
        b = int(np.searchsorted(cfg.block_first, i, side="right")) - 1
        return b if int(cfg.block_first[b]) == i else None

    def build_items(part: list[int], items: list, block_item: dict) -> tuple[int, int]:
        """Items for blocks ``part`` laid out contiguously; returns (inserted jumps,
        dropped bytes)."""
        inserted = dropped_here = 0
        for k, b in enumerate(part):
            nxt = part[k + 1] if k + 1 < len(part) else None
            block_item[b] = len(items)
            i0, i1 = int(cfg.block_first[b]), int(cfg.block_end[b])
            term = int(cfg.block_term[b])
            fall, taken = block_successors(cfg, b)
            f = int(flow[term])
            at = int(addr_of[term]) - ctx.code_base
            code = ctx.code[at:at + int(length[term])]
            direct = f in (x86.JMP, x86.JCC) and ref_kind[term] == x86.REF_BRANCH
            target = int(ref[term]) if direct else 0
            t_block = internal_block(target) if direct else None
            plain = enc.is_plain_jmp(code) if f == x86.JMP else enc.condition_code(code) is not None
            external_short = (direct and t_block is None and length[term] == 2 and plain
                              and not ctx.is_site[term])
            rebranch = (direct and plain and not ctx.is_site[term] and not ctx.in_unit[term]
                        and (t_block is not None or external_short))

            def fallthrough_jump():
                nonlocal inserted
                if fall is not None and fall != nxt:
                    items.append(Item(JMP, tkind=TO_BLOCK, target=fall,
                                      state=int(cfg.block_first[fall])))
                    inserted += 1

            if cfg.static_key_insn[term]:
                if i0 < term:
                    items.append(Item(COPY, i0, term))
                if taken is None:
                    raise EmitError("static-key-target", f"site at {int(addr_of[term]):#x}")
                items.append(Item(SITE, target=taken, origin=term, state=term,
                                  site_jmp=f == x86.JMP))
                fallthrough_jump()
                continue
            if rebranch:
                if i0 < term:
                    items.append(Item(COPY, i0, term))
                tkind, tgt = (TO_BLOCK, t_block) if t_block is not None else (TO_ADDR, target)
                if f == x86.JMP:
                    if tkind == TO_BLOCK and tgt == nxt:
                        dropped_here += int(addr_of[i1 - 1] + length[i1 - 1] - addr_of[term])
                        continue  # the jump (and any int3 after it) falls away
                    items.append(Item(JMP, tkind=tkind, target=tgt, origin=term, state=term))
                else:
                    cc = enc.condition_code(code)
                    if fall is None:
                        raise EmitError("jcc-without-fallthrough", f"{int(addr_of[term]):#x}")
                    if fall == nxt:
                        items.append(Item(JCC, cc=cc, tkind=tkind, target=tgt, origin=term,
                                          state=term))
                    elif tkind == TO_BLOCK and tgt == nxt:
                        items.append(Item(JCC, cc=cc ^ 1, tkind=TO_BLOCK, target=fall,
                                          origin=term, state=term))
                    else:
                        items.append(Item(JCC, cc=cc, tkind=tkind, target=tgt, origin=term,
                                          state=term))
                        fallthrough_jump()
                if term + 1 < i1:
                    items.append(Item(COPY, term + 1, i1))
                continue
            items.append(Item(COPY, i0, i1))
            fallthrough_jump()
        return inserted, dropped_here

    def copy_bytes(it) -> int:
        return int(addr_of[it.i1 - 1] + length[it.i1 - 1] - addr_of[it.i0])

    def arrange(parts: list[list[int]], bases: list[int]):
        """Items for ``parts`` placed at ``bases`` with relaxed branch sizes."""
        items: list[Item] = []
        block_item: dict[int, int] = {}
        part_of_item: list[int] = []
        inserted = dropped_jumps = 0
        for p, part in enumerate(parts):
            before = len(items)
            ins, drop = build_items(part, items, block_item)
            inserted += ins
            dropped_jumps += drop
            part_of_item += [p] * (len(items) - before)
        copy_size = {n: copy_bytes(it) for n, it in enumerate(items) if it.kind == COPY}
        item_addr = [0] * len(items)

        def destination(it) -> int:
            # A block emitted as nothing (a jump to the next block) starts where
            # the next block's items start; build_items guarantees that is an item.
            return item_addr[block_item[it.target]] if it.tkind == TO_BLOCK else it.target

        # Relaxation: every branch starts short and grows until it reaches.
        for _round in range(64):
            sizes = [it.size(copy_size.get(n, 0)) for n, it in enumerate(items)]
            ends = list(bases[:len(parts)])
            for n, size in enumerate(sizes):
                item_addr[n] = ends[part_of_item[n]]
                ends[part_of_item[n]] += size
            grew = False
            for n, it in enumerate(items):
                if it.kind == COPY or it.long:
                    continue
                if not enc.fits8(destination(it) - (item_addr[n] + sizes[n])):
                    it.long = True
                    grew = True
            if not grew:
                break
        return (items, block_item, part_of_item, copy_size, item_addr, ends, destination,
                inserted, dropped_jumps)

    slot = slot_end - start
    parts = [layout]
    arranged = arrange(parts, [start])
    if arranged[5][0] - start > slot:
        if allocator is None:
            raise EmitError("does-not-fit", f"{arranged[5][0] - start} bytes for a {slot}-byte slot")
        # The longest prefix of the layout that fits stays; the rest goes to a
        # fragment in free room (placed far away while choosing: cross jumps near).
        far = start + (1 << 30)
        lo, hi = 1, len(layout) - 1
        best = None
        while lo <= hi:
            keep = (lo + hi) // 2
            trial = arrange([layout[:keep], layout[keep:]], [start, far])
            if trial[5][0] - start <= slot:
                best, lo = (keep, trial), keep + 1
            else:
                hi = keep - 1
        if best is None:
            raise EmitError("does-not-fit", "not even its entry block fits the slot")
        keep, trial = best
        reserved = trial[5][1] - far
        frag_base = allocator.reserve(reserved)
        if frag_base is None:
            raise EmitError("no-room-for-cold-code", f"{reserved} bytes")
        parts = [layout[:keep], layout[keep:]]
        arranged = arrange(parts, [start, frag_base])
        if arranged[5][0] - start > slot or arranged[5][1] - frag_base > reserved:
            raise EmitError("does-not-fit", "fragment placement grew the code")
    (items, block_item, part_of_item, copy_size, item_addr, part_end, destination,
     inserted, dropped_jumps) = arranged
    dropped += dropped_jumps
    bases = [start] + ([frag_base] if len(parts) > 1 else [])

    fragment = None
    if len(parts) > 1:
        used = part_end[1] - frag_base
        allocator.shrink(frag_base, reserved, used)
        fragment = (frag_base, used)

    # --- new addresses ---------------------------------------------------------
    new_addr = np.zeros(last_insn - first_insn, np.uint64)
    runs = []
    branch_states = []
    for n, it in enumerate(items):
        at = item_addr[n]
        if it.kind == COPY:
            base = int(addr_of[it.i0])
            new_addr[it.i0 - first_insn:it.i1 - first_insn] = (
                addr_of[it.i0:it.i1] - np.uint64(base) + np.uint64(at))
            runs.append((at, base, copy_size[n]))
        else:
            if it.origin >= 0:
                new_addr[it.origin - first_insn] = at
            branch_states.append((at, it.state))

    # --- bytes -----------------------------------------------------------------
    out = [bytearray(part_end[p] - bases[p]) for p in range(len(parts))]
    deferred = []

    def translate(target: int) -> int | None:
        """New address of an old address inside this function (None: not mapped)."""
        i = int(np.searchsorted(addr_of[first_insn:last_insn], np.uint64(target), side="right")) - 1
        if i < 0 or new_addr[i] == 0:
            return None
        return int(new_addr[i]) + (target - int(addr_of[first_insn + i]))

    for n, it in enumerate(items):
        p = part_of_item[n]
        buf = out[p]
        here = item_addr[n]
        at = here - bases[p]
        if it.kind == COPY:
            base = int(addr_of[it.i0])
            size = copy_size[n]
            buf[at:at + size] = ctx.code[base - ctx.code_base:base - ctx.code_base + size]
            for i in (np.flatnonzero(insns.field_size[it.i0:it.i1] > 0) + it.i0).tolist():
                fo, fs = int(insns.field_off[i]), int(insns.field_size[i])
                old_i = int(addr_of[i])
                new_i = old_i - base + here
                next_ip = new_i + int(length[i])
                target = int(ref[i])
                if start <= target < end:
                    new_target = translate(target)
                    if new_target is None:
                        raise EmitError("reference-to-dropped-code", f"{old_i:#x} -> {target:#x}")
                elif ctx.moved_interior(target):
                    deferred.append((new_i + fo, fs, next_ip, target))
                    new_target = target  # placeholder, resolved once all functions are placed
                else:
                    new_target = target
                if not enc.put_disp(buf, new_i - bases[p] + fo, fs, enc.rel(new_target, next_ip)):
                    raise EmitError("branch-out-of-range",
                                    f"{fs}-byte field at {old_i:#x} cannot reach {new_target:#x}")
            continue
        size = it.size()
        dest = destination(it)
        if it.kind == JMP:
            buf[at:at + size] = enc.jmp(size, dest - (here + size))
        elif it.kind == JCC:
            buf[at:at + size] = enc.jcc(it.cc, size, dest - (here + size))
        elif it.site_jmp:
            buf[at:at + size] = enc.jmp(size, dest - (here + size))
        else:
            buf[at:at + size] = enc.nop(size)

    return FunctionPlan(row=row, start=start, code=bytes(out[0]), new_addr=new_addr,
                        first_insn=first_insn, branch_states=branch_states, runs=runs,
                        deferred=deferred, dropped_bytes=dropped, inserted_jumps=inserted,
                        fragment=(fragment[0], bytes(out[1])) if fragment else None)
