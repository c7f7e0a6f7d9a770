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
from functools import cached_property

import numpy as np

from kbuild_bolt.arrays import in_sorted, isin, setdiff1d
from kbuild_bolt.binary.functions import PREFIX
from kbuild_bolt.kernel.text import PLAIN, TextLayout
from kbuild_bolt.rewrite.emit import NoRoom, table_sites
from kbuild_bolt.x86 import decode as x86

# Function alignment the kernels use at least (FUNCTION_ALIGNMENT, -falign-functions).
BASE_ALIGN = 16
MAX_ALIGN = 4096

PIN_REASONS = ("pinned region", "copied by address", "reached by a short jump that stays",
               "fallen into", "spans regions")
# Functions that stay for these reasons need only their entry where it was: their
# blocks may still be laid out anew inside their own bytes, as when no function
# moves. (Code copied or checked by address stays byte for byte; a function across
# two regions has no one place.)
IN_PLACE_REASONS = ("pinned region", "reached by a short jump that stays", "fallen into")


@dataclass
class MovePlan:
    rows: np.ndarray            # functions that move (ascending)
    region: np.ndarray          # region index of each
    extent: np.ndarray          # uint64 old extent start (call padding included)
    prefix: dict                # row -> (first insn, end insn) of its call padding
    align: np.ndarray           # alignment of each one's first part
    pinned: dict                # reason -> rows that stay although they are simple
    in_place: np.ndarray        # rows of ``pinned`` laid out anew inside their own bytes
    fill: np.ndarray            # bool per instruction: int3/nop fill outside functions
    all_prefixes: list          # (first insn, end insn) of every function's call padding


