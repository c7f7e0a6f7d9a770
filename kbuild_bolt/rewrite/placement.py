"""Where whole functions go when they move (``--reorder-functions``, ``--split-functions``).

Three questions, answered from the model and the kernel's text layout:

- which functions may move: simple ones inside movable regions, not in code
  the kernel copies by address range, and not reached by code that stays in a
  way that cannot follow them (a rel8 jump, or falling into them) -- a closure,
  since a function that stays may pin the next one;
- how each must be aligned: as the linker placed it (its call padding
  included), judged from the fill in front of it;
- where each part goes: region by region, in the given order, first fit into
  the room the moved code leaves (everything that stays is an obstacle); cold
  parts of plain text may also go to the plain gaps between regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import in_sorted
from kbuild_bolt.binary.functions import PREFIX_SYMBOLS
from kbuild_bolt.kernel.text import PLAIN, TextLayout
from kbuild_bolt.rewrite.emit import NoRoom, table_sites
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86.patterns import is_fill

# Function alignment the kernels use at least (FUNCTION_ALIGNMENT, -falign-functions).
BASE_ALIGN = 16
MAX_ALIGN = 4096

PIN_REASONS = ("pinned region", "copied by address", "reached by a short jump that stays",
               "fallen into", "spans regions")


@dataclass
class MovePlan:
    rows: np.ndarray            # functions that move (ascending)
    region: np.ndarray          # region index of each
    extent: np.ndarray          # uint64 old extent start (call padding included)
    prefix: dict                # row -> (first insn, end insn) of its call padding
    align: np.ndarray           # alignment of each one's first part
    pinned: dict                # reason -> rows that stay although they are simple
    fill: np.ndarray            # bool per instruction: int3/nop fill outside functions
    all_prefixes: list          # (first insn, end insn) of every function's call padding


def prefixes(model) -> dict[int, tuple[int, int]]:
    """Call padding (``__pfx_``/``__cfi_``) right in front of a function: row ->
    (first instruction, end instruction)."""
    functions = model.functions
    out = {}
    for region in model.regions:
        if region.kind != "prefix" or not region.label.startswith(PREFIX_SYMBOLS):
            continue
        row = functions.find(region.end)
        if row < 0 or int(functions.start[row]) != region.end:
            continue
        lo, hi = np.searchsorted(model.insns.addr, [region.start, region.end])
        if hi > lo:
            out[row] = (int(lo), int(hi))
    return out


class MoveAnalysis:
    """What decides which functions can move, computed once: their extents and
    regions, the fill around them, the rel8 references and fall-throughs of code
    that might stay. :meth:`plan` then runs the closure for a set of candidates."""

    def __init__(self, model, cfg, layout: TextLayout):
        self.model = model
        self.layout = layout
        functions = model.functions
        insns = model.insns
        nf = len(functions)
        self.nf = nf
        self.prefix = prefixes(model)
        extent = functions.start.astype(np.uint64).copy()
        for row, (lo, _hi) in self.prefix.items():
            extent[row] = insns.addr[lo]
        self.extent = extent
        self.region = layout.region_index(extent)
        last_region = layout.region_index(
            np.maximum(functions.end.astype(np.uint64), np.uint64(1)) - np.uint64(1))
        movable_region = np.array([r.movable for r in layout.regions] + [False])
        self.static_pins = {
            "pinned region": ~movable_region[self.region],
            "spans regions": self.region != last_region,
        }
        copied = np.zeros(nf, bool)
        for lo, hi, _why in layout.pinned:
            r = functions.rows_containing(np.array([lo], np.uint64))
            first = int(np.searchsorted(functions.end, np.uint64(lo), side="right"))
            last = int(np.searchsorted(functions.start, np.uint64(hi), side="left"))
            copied[first:last] = True
            copied[r[r >= 0]] = True
        self.static_pins["copied by address"] = copied
        from kbuild_bolt.binary.cfg import REASON_CODE

        self.fill = free_fill(model, cfg.func_reason == REASON_CODE["falls-off-end"])
        f_of = model.function_of_insn
        # rel8 references between functions (or from code of no function).
        rel8 = np.flatnonzero((insns.field_size == 1) & (insns.ref_kind != 0))
        tgt = functions.rows_containing(insns.ref[rel8])
        cross = (tgt >= 0) & (tgt != f_of[rel8])
        rel8, tgt = rel8[cross], tgt[cross]
        self.rel8_src = f_of[rel8]
        self.rel8_tgt = tgt
        # (emission re-encodes a plain jump or jcc; anything else, or a jump that
        # starts or sits inside a patch unit, keeps its size: then both stay)
        self.rel8_fixed = ~np.isin(insns.flow[rel8], (x86.JMP, x86.JCC)) \
            | model.insn_inside_patch_unit[rel8] | in_sorted(model.patch_units[0], insns.addr[rel8])
        # The instruction just in front of each extent, when code falls from it into it.
        before = np.searchsorted(insns.addr, extent).astype(np.int64) - 1
        ok = before >= 0
        prev = np.maximum(before, 0)
        stops = np.isin(insns.flow, (x86.JMP, x86.IND_JMP, x86.RET, x86.CALL, x86.IND_CALL,
                                     x86.EXCEPTION, x86.INTERRUPT))
        falls = ok & (insns.end[prev] == extent) & ~stops[prev] & ~self.fill[prev]
        self.fall_src = np.where(falls, f_of[prev], -2)     # -2: nothing falls in
        self.align_all = None

    def plan(self, candidates: np.ndarray) -> MovePlan:
        """Which of ``candidates`` (simple functions) move: the closure."""
        nf = self.nf
        moves = np.zeros(nf, bool)
        moves[candidates] = True
        pinned: dict[str, list[int]] = {}

        def pin(mask, reason):
            rows = np.flatnonzero(moves & mask)
            if len(rows):
                pinned.setdefault(reason, []).extend(rows.tolist())
                moves[rows] = False
            return len(rows)

        for reason, mask in self.static_pins.items():
            pin(mask, reason)
        while True:
            stays = np.ones(nf + 1, bool)
            stays[:nf] = ~moves                            # (row -1: code of no function)
            src_stays = stays[self.rel8_src]
            reached = np.zeros(nf, bool)
            reached[self.rel8_tgt[src_stays]] = True
            n = pin(reached, PIN_REASONS[2])
            fixed = np.zeros(nf, bool)
            fixed[self.rel8_src[~src_stays & self.rel8_fixed]] = True
            n += pin(fixed, PIN_REASONS[2])
            falls = (self.fall_src != -2) & stays[np.maximum(self.fall_src, -1)]
            n += pin(falls, PIN_REASONS[3])
            if not n:
                break
        rows = np.flatnonzero(moves)
        if self.align_all is None:
            self.align_all = alignment(self.model, self.extent, np.arange(nf), self.fill)
        return MovePlan(rows=rows, region=self.region[rows], extent=self.extent[rows],
                        prefix={r: self.prefix[r] for r in rows.tolist() if r in self.prefix},
                        align=self.align_all[rows], pinned=pinned, fill=self.fill,
                        all_prefixes=list(self.prefix.values()))


def free_fill(model, falls_off: np.ndarray) -> np.ndarray:
    """True at every int3/nop instruction outside functions that no code runs into:
    alignment fill, free to reuse. A nop that code falls into (a static-key nop in
    code without a symbol), that a table names, or that pads an alternative's
    original code is code, not fill. A function ends where it ends (its last
    instruction may be a call that does not return) unless ``falls_off`` says it
    runs on."""
    insns = model.insns
    n = len(insns)
    f_of = model.function_of_insn
    outside = np.flatnonzero(f_of < 0)
    fill = np.zeros(n, bool)
    fill[outside] = is_fill(model, outside)
    # (a table's site, and the nops that pad an alternative's original code, are code)
    fill &= ~table_sites(model) & ~model.insn_inside_patch_unit
    if not n:
        return fill
    # Runs of fill: a run that code falls into (the instruction before it is
    # contiguous, not fill and not a terminator) is code.
    stops = np.isin(insns.flow, (x86.JMP, x86.IND_JMP, x86.RET, x86.INTERRUPT, x86.EXCEPTION))
    contiguous = np.zeros(n, bool)
    contiguous[1:] = insns.addr[1:] == insns.end[:-1]
    first = fill & ~np.r_[False, fill[:-1] & contiguous[1:]]
    starts = np.flatnonzero(first)
    prev = starts - 1
    ok = prev >= 0
    entered = np.zeros(len(starts), bool)
    p = prev[ok]
    in_function = f_of[p] >= 0
    runs_on = np.where(in_function, falls_off[np.maximum(f_of[p], 0)], ~stops[p])
    entered[ok] = contiguous[starts[ok]] & ~fill[p] & runs_on
    run_id = np.cumsum(first) - 1
    bad_run = np.zeros(len(starts) + 1, bool)
    bad_run[:len(starts)] = entered
    fill &= ~bad_run[np.where(fill, run_id, len(starts))]
    return fill


def alignment(model, extent: np.ndarray, rows: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Alignment each function's extent needs: at least its natural alignment up
    to BASE_ALIGN, more when the fill in front of it shows the linker aligned it
    further (the smallest power of two that explains the gap)."""
    insns = model.insns
    starts = extent[rows]
    # End of the code in front: the last instruction before the extent that is not fill.
    code = np.where(~fill, np.arange(len(insns)), -1)
    last_code = np.maximum.accumulate(code)
    k = np.searchsorted(insns.addr, starts) - 1
    j = last_code[np.maximum(k, 0)]
    prev_end = np.where((k >= 0) & (j >= 0), insns.end[np.maximum(j, 0)], starts)
    prev_end = np.minimum(prev_end, starts)
    natural = starts & (~starts + np.uint64(1))            # lowest set bit
    natural = np.where(starts == 0, np.uint64(MAX_ALIGN), natural)
    align = np.minimum(natural, np.uint64(BASE_ALIGN))
    p = np.uint64(1)
    needed = np.ones(len(rows), np.uint64)
    found = prev_end == starts
    while int(p) <= MAX_ALIGN:
        up = (prev_end + p - np.uint64(1)) & ~(p - np.uint64(1))
        hit = ~found & (up == starts)
        needed[hit] = p
        found |= hit
        p = p * np.uint64(2)
    return np.maximum(align, needed).astype(np.int64)