def prefixes(model) -> dict[int, tuple[int, int]]:
    """Call padding (``__pfx_``/``__cfi_``) right in front of a function: row ->
    (first instruction, end instruction)."""
    functions = model.functions
    regions = model.regions
    # (a prefix region is one labelled __pfx_/__cfi_)
    padding = np.flatnonzero(regions.kind == PREFIX)
    start, end = regions.start[padding], regions.end[padding]
    rows = functions.rows_containing(end)
    at_start = rows >= 0
    at_start[at_start] = functions.start[rows[at_start]] == end[at_start]
    lo = np.searchsorted(model.insns.addr, start)
    hi = np.searchsorted(model.insns.addr, end)
    keep = np.flatnonzero(at_start & (hi > lo))
    return dict(zip(rows[keep].tolist(), zip(lo[keep].tolist(), hi[keep].tolist())))


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
        # rel8 references between functions, from code of no function, or to
        # code of no function (-1: it never moves).
        rel8 = np.flatnonzero((insns.field_size == 1) & (insns.ref_kind != 0))
        tgt = functions.rows_containing(insns.ref[rel8])
        cross = tgt != f_of[rel8]
        rel8, tgt = rel8[cross], tgt[cross]
        self.rel8_src = f_of[rel8]
        self.rel8_tgt = tgt
        # Functions a rel8 from elsewhere enters past their entry: their insides
        # are not theirs to lay out anew while that code stays.
        self.entered_inside = np.zeros(nf, bool)
        into = tgt >= 0
        self.entered_inside[tgt[into][insns.ref[rel8][into] != functions.start[tgt[into]]]] = True
        # (emission re-encodes a plain jump or jcc; anything else, or a jump that
        # starts or sits inside a patch unit, keeps its size: then both stay)
        self.rel8_fixed = ~isin(insns.flow[rel8], (x86.JMP, x86.JCC)) \
            | model.insn_inside_patch_unit[rel8] | in_sorted(model.patch_units[0], insns.addr[rel8])
        # The instruction just in front of each extent, when code falls from it into it.
        before = np.searchsorted(insns.addr, extent).astype(np.int64) - 1
        ok = before >= 0
        prev = np.maximum(before, 0)
        stops = isin(insns.flow, (x86.JMP, x86.IND_JMP, x86.RET, x86.CALL, x86.IND_CALL,
                                     x86.EXCEPTION, x86.INTERRUPT))
        falls = ok & (insns.end_of(prev) == extent) & ~stops[prev] & ~self.fill[prev]
        self.fall_src = np.where(falls, f_of[prev], -2)     # -2: nothing falls in
        self.align_all = None

    def plan(self, candidates: np.ndarray, relaid: np.ndarray | None = None) -> MovePlan:
        """Which of ``candidates`` (simple functions) move: the closure. Of those
        that stay, the ones in ``relaid`` (bool per function: a new block order)
        that need only keep their entry are laid out in place (``in_place``)."""
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
            reached = np.zeros(nf + 1, bool)
            reached[self.rel8_tgt[src_stays]] = True      # (-1: code of no function)
            reached = reached[:nf]
            n = pin(reached, PIN_REASONS[2])
            fixed = np.zeros(nf, bool)
            fixed[self.rel8_src[~src_stays & self.rel8_fixed]] = True
            n += pin(fixed, PIN_REASONS[2])
            falls = (self.fall_src != -2) & stays[np.maximum(self.fall_src, -1)]
            n += pin(falls, PIN_REASONS[3])
            if not n:
                break
        rows = np.flatnonzero(moves)
        in_place = np.zeros(0, np.int64)
        if relaid is not None:
            may = np.zeros(nf, bool)
            for reason in IN_PLACE_REASONS:
                may[pinned.get(reason, [])] = True
            in_place = np.flatnonzero(may & relaid & ~self.entered_inside)
        if self.align_all is None:
            self.align_all = alignment(self.model, self.extent, np.arange(nf), self.fill)
        return MovePlan(rows=rows, region=self.region[rows], extent=self.extent[rows],
                        prefix={r: self.prefix[r] for r in rows.tolist() if r in self.prefix},
                        align=self.align_all[rows], pinned=pinned, in_place=in_place,
                        fill=self.fill,
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
    fill[outside] = model.fill_insn[outside]
    # (a table's site, and the nops that pad an alternative's original code, are code)
    fill &= ~table_sites(model) & ~model.insn_inside_patch_unit
    if not n:
        return fill
    # Runs of fill: a run that code falls into (the instruction before it is
    # contiguous, not fill and not a terminator) is code.
    stops = isin(insns.flow, (x86.JMP, x86.IND_JMP, x86.RET, x86.INTERRUPT, x86.EXCEPTION))
    contiguous = insns.follows_on()
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
    prev_end = np.where((k >= 0) & (j >= 0), insns.end_of(np.maximum(j, 0)), starts)
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
        self.start_of = model.functions.start
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
            # (regions start and end at labels or section ends, where ranges of
            # fill are cut too; a record of fill across a bound would still give
            # room only for its part inside)
            lo = int(np.searchsorted(insns.addr, r.start, side="right")) - 1
            if lo < 0 or insns.end_of(lo) <= r.start:
                lo += 1
            hi = int(np.searchsorted(insns.addr, r.end))
            if not moving[lo:hi].any() and r.kind != PLAIN:
                continue
            starts = np.maximum(insns.addr[lo:hi], np.uint64(r.start))
            ends = np.minimum(insns.end_of(slice(lo, hi)), np.uint64(r.end))
            free = ~stays[lo:hi]
            # Free runs: maximal runs of instructions that do not stay.
            edges = np.diff(np.concatenate([[0], free.astype(np.int8), [0]]))
            a = np.flatnonzero(edges == 1)
            b = np.flatnonzero(edges == -1) - 1
            self.free[k] = [[int(starts[i]), int(ends[j])] for i, j in zip(a, b)]
        self.spill = [k for k, r in enumerate(regions) if r.movable and r.kind == PLAIN]

    @cached_property
    def region_of(self) -> dict[int, int]:
        """Function row -> its region, for every function that moves."""
        return dict(zip(self.plan.rows.tolist(), self.plan.region.tolist()))

    def free_ranges(self) -> np.ndarray:
        out = [(lo, hi) for ranges in self.free.values() for lo, hi in ranges]
        return np.array(sorted(out), np.uint64).reshape(-1, 2)

    def room(self) -> dict[int, int]:
        """Free bytes per region."""
        return {k: sum(b - a for a, b in v) for k, v in self.free.items()}

    def groups(self) -> list[tuple[int, ...]]:
        """Regions placed together: plain text with every plain region whose free
        room its parts may spill to; every other region alone."""
        plain = tuple(sorted(k for k in self.free if self.layout.regions[k].kind == PLAIN))
        return ([plain] if plain else []) + [(k,) for k in sorted(self.free) if k not in plain]

    def place(self, hot: np.ndarray, cold: np.ndarray, rank: np.ndarray,
              cold_align: int = 1, before: np.ndarray | None = None,
              memo: dict | None = None, best_fit: frozenset = frozenset()):
        """Bases of the hot and cold part of every moving function (arrays over all
        function rows: ``hot``/``cold`` sizes, 0 for none), and the :class:`Room`
        they are in. Hot parts go by ``rank``, then cold parts by ``rank``, each
        first fit in its region; a part of plain text that finds no room there
        goes to the plain gaps. ``before[row]``: the function of the same name
        just before it (-1: none): a function goes after it (livepatch's
        ``sympos`` counts same-named functions in address order). Groups of
        regions (:meth:`groups`) are independent: ``memo`` keeps each group's
        answer for the same inputs (placement is tried again after a region
        overflowed; the others need not be). ``best_fit``: regions whose parts
        go to the free range they leave least room in, not the first one (a
        region split by functions that stay packs tighter so). Raises
        :class:`NoRoom` with the functions that found no room."""
        from kbuild_bolt.rewrite.emit import Room

        plan = self.plan
        n = len(hot)
        bases = np.zeros((2, n), np.uint64)
        range_of = np.full((2, n), -1, np.int64)
        # Every free range, globally numbered; each region's are consecutive.
        regions = sorted(self.free)
        first, lo, hi = {}, [], []
        for k in regions:
            first[k] = len(lo)
            for a, b in self.free[k]:
                lo.append(a)
                hi.append(b)
        span = {k: (first[k], first[k] + len(self.free[k])) for k in regions}
        align = np.zeros(n, np.int64)
        align[plan.rows] = plan.align
        failed = []
        for group in self.groups():
            members = plan.rows[isin(plan.region, group)]
            floors = self._floors(members, before)
            key = None
            if memo is not None:
                key = (group, tuple(lo[span[group[0]][0]:span[group[-1]][1]]),
                       tuple(hi[span[group[0]][0]:span[group[-1]][1]]),
                       members.tobytes(), hot[members].tobytes(), cold[members].tobytes(),
                       rank[members].tobytes(), align[members].tobytes(), cold_align,
                       tuple(sorted(floors.items())), tuple(sorted(best_fit & set(group))),
                       # (range numbers are global: they shift when an earlier
                       # region's room changes)
                       tuple(span[k] for k in group))
            answer = memo.get(key) if key is not None else None
            if answer is None:
                answer = self._first_fit(group, members, span, lo, hi, hot, cold, rank, align,
                                         cold_align, floors, best_fit)
                if key is not None:
                    memo[key] = answer
            g_bases, g_ranges, g_failed = answer
            bases[:, members], range_of[:, members] = g_bases, g_ranges
            failed += g_failed
        if failed:
            raise NoRoom(sorted(set(failed)), f"no room for {len(failed)} functions")
        region_of = self.region_of

        def alternatives(row):
            return [i for a, b in self._choices(region_of[row], span) for i in range(a, b)]

        return bases[0], bases[1], Room(lo, hi, range_of, alternatives)

    def _choices(self, region: int, span: dict) -> list[tuple[int, int]]:
        """The free ranges (as spans of global range numbers) a part may go to."""
        out = [span[region]] if region in span else []
        if self.layout.regions[region].kind == PLAIN:
            out += [span[k] for k in self.spill if k != region and k in span]
        return out

    def _floors(self, members: np.ndarray, before: np.ndarray | None) -> dict:
        """Member row -> what its hot part must follow: ("row", r), the same-named
        function r that moves in the same region, or ("addr", a), the address of
        one that stays."""
        if before is None or not len(members):
            return {}
        prev = before[members]
        region_of = self.region_of
        out = {}
        for i in np.flatnonzero(prev >= 0).tolist():
            p, me = int(prev[i]), int(members[i])
            if p in region_of:
                if region_of[p] == region_of[me]:
                    out[me] = ("row", p)
            else:
                out[me] = ("addr", int(self.start_of[p]))
        return out

    def _first_fit(self, group, members, span, lo, hi, hot, cold, rank, align, cold_align,
                   floors, best_fit=frozenset()):
        """Place the parts of ``members`` (functions of the regions of ``group``) in
        their free ranges, first fit (best fit in the regions of ``best_fit``):
        (bases [2, members], range numbers [2, members], rows that found no
        room)."""
        region_of = self.region_of
        at_member = {int(r): i for i, r in enumerate(members.tolist())}
        m_bases = np.zeros((2, len(members)), np.uint64)
        m_ranges = np.full((2, len(members)), -1, np.int64)
        cursor = list(lo)
        # Ranges in chunks, each with the most room any of its ranges has left: a
        # part skips the chunks where it cannot fit (first fit stays exact).
        chunk = 16
        most = [max(hi[i] - cursor[i] for i in range(a, min(a + chunk, len(lo))))
                for a in range(0, len(lo), chunk)]
        hot_rows = members[hot[members] > 0]
        cold_rows = members[cold[members] > 0]
        parts = [(0, int(rank[r]), int(r)) for r in hot_rows.tolist()]
        parts += [(1, int(rank[r]), int(r)) for r in cold_rows.tolist()]
        parts.sort()
        failed = []

        def fit(a, b, need, al, floor):
            for c in range(a // chunk, (b - 1) // chunk + 1):
                if most[c] < need:
                    continue
                for i in range(max(a, c * chunk), min(b, (c + 1) * chunk)):
                    at = (cursor[i] + al - 1) & -al
                    if at + need <= hi[i] and at >= floor:
                        return i, at
            return None

        def tightest(choices, need, al, floor):
            best = None
            for a, b in choices:
                for i in range(a, b):
                    at = (cursor[i] + al - 1) & -al
                    left = hi[i] - (at + need)
                    if left >= 0 and at >= floor and (best is None or left < best[0]):
                        best = (left, i, at)
            return best[1:] if best else None

        for kind, _rank, row in parts:
            need = int(hot[row] if kind == 0 else cold[row])
            al = int(align[row]) if kind == 0 else cold_align
            floor = 0
            if kind == 0 and row in floors:
                what, value = floors[row]
                # (a same-named function that moves was placed already: ranks
                # follow address order among them)
                floor = int(m_bases[0, at_member[value]]) if what == "row" else value
            found = None
            choices = self._choices(region_of[row], span)
            for wanted in ((floor, 0) if floor else (0,)):
                if region_of[row] in best_fit:
                    found = tightest(choices, need, al, wanted)
                    if found:
                        break
                    continue
                for a, b in choices:
                    found = fit(a, b, need, al, wanted)
                    if found:
                        break
                if found:
                    break
            if not found:
                failed.append(row)
                continue
            i, at = found
            j = at_member[row]
            m_bases[kind, j] = at
            m_ranges[kind, j] = i
            cursor[i] = at + need
            c = i // chunk
            most[c] = max(hi[k] - cursor[k] for k in range(c * chunk, min(len(lo), (c + 1) * chunk)))
        return m_bases, m_ranges, failed


def _give_way(variant: np.ndarray, rows: np.ndarray, size: np.ndarray, unsplit: np.ndarray,
              original: np.ndarray, rank: np.ndarray, want: int) -> bool:
    """Give ``want`` bytes of a full region back: the coldest functions (larger
    savings first among equals) take smaller layouts, first whole in their new
    block order (``unsplit``: no jumps to and from a cold part, taken branches as
    in the block layout alone), and only when that is not enough in their
    original order (no jumps the new order added). The hottest functions keep
    their layouts longest. ``want`` doubles with each failed try, so the room
    the alignment of the functions eats (not in the sizes) is found in a few
    tries. False when no function could give anything more."""
    from kbuild_bolt.rewrite.emit import NEW, ORIGINAL, UNSPLIT

    smaller_than = {NEW: 0, UNSPLIT: 1, ORIGINAL: 2}   # (the order layouts give way in)
    size = size.astype(np.int64).copy()
    gave = False
    for target, smaller in ((UNSPLIT, unsplit), (ORIGINAL, original)):
        saving = size - smaller
        for i in np.lexsort((-saving, -rank)).tolist():
            if want <= 0:
                return gave
            if saving[i] > 0 and smaller_than[int(variant[rows[i]])] < smaller_than[target]:
                variant[rows[i]] = target
                want -= int(saving[i])
                size[i] = smaller[i]
                gave = True
    return gave


def place_functions(model, analysis: MoveAnalysis, candidates: np.ndarray, hot: np.ndarray,
                    cold: np.ndarray, others, rank: np.ndarray, slots: np.ndarray,
                    before: np.ndarray | None = None,
                    memo: dict | None = None, grow: np.ndarray | None = None):
    """Place every function of ``candidates`` that can move, each in the layout
    it was given (``hot``/``cold`` sizes). Where a region cannot hold those, it
    is packed best-fit first when functions that stay cut its room up; then the
    coldest functions (ranks order by heat) get smaller layouts (``_give_way``:
    whole in their new order, size ``others.unsplit``, then in their original
    order, size ``others.original``; :class:`~kbuild_bolt.rewrite.emit.OtherLayouts`
    measures them for the rows of such regions only), twice as much each time
    placement fails there. When nothing more can give way the region is kept as
    it was: its functions in their original order, each in its new block order
    unsplit when that fits its old slot with every branch to another function
    grown long (``slots``: the end of each function's slot, fill after it
    included), else in its original order, which always fits; and when even
    that fails, all its functions stay where they are. Returns (plan,
    placement, hot bases, cold bases, room, rows that stayed for want of room,
    layout per function row: NEW, ORIGINAL or UNSPLIT). ``memo``: kept between
    calls, it spares placing regions again whose inputs did not change.
    ``grow`` (2 x rows: hot, cold): how much each part's branches to other
    functions may grow once it moves (short ones that may no longer reach);
    reserved in the regions other than plain text, whose parts have nowhere
    else to go when their range overflows (not in a region kept as it was:
    there every neighbour stays in reach)."""
    from kbuild_bolt.rewrite.emit import NEW, ORIGINAL, UNSPLIT

    memo = {} if memo is None else memo
    pad_hot, pad_cold = np.zeros(len(hot), np.int64), np.zeros(len(hot), np.int64)
    if grow is not None:
        kinds = np.array([r.kind != PLAIN for r in analysis.layout.regions] + [False])
        tight = kinds[analysis.region]
        pad_hot, pad_cold = np.where(tight, grow[0], 0), np.where(tight, grow[1], 0)
    pad_all = pad_hot + pad_cold
    # (a new block order moves a function's branches to other functions: kept
    # as it was, it must fit its old slot even if all of those grow long)
    may_grow = np.zeros(len(hot), np.int64) if grow is None else grow[0] + grow[1]
    best_fit: set[int] = set()
    variant = np.full(len(hot), NEW, np.int64)
    place_rank = rank.copy()
    tries: dict[int, int] = {}
    as_was: set[int] = set()
    stayed: list[int] = []
    plan = analysis.plan(candidates)
    while True:
        placement = Placement(model, analysis.layout, plan)
        h, c = hot + pad_hot, cold + pad_cold
        for v, size in ((ORIGINAL, others.original), (UNSPLIT, others.unsplit)):
            m = variant == v
            h[m], c[m] = size[m] + pad_all[m], 0
        for k in as_was:
            r = plan.rows[plan.region == k]
            h[r] -= pad_all[r]
        try:
            hot_base, cold_base, free = placement.place(h, c, place_rank, before=before,
                                                         memo=memo, best_fit=frozenset(best_fit))
            return plan, placement, hot_base, cold_base, free, stayed, variant
        except NoRoom as full:
            region_of = placement.region_of
            short: dict[int, int] = {}
            for row in full.rows:
                short[region_of[row]] = short.get(region_of[row], 0) + int(h[row] + c[row])
        for k, missing in short.items():
            tries[k] = tries.get(k, 0) + 1
            sel = np.flatnonzero(plan.region == k)
            r = plan.rows[sel]
            others.ensure(r)
            original, unsplit = others.original, others.unsplit
            if k in as_was:
                # Not even as it was (rel8 jumps out of reach?): all stay.
                stayed += r.tolist()
            elif (k not in best_fit and len(placement.free.get(k, ())) > 1
                  and analysis.layout.regions[k].kind != PLAIN):
                # Room cut up by functions that stay (a special region: a few
                # ranges): pack it tighter first.
                best_fit.add(k)
            elif tries[k] <= 10 and _give_way(variant, r, h[r] + c[r],
                                              unsplit[r] + pad_all[r],
                                              original[r] + pad_all[r], rank[r],
                                              missing << tries[k]):
                # The coldest functions took smaller layouts; place again.
                pass
            else:
                slot = (slots[r] - plan.extent[sel]).astype(np.int64)
                variant[r] = np.where(unsplit[r] + may_grow[r] <= slot, UNSPLIT, ORIGINAL)
                place_rank[r] = -(1 << 40) + np.argsort(np.argsort(plan.extent[sel]))
                as_was.add(k)
                best_fit.discard(k)  # (first fit in address order: as the linker had it)
        if stayed:
            plan = analysis.plan(setdiff1d(candidates, np.array(stayed, np.int64)))


def lay_in_place(model, rows: np.ndarray, hot_base: np.ndarray, cold_base: np.ndarray,
                 room, variant: np.ndarray, unsplit: np.ndarray):
    """Functions laid out anew inside their own bytes (``rows``: they stay): each
    gets a free range of its own, [start, end), and its hot part goes to its
    start, whole in its new block order when that fits, else in its original
    order (which always does). Its parts move nowhere else when the range
    overflows (relaxation then raises :class:`NoRoom` for it, and it is left
    alone). Returns the room with those ranges added, and the ranges."""
    from kbuild_bolt.rewrite.emit import ORIGINAL, UNSPLIT, Room

    functions = model.functions
    start = functions.start[rows].astype(np.uint64)
    end = functions.end[rows].astype(np.uint64)
    first = len(room.lo)
    range_of = room.range_of.copy()
    range_of[0, rows] = first + np.arange(len(rows))
    range_of[1, rows] = -1
    hot_base[rows], cold_base[rows] = start, 0
    variant[rows] = np.where(unsplit[rows] <= (end - start).astype(np.int64), UNSPLIT, ORIGINAL)
    mine = set(rows.tolist())
    others = room.alternatives
    new_room = Room(np.concatenate([room.lo, start]), np.concatenate([room.hi, end]), range_of,
                    lambda row: [] if row in mine else others(row))
    return new_room, np.stack([start, end], axis=1)