class Placement:
    """Room in the movable regions once the moved functions are gone, and parts
    placed into it."""

    def __init__(self, model, layout: TextLayout, plan: MovePlan):
        self.layout = layout
        self.plan = plan
        insns = model.insns
        regions = layout.regions
        # Occupied: every instruction of a movable region that does not move and is
        # not fill, every labelled address, and everything of the extents that stay
        # (call padding included).
        moving = np.zeros(len(insns), bool)
        f_of = model.function_of_insn
        mv = np.zeros(len(model.functions) + 1, bool)
        mv[plan.rows] = True
        moving |= mv[f_of]
        for row, (lo, hi) in plan.prefix.items():
            moving[lo:hi] = True
        stays = ~moving & (f_of >= 0)
        outside = np.flatnonzero(~moving & (f_of < 0))
        stays[outside] = ~plan.fill[outside]
        for lo, hi in plan.all_prefixes:
            stays[lo:hi] |= ~moving[lo:hi]
        labels = model.symbol_values
        labelled = np.zeros(len(insns), bool)
        idx = model.insn_index(labels)
        labelled[idx[idx >= 0]] = True
        stays |= labelled & ~moving
        self.free: dict[int, list[list[int]]] = {}
        for k, r in enumerate(regions):
            if not r.movable:
                continue
            lo, hi = np.searchsorted(insns.addr, [r.start, r.end])
            if not moving[lo:hi].any() and r.kind != PLAIN:
                continue
            starts = insns.addr[lo:hi]
            ends = starts + insns.length[lo:hi]
            # Free runs: maximal runs of instructions that do not stay.
            free = ~stays[lo:hi]
            edges = np.diff(np.concatenate([[0], free.astype(np.int8), [0]]))
            a = np.flatnonzero(edges == 1)
            b = np.flatnonzero(edges == -1) - 1
            self.free[k] = [[int(starts[i]), int(ends[j])] for i, j in zip(a, b)]
        self.spill = [k for k, r in enumerate(regions) if r.movable and r.kind == PLAIN]

    def free_ranges(self) -> np.ndarray:
        out = [(lo, hi) for ranges in self.free.values() for lo, hi in ranges]
        return np.array(sorted(out), np.uint64).reshape(-1, 2)

    def room(self) -> dict[int, int]:
        """Free bytes per region."""
        return {k: sum(b - a for a, b in v) for k, v in self.free.items()}

    def place(self, hot: np.ndarray, cold: np.ndarray, rank: np.ndarray,
              cold_align: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Bases of the hot and cold part of every moving function (arrays over all
        function rows: ``hot``/``cold`` sizes, 0 for none). Hot parts go by
        ``rank``, then cold parts by ``rank``, each first fit in its region; a part
        of plain text that finds no room there goes to the plain gaps.
        Raises :class:`NoRoom` with the functions that found no room."""
        plan = self.plan
        n = len(hot)
        hot_base = np.zeros(n, np.uint64)
        cold_base = np.zeros(n, np.uint64)
        room = {k: (np.array([a for a, _ in v], np.uint64), np.array([b for _, b in v], np.uint64))
                for k, v in self.free.items()}
        cursor = {k: v[0].copy() for k, v in room.items()}
        region_of = dict(zip(plan.rows.tolist(), plan.region.tolist()))
        align_of = dict(zip(plan.rows.tolist(), plan.align.tolist()))
        rows = plan.rows
        order = [(0, int(rank[r]), r) for r in rows[hot[rows] > 0].tolist()]
        order += [(1, int(rank[r]), r) for r in rows[cold[rows] > 0].tolist()]
        order.sort()
        failed = []
        for kind, _rank, row in order:
            region = region_of[row]
            align = np.uint64(align_of[row] if kind == 0 else cold_align)
            need = np.uint64(int(hot[row] if kind == 0 else cold[row]))
            choices = [region]
            if self.layout.regions[region].kind == PLAIN:
                choices += [k for k in self.spill if k != region]
            for k in choices:
                if k not in cursor:
                    continue
                at = (cursor[k] + align - np.uint64(1)) & ~(align - np.uint64(1))
                fits = np.flatnonzero(at + need <= room[k][1])
                if len(fits):
                    i = int(fits[0])
                    (hot_base if kind == 0 else cold_base)[row] = at[i]
                    cursor[k][i] = at[i] + need
                    break
            else:
                failed.append(row)
        if failed:
            raise NoRoom(sorted(set(failed)), f"no room for {len(failed)} functions")
        return hot_base, cold_base


def place_functions(model, analysis: MoveAnalysis, candidates: np.ndarray, hot: np.ndarray,
                    cold: np.ndarray, rank: np.ndarray):
    """Place every function of ``candidates`` that can move. Where a region cannot
    hold all of its moved code, the functions that grew most stay where they are
    (and may keep others where they are: the closure runs again), more of them
    each time placement still fails there, and after a few tries the region
    keeps all its functions. Returns (plan, placement, hot bases, cold bases,
    rows that stayed for want of room)."""
    extra: dict[int, int] = {}
    tries: dict[int, int] = {}
    whole: set[int] = set()
    while True:
        stayed = _too_big(model, analysis, candidates, hot, cold, extra, whole)
        plan = analysis.plan(np.setdiff1d(candidates, np.array(stayed, np.int64)))
        placement = Placement(model, analysis.layout, plan)
        try:
            hot_base, cold_base = placement.place(hot, cold, rank)
            return plan, placement, hot_base, cold_base, stayed
        except NoRoom as full:
            region_of = dict(zip(plan.rows.tolist(), plan.region.tolist()))
            for row in full.rows:
                k = region_of[row]
                extra[k] = extra.get(k, 0) + int(hot[row] + cold[row])
            for k in {region_of[row] for row in full.rows}:
                tries[k] = tries.get(k, 0) + 1
                if tries[k] >= 4:
                    whole.add(k)


def _too_big(model, analysis: MoveAnalysis, candidates, hot, cold, extra: dict,
             whole: set) -> list[int]:
    """Functions to leave where they are so that every region can hold the rest:
    where a region's moved code needs more room than it has (grown jumps, added
    jumps, alignment; ``extra`` more bytes for regions where placement failed),
    the functions that grew most stay, until what is left fits with a margin.
    Regions in ``whole`` keep all their functions. (Plain text may also use the
    plain gaps: it needs no such care.)"""
    plan = analysis.plan(candidates)
    placement = Placement(model, analysis.layout, plan)
    room = placement.room()
    regions = analysis.layout.regions
    rows = plan.rows
    align = plan.align.astype(np.int64)
    need = ((hot[rows] + align - 1) // align) * align + cold[rows]
    old = (model.functions.end[rows] - plan.extent).astype(np.int64)
    growth = need - old
    stay = []
    for k in np.unique(plan.region).tolist():
        sel = np.flatnonzero(plan.region == k)
        if k in whole:
            stay += rows[sel].tolist()
            continue
        if regions[k].kind == PLAIN and not extra.get(k):
            continue
        capacity = room.get(k, 0)
        # (every free range can waste up to an alignment at its start)
        margin = capacity // 100 + BASE_ALIGN * len(placement.free.get(k, ())) + extra.get(k, 0)
        excess = int(need[sel].sum()) - (capacity - margin)
        if excess <= 0:
            continue
        for i in sel[np.argsort(-growth[sel], kind="stable")].tolist():
            if excess <= 0:
                break
            stay.append(int(rows[i]))
            excess -= max(int(growth[i]), 1)
    return stay
