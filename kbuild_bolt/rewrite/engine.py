"""The rewrite: a list of passes over one :class:`RewriteContext`.

BOLT's phases, for a kernel:

- read: the binary model (functions, decoded code, kernel tables) and CFGs;
- check: the input's own tables and relocations agree with its code (a kernel
  that contradicts itself is refused before any work);
- discover: which functions may be laid out again, which are left alone and why;
- profile: counts onto blocks and edges (``--profile``);
- layout: a block order per function;
- promote: hot indirect calls with a dominant target get a direct path to it
  (``--indirect-call-promotion``), their functions laid out;
- functions: with ``--reorder-functions``/``--split-functions``, which functions
  move whole, their order in their text regions, and which blocks go cold;
- emit: each function's new bytes inside its own slot (function start
  unchanged; growth may use the fill after it; blocks that do not fit go to
  free room), or the function is left byte for byte alone with a reason;
- dyno: predicted dyno-stats before and after (``--dyno-stats``);
- fit: each metadata rewriter may leave more functions alone (ORC capacity);
- update: the new code, and every metadata rewriter (code references,
  relocations, kernel tables, ORC, symbols, debug sections) through the
  address map old -> new, into a temporary output file;
- verify: the output checked on its own and against the input;
- write: the output renamed into place.

Each pass reads and writes the context fields documented there, and is timed
in the summary. A new capability is a new pass here or a new rewriter in
:mod:`kbuild_bolt.rewrite.metadata`.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from kbuild_bolt.arrays import isin, setdiff1d, union1d, unique
from kbuild_bolt.analysis.crosscheck import check_all, check_relocations
from kbuild_bolt.binary.cfg import REASONS
from kbuild_bolt.binary.model import default_jobs
from kbuild_bolt.elf.notes import build_id
from kbuild_bolt.elf.notes import PendingStamp
from kbuild_bolt.elf.writer import OutputImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.layout import orders as block_orders
from kbuild_bolt.memory import freeze_survivors, thaw, trim, tune_heap
from kbuild_bolt.processes import in_shares
from kbuild_bolt.rewrite.addressmap import AddressMap
from kbuild_bolt.rewrite.context import (  # noqa: F401 - the engine's public names
    LayoutRecord, ProgressBar, RewriteContext, RewriteOptions, RewriteResult, Session,
)
from kbuild_bolt.rewrite.emit import BlockTable, emit_functions, table_sites
from kbuild_bolt.rewrite.holes import HoleAllocator, find_holes, slots_short_of_holes
from kbuild_bolt.rewrite.metadata import FileChanges, metadata_rewriters


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[RewriteContext], None]
    # Runs only when this says so (None: always).
    when: Callable[[RewriteContext], bool] | None = None


def read_input(ctx: RewriteContext) -> None:
    """-> model, cfg, session (a given session is reused: bisect reads once);
    beside: the profile file read, and the input's kallsyms decoded, on the
    other CPU meanwhile."""
    _read_profile_beside(ctx)
    if ctx.session is None:
        ctx.say(f"reading {ctx.options.input_name or ctx.input_path}")
        ctx.session = Session(ctx.input_path, ctx.options.cache_dir)
        ctx.own_session = True
        if ctx.session.analysis == "kept":
            ctx.say(f"decoded code and CFGs kept from an earlier run ({ctx.options.cache_dir})")
    ctx.model, ctx.cfg = ctx.session.model, ctx.session.cfg
    trim()
    ctx.frozen = freeze_survivors()
    ctx.result.functions = len(ctx.model.functions)
    # The input's kallsyms, decoded while the layout is made (its update wants it)
    from kbuild_bolt.kernel.tables import kallsyms

    image = ctx.model.image
    if ctx.output_path is not None and not ctx.model.is_module \
            and kallsyms.read_count(image) is not None:
        ctx.start_beside("kallsyms", kallsyms.read, image)


def check_input(ctx: RewriteContext) -> None:
    """model -> nothing, or an error naming the first entry that disagrees with the code."""
    session = ctx.session
    if session.checked:
        return
    for check in check_all(ctx.model).values():
        for m in check.mismatches[:1]:
            raise KbbError(f"{ctx.input_path}: {m.table}[{m.index}] {m.field} -> {m.where}: "
                           f"{m.message} (the input's own table disagrees with its code)")
    _, problems = check_relocations(ctx.model)
    if problems:
        raise KbbError(f"{ctx.input_path}: {problems[0]} (the input's relocations disagree "
                       "with its code)")
    session.passed_check()


def discover(ctx: RewriteContext) -> None:
    """model, cfg, options -> candidates; every other function is counted by reason."""
    functions, cfg, options = ctx.model.functions, ctx.cfg, ctx.options
    names = functions.names
    selected = np.ones(len(functions), bool)
    if options.funcs is not None:
        wanted = options.funcs
        selected = np.array([n in wanted or any(a in wanted for a in functions.aliases.get(i, []))
                             for i, n in enumerate(names)])
        unknown = wanted - set(names) - {a for v in functions.aliases.values() for a in v}
        if unknown:
            raise KbbError(f"--funcs: no such function: {', '.join(sorted(unknown)[:5])}")
    if options.skip_funcs:
        selected &= np.array([n not in options.skip_funcs for n in names])
    ctx.leave_alone(np.flatnonzero(~selected).tolist(), "not selected")
    for row in np.flatnonzero(selected & (cfg.func_reason != 0)).tolist():
        ctx.leave_alone([row], REASONS[int(cfg.func_reason[row])])
    ctx.candidates = np.flatnonzero(selected & (cfg.func_reason == 0))


def _read_profile_beside(ctx: RewriteContext) -> None:
    """A profile that needs no kernel to be read (kbuild-bolt's own format) is
    parsed on the other CPU while this one reads the input."""
    from kbuild_bolt.profile.model import MAGIC

    path = ctx.options.profile
    if ctx.options.reorder_blocks != "ext-tsp" or not isinstance(path, (str, os.PathLike)):
        return
    try:
        with open(path, "rb") as f:
            if not f.read(len(MAGIC)) == MAGIC.encode():
                return
    except OSError:
        return    # (reading it later says what is wrong)
    from kbuild_bolt.profile.formats import load_profile

    ctx.start_beside("profile", load_profile, path)


def attach_profile(ctx: RewriteContext) -> None:
    """options.profile (or what read began reading of it) -> profile_layout (the
    profile resolved for this kernel)."""
    from kbuild_bolt.layout.exttsp import ProfileLayout
    from kbuild_bolt.profile.formats import resolve_profile

    profile = ctx.options.profile
    if "profile" in ctx.beside:
        profile = ctx.take_beside("profile", None)
    profile = resolve_profile(profile, ctx.model, ctx.cfg, log=ctx.say)
    layout = ProfileLayout(ctx.model, ctx.cfg, profile)
    ctx.profile_layout = layout
    trim()   # (matching the profile masked a copy of the code)
    ctx.result.profile_used = profile.used if profile.used is not None else layout.profile.matched
    ctx.result.profile_applied = profile.applied
    ctx.say(f"profile: {100 * layout.profile.matched:.1f}% of its counts on this "
            f"kernel's code, {len(layout.hot_rows):,} functions ran")


def lay_out_blocks(ctx: RewriteContext) -> None:
    """candidates, profile_layout -> orders (functions whose order changes), unchanged_rows."""
    strategy = ctx.options.reorder_blocks
    names = ctx.model.functions.names
    by_profile = None
    if ctx.profile_layout is not None:
        from kbuild_bolt.layout.kept import KeptOrders

        layout = ctx.profile_layout
        layout.kept = KeptOrders.load(ctx.options.cache_dir)
        by_profile = profile_orders(layout, ctx.cfg, ctx.candidates)
        layout.kept.save()
        ctx.result.orders_kept = (layout.kept.hits, len(by_profile))
        if layout.kept.hits:
            ctx.say(f"ext-TSP orders of {layout.kept.hits:,} functions kept from earlier runs")
    for row in ctx.candidates.tolist():
        blocks = list(ctx.cfg.blocks_of(row))
        if by_profile is not None:
            order = by_profile.get(row, blocks)   # never ran: keep its order
        elif len(blocks) <= 2 or strategy == "none":
            order = blocks  # (the entry block stays first: nothing to reorder)
        else:
            # One generator per function: its order does not depend on which other
            # functions are selected (bisect rewrites subsets and must see the same).
            rng = random.Random(f"{ctx.options.seed}:{names[row]}")
            order = choose_order(strategy, blocks, rng)
        if order == blocks:
            ctx.result.unchanged += 1
            ctx.unchanged_rows.append(row)
        else:
            ctx.orders[row] = order


# Fewer hot functions than this are ordered in one process (a fork costs more).
PARALLEL_ORDERS_FROM = 200


def profile_orders(layout, cfg, rows: np.ndarray) -> dict[int, list[int]]:
    """ext-TSP order of every function of ``rows`` the profile saw (the others
    keep theirs). With a second CPU, a forked child orders half of them: each
    order depends on its function alone, so the result is the same."""
    hot = [row for row in rows.tolist() if row in layout.hot_rows]
    layout.prepare()
    if len(hot) < PARALLEL_ORDERS_FROM or default_jobs() < 2:
        return _orders_of(layout, cfg, hot)
    # (the work grows faster than the blocks: the largest functions are dealt
    # out first, each to the share with less so far)
    size = (cfg.func_end_block[hot] - cfg.func_first_block[hot]).astype(np.int64)
    shares, load = ([], []), [0, 0]
    for k in np.argsort(-size, kind="stable").tolist():
        side = 0 if load[0] <= load[1] else 1
        shares[side].append(hot[k])
        load[side] += int(size[k]) ** 2
    (here, _), (there, child_kept) = in_shares(
        lambda rows: _orders_of(layout, cfg, rows, True), list(shares), 2)
    here.update(there)
    if layout.kept is not None:
        layout.kept.merge(child_kept)   # (what the child found and computed, for the next run)
    return here


def _orders_of(layout, cfg, rows: list[int], forked: bool = False):
    """{row: order}; ``forked``: and what this process found in and added to the kept
    orders (a forked child's are lost with it otherwise)."""
    orders = {row: layout.order(row, list(cfg.blocks_of(row))) for row in rows}
    if not forked:
        return orders
    return orders, (layout.kept.delta() if layout.kept is not None else None)


def promote_calls(ctx: RewriteContext) -> None:
    """candidates, profile_layout -> promotions; every function with one is laid
    out (in its block order when that did not change)."""
    from kbuild_bolt.rewrite import promote

    model, cfg, options = ctx.model, ctx.cfg, ctx.options
    seen = None
    if ctx.profile_layout is not None:
        from kbuild_bolt.profile.attach import indirect_calls

        seen = indirect_calls(model, ctx.profile_layout.profile)
    promotions = promote.choose(model, cfg, ctx.candidates, seen, share=options.icp_share,
                                min_calls=options.icp_min_calls,
                                every_site=options.icp_every_site, seed=options.seed)
    ctx.promotions = promotions
    ctx.result.icp_skipped = promotions.skipped
    rows = set(unique(model.function_of_insn[promotions.site]).tolist())
    for row in rows - set(ctx.orders):
        ctx.orders[row] = list(cfg.blocks_of(row))
        ctx.result.unchanged -= 1
    ctx.unchanged_rows = [r for r in ctx.unchanged_rows if r not in rows]
    if len(promotions):
        ctx.say(f"promoting {len(promotions):,} indirect calls")


def lay_out_functions(ctx: RewriteContext) -> None:
    """candidates, orders, profile_layout -> moves, orders (every moving function),
    hot_len, rank."""
    from kbuild_bolt.kernel.text import text_layout
    from kbuild_bolt.layout import functions as function_orders
    from kbuild_bolt.layout.split import hot_first, hot_threshold, random_split
    from kbuild_bolt.rewrite.placement import MoveAnalysis

    model, cfg, options = ctx.model, ctx.cfg, ctx.options
    strategy = options.reorder_functions
    if strategy in function_orders.NEEDS_PROFILE and ctx.profile_layout is None:
        raise KbbError(f"--reorder-functions={strategy} needs a profile (--profile)")
    layout = text_layout(model.image)
    ctx.move_analysis = MoveAnalysis(model, cfg, layout)
    # (functions with a new block order: those that must stay get it in place)
    ctx.relaid = np.zeros(len(model.functions), bool)
    ctx.relaid[list(ctx.orders)] = True
    moves = ctx.move_analysis.plan(ctx.candidates, ctx.relaid)
    ctx.moves, ctx.text = moves, layout
    names = model.functions.names
    rows = moves.rows.tolist()
    for row in rows:
        ctx.orders.setdefault(row, list(cfg.blocks_of(row)))
    ctx.unchanged_rows = [r for r in ctx.unchanged_rows if r not in ctx.orders]
    # Blocks that go cold.
    counts = None
    if ctx.profile_layout is not None:
        counts = ctx.profile_layout.profile.block_counts(cfg)
    if options.split_functions:
        threshold = 1
        if counts is not None:
            threshold = hot_threshold(cfg, counts, options.split_share)
        for row in rows:
            order = ctx.orders[row]
            if counts is not None:
                if counts[order].any():   # (a function that never ran stays whole)
                    order, hot = hot_first(order, {b: int(counts[b]) for b in order},
                                           threshold)
                    ctx.orders[row], ctx.hot_len[row] = order, hot
            else:
                rng = random.Random(f"{options.seed}:split:{names[row]}")
                ctx.hot_len[row] = random_split(order, rng)
    # The order of functions: profile orders put what ran first, by the call graph.
    n = len(rows)
    graph = None
    if strategy in function_orders.NEEDS_PROFILE:
        from kbuild_bolt.profile.attach import function_calls, function_samples

        cp = ctx.profile_layout.profile
        index = np.full(len(model.functions), -1, np.int64)
        index[moves.rows] = np.arange(n)
        caller, callee, count, offset = function_calls(model, cp)
        keep = (index[caller] >= 0) & (index[callee] >= 0)
        size = (model.functions.end - model.functions.start)[moves.rows].astype(np.int64)
        if ctx.hot_len:
            # Split functions are ordered by what lands in the hot area: their hot
            # part (as BOLT orders by the hot size when it splits).
            insns = model.insns
            nbytes = (insns.end_of(cfg.block_end - 1)
                      - insns.addr[cfg.block_first]).astype(np.int64)
            for i, row in enumerate(rows):
                hot = ctx.hot_len.get(row)
                if hot is not None:
                    size[i] = max(1, int(nbytes[ctx.orders[row][:hot]].sum()))
        graph = function_orders.CallGraph(
            size=size, samples=function_samples(model, cp)[moves.rows],
            src=index[caller[keep]], dst=index[callee[keep]], count=count[keep],
            offset=offset[keep])
    order = function_orders.order_functions(strategy, n, graph,
                                            random.Random(f"{options.seed}:functions"))
    rank = np.empty(n, np.int64)
    rank[np.array(order, np.int64)] = np.arange(n)
    if graph is not None:
        # Functions that never ran keep their relative order, after those that did.
        ran = graph.samples > 0
        rank[~ran] = n + np.flatnonzero(~ran)
    ctx.rank = np.full(len(model.functions), 2 * n, np.int64)
    ctx.rank[moves.rows] = rank
    ctx.same_name_before = same_name_order(model, ctx.rank, moves.rows)


def same_name_order(model, rank: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """For every function, the function of the same name just before it in address
    order (-1: none). Same-named functions that move get their ranks in their
    address order, so placement keeps that order (livepatch's ``sympos`` is a
    function's rank among same-named symbols by address)."""
    names = model.functions.names
    by_name: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        by_name.setdefault(name, []).append(row)
    before = np.full(len(names), -1, np.int64)
    moves = np.zeros(len(names), bool)
    moves[moving] = True
    for rows in by_name.values():
        if len(rows) < 2:
            continue
        for a, b in zip(rows, rows[1:]):
            before[b] = a
        mine = [r for r in rows if moves[r]]
        rank[mine] = np.sort(rank[mine])
    return before


def emit(ctx: RewriteContext) -> None:
    """orders -> slots, emission (functions that cannot be emitted are left alone)."""
    if ctx.moves is not None:
        return emit_moved(ctx)
    model, cfg, result = ctx.model, ctx.cfg, ctx.result
    rows = np.array(sorted(ctx.orders), dtype=np.int64)
    fill_insn = alignment_fill(model, rows)
    holes = find_holes(model) if ctx.options.split else []
    ctx.slots = slots_short_of_holes(model.functions.start, slot_ends(model, fill_insn), holes)
    cand_start, cand_end = model.functions.start[rows], model.functions.end[rows]

    def moved_interior(addrs: np.ndarray) -> np.ndarray:
        i = np.searchsorted(cand_start, addrs, side="right").astype(np.int64) - 1
        at = np.maximum(i, 0)
        return (i >= 0) & (cand_start[at] < addrs) & (addrs < cand_end[at])

    sites = table_sites(model)
    result.free_room = sum(b - a for a, b in holes)
    ctx.say(f"laying out {len(ctx.orders):,} functions ({ctx.options.reorder_blocks})")
    reverse = reversible_sites(ctx)
    if not (ctx.options.dyno_stats or ctx.options.keep_record):
        ctx.profile_layout = None   # (its last reader here: its counts go before emission)
    trim()
    block_table = BlockTable(model, cfg, sites, fill_insn, reverse_sites=reverse,
                             promotions=ctx.promotions, rows=rows)
    model.image.release_pages()   # (it read the code of every block's end)
    while True:
        emission, failures = emit_functions(model, cfg, block_table, ctx.orders, ctx.slots,
                                            moved_interior,
                                            HoleAllocator(list(holes)) if ctx.options.split
                                            else None)
        trim()
        # A function that cannot be laid out with its promoted calls (no room for
        # what they add) is laid out without them: all again, until none fails so.
        promotions = ctx.promotions
        if promotions is None or not len(promotions) or not failures:
            break
        failed = np.array([row for row, _ in failures], np.int64)
        drop = isin(model.function_of_insn[promotions.site], failed)
        if not drop.any():
            break
        ctx.promotions = promotions.without(drop, "no room in its function")
        ctx.result.icp_skipped = ctx.promotions.skipped
        block_table = block_table.with_promotions(model, ctx.promotions)
    del block_table
    for row, reason in failures:
        ctx.leave_alone([row], reason)
    result.fragments = int((emission.frag_len > 0).sum())
    result.fragment_bytes = int(emission.frag_len.sum())
    ctx.emission = emission


def reversible_sites(ctx: RewriteContext) -> bool | np.ndarray:
    """The static-key sites that may be reversed where the layout puts their jump
    side right behind them: with a profile, those it saw jump more often than not
    (their key was mostly enabled: where it did not, a cold site's order says
    nothing); with an order made without one (random, reverse: proving the
    fixups), every site."""
    if not ctx.options.reverse_static_keys:
        return False
    if ctx.profile_layout is None:
        return True
    from kbuild_bolt.profile.dyno import mostly_jumping

    mask = mostly_jumping(ctx.model, ctx.profile_layout.profile)
    return False if mask is None else mask


def emit_moved(ctx: RewriteContext, sizes: dict | None = None) -> None:
    """moves, orders, hot_len, rank -> emission of every function that moves, placed
    in its region. A function that finds no room, or cannot be laid out, stays
    where it is; which functions can move is then decided again (a function that
    stays may hold others where they are). ``sizes``: the sizes of functions'
    layouts from an attempt before (emit.emit_placed), still true."""
    from kbuild_bolt.rewrite.emit import NoRoom, emit_placed
    from kbuild_bolt.rewrite.placement import lay_in_place, place_functions

    model, cfg, result = ctx.model, ctx.cfg, ctx.result
    analysis = ctx.move_analysis
    moves = first_moves = ctx.moves
    fill_insn = alignment_fill(model, union1d(moves.rows, moves.in_place))
    ctx.slots = slot_ends(model, fill_insn)
    block_table = BlockTable(model, cfg, table_sites(model), fill_insn,
                             reverse_sites=reversible_sites(ctx), promotions=ctx.promotions,
                             rows=union1d(moves.rows, moves.in_place))
    ctx.say(f"laying out {len(moves.rows):,} functions ({ctx.options.reorder_blocks} blocks, "
            f"{ctx.options.reorder_functions} functions"
            f"{', split' if ctx.options.split_functions else ''})")
    before = ctx.same_name_before
    same_named = set(np.flatnonzero(before >= 0).tolist()) | set(before[before >= 0].tolist())
    stay: dict[int, str] = {}
    memo: dict = {}   # (placements of regions, for the rounds after one that failed)
    sizes = {} if sizes is None else sizes  # (sizes of every function's layouts, likewise)
    while True:
        placed = {}

        def place(hot, cold, others, grow):
            candidates = setdiff1d(ctx.candidates, np.array(sorted(stay), np.int64))
            plan, placement, hot_base, cold_base, room, no_room, variant = place_functions(
                model, analysis, candidates, hot, cold, others, ctx.rank,
                ctx.slots, ctx.same_name_before, memo, grow)
            others.ensure(moves.in_place)
            room, own = lay_in_place(model, moves.in_place, hot_base, cold_base, room, variant,
                                     others.unsplit)
            free = np.concatenate([placement.free_ranges(), own])
            placed.update(plan=plan, free=free[np.argsort(free[:, 0], kind="stable")],
                          no_room=no_room)
            return hot_base, cold_base, room, variant

        orders = {row: ctx.orders[row] for row in moves.rows.tolist()}
        orders.update((row, ctx.orders[row]) for row in moves.in_place.tolist())
        try:
            emission = emit_placed(model, cfg, block_table, orders, ctx.hot_len, moves.prefix,
                                   place, lambda row: analysis.align_all[row], same_named,
                                   sizes)
            break
        except NoRoom as stop:
            if not stop.rows:
                raise KbbError(str(stop)) from None
            for row in stop.rows:
                stay[row] = stop.reasons.get(row, "no room")
            candidates = setdiff1d(ctx.candidates, np.array(sorted(stay), np.int64))
            moves = ctx.moves = analysis.plan(candidates, ctx.relaid)
    promotions = ctx.promotions
    if len(placed["no_room"]) and promotions is not None and len(promotions):
        # A region too full for all its functions: what promoted calls add there is
        # given up before any function's layout is (all placed again; promotions
        # only ever shrink, so this ends).
        text = ctx.text
        full = unique(text.region_index(model.functions.start[np.array(placed["no_room"])]))
        site_region = text.region_index(model.insns.addr[promotions.site])
        drop = isin(site_region, full)
        if drop.any():
            ctx.promotions = promotions.without(drop, "no room in its region")
            ctx.result.icp_skipped = ctx.promotions.skipped
            ctx.moves = first_moves
            # (functions that keep their promotions keep their layouts' sizes)
            changed = set(model.function_of_insn[promotions.site[drop]].tolist())
            return emit_moved(ctx, {key: value for key, value in sizes.items()
                                    if key[1] not in changed})
    in_place = set(moves.in_place.tolist())
    ctx.moves = moves = placed["plan"]
    for row, reason in stay.items():
        ctx.leave_alone([row], reason)
    ctx.leave_alone(placed["no_room"], "stays: no room in its region")
    for reason, rows in moves.pinned.items():
        ctx.leave_alone([r for r in rows if r not in in_place], f"stays: {reason}")
    emission.free = placed["free"]
    trim()
    result.fragments = int((emission.frag_len > 0).sum())
    result.fragment_bytes = int(emission.frag_len.sum())
    result.in_place = len(in_place & set(emission.rows.tolist()))
    result.moved_functions = len(emission) - result.in_place
    result.fallback = emission.fallback
    ctx.emission = emission


def predict_dyno_stats(ctx: RewriteContext) -> None:
    """profile_layout, emission -> result.dyno (before, after)."""
    if ctx.profile_layout is None:
        raise KbbError("--dyno-stats needs a profile (--profile)")
    from kbuild_bolt.profile.dyno import (MemoryCounter, dyno_stats, whole_run_taken,
                                          with_promoted_calls)

    model, cfg, profile = ctx.model, ctx.cfg, ctx.profile_layout.profile
    memory = MemoryCounter(model)
    before = dyno_stats(model, cfg, profile, memory=memory)
    after = dyno_stats(model, cfg, profile, memory=memory,
                       orders={row: ctx.orders[row] for row in ctx.emission.rows.tolist()},
                       reverse_sites=reversible_sites(ctx))
    promoted = ctx.emission.promoted[:, 4]
    if len(promoted):
        after = with_promoted_calls(after, int(ctx.promotions.calls[promoted].sum()),
                                    int(ctx.promotions.hits[promoted].sum()))
    ctx.result.dyno = (before, after)
    ctx.result.taken_prediction = whole_run_taken(model, profile, before, after)


def fit_metadata(ctx: RewriteContext) -> None:
    """emission -> metadata (the rewriters of this run; they may shrink the emission)."""
    if not ctx.options.keep_record:
        _drop_layout_inputs(ctx)    # (the rewriters read the emission, not the CFGs)
    ctx.metadata = metadata_rewriters(ctx.options)
    for rewriter in ctx.metadata:
        rewriter.post_emit(ctx)


def update(ctx: RewriteContext) -> None:
    """emission, metadata -> output (a finished temporary file), rewritten_rows, fragments."""
    moved = len(ctx.emission) > 0
    # (debug sections emptied or written again when code moved: no need to copy them)
    from kbuild_bolt.dwarf import UPDATED

    drop = (True if ctx.options.strip_debug else set(UPDATED)) if moved else False
    if ctx.options.keep_record:
        record_layout(ctx)
    _drop_layout_inputs(ctx)
    trim()
    if moved and ctx.options.verify and len(ctx.emission.code) <= NEW_CODE_DECODED_BESIDE:
        _decode_new_code_beside(ctx)
    ctx.output = OutputImage(ctx.model.image, ctx.output_path, drop_debug=drop)
    if moved:  # (nothing moved: the output is the input, byte for byte)
        amap = AddressMap(ctx.model, ctx.emission)
        ctx.symbol_values = symbol_values(ctx, amap)
        ctx.new_symbols = cold_symbols(ctx)
        ctx.result.sympos_changed = sympos_changes(ctx)
        for rewriter in ctx.metadata:
            rewriter.update(ctx, amap)
            ctx.release_file_pages()
        del amap
        # The rewriters have what they need of the new code: their memory goes to
        # the debug sections' update.
        ctx.emission.drop_items()
        trim()
    path = ctx.output.finish()
    shutil.copymode(ctx.model.image.path, path)
    if moved:
        changes = FileChanges()
        for rewriter in ctx.metadata:
            rewriter.finalize(ctx, changes)
        if changes:
            ctx.output.repack(changes.empty, changes.replace, changes.info)
        # A new binary, a new build-id (last: it hashes the finished file, on a
        # thread while verification starts; see finish_build_id).
        note = build_id(ctx.model.image)
        if note is not None:
            ctx.pending_build_id = PendingStamp(path, note)
    ctx.rewritten_rows = ctx.emission.rows.tolist()
    ctx.fragments = ctx.emission.fragments()
    ctx.moved_ranges = ctx.emission.free if ctx.emission.placed else None
    # Verification decodes the output beside the input: free the new code, and
    # what only the layout needed, first.
    ctx.emission = ctx.metadata = None
    ctx.cfg = ctx.orders = ctx.move_analysis = ctx.moves = ctx.profile_layout = None
    ctx.hot_len = {}
    trim()


# New code up to this size is decoded beside the update (a layout of blocks: a few
# MB at most). A whole-kernel layout places tens of MB anew: their decoding, held
# from then on and forked with verification, was 117 MB more at Debian's
# kernel's peak for a second saved.
NEW_CODE_DECODED_BESIDE = 8 << 20


def _decode_new_code_beside(ctx: RewriteContext) -> None:
    """The new code decoded on the other CPU while the output is made: the
    decoding of the output during verification takes it where the output's
    bytes are the same (binary.model.KnownCode), instead of decoding them
    after everything else."""
    from kbuild_bolt.binary.model import KnownCode

    e = ctx.emission
    at = e.code_base if e.placed else e.start
    ctx.start_beside("new code", KnownCode.decode, e.code,
                     np.concatenate([at, e.frag_base]).astype(np.uint64),
                     np.concatenate([e.code_off, e.frag_off]),
                     np.concatenate([e.code_len, e.frag_len]))


def _drop_layout_inputs(ctx: RewriteContext) -> None:
    """The layout is in the emission: what only made it (CFGs, orders, the
    profile's counts) goes before the output's pages are written (the metadata
    rewriters read the emission and the model)."""
    ctx.cfg = ctx.orders = ctx.move_analysis = ctx.moves = ctx.profile_layout = None
    if ctx.own_session:
        ctx.session.cfg = None   # (a session of this run alone: no later rewrite needs it)


def record_layout(ctx: RewriteContext) -> None:
    """model, cfg, profile_layout, orders, emission -> result.record (for a report)."""
    e = ctx.emission
    moved = e is not None and len(e) > 0
    ctx.result.record = LayoutRecord(
        ctx.model, ctx.cfg,
        ctx.profile_layout.profile if ctx.profile_layout is not None else None,
        {row: ctx.orders[row] for row in e.rows.tolist()} if moved else {},
        AddressMap(ctx.model, e) if moved else None,
        np.array(e.fragments() if moved else [], np.uint64).reshape(-1, 2),
        reversible_sites(ctx))


def cold_symbols(ctx: RewriteContext) -> list[tuple[str, int, int, int]]:
    """A name for every cold part, GCC's way: ``name.cold`` (``name.cold.N`` when
    taken) -- (name, address, size, section index)."""
    e = ctx.emission
    image = ctx.model.image
    names = ctx.model.functions.names
    taken = set(image.symbols.names)
    out = []
    for f in np.flatnonzero(e.frag_len > 0).tolist():
        base = f"{names[int(e.rows[f])]}.cold"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}.{k}"
        taken.add(name)
        at = int(e.frag_base[f])
        out.append((name, at, int(e.frag_len[f]), image.section_at(at).index))
    return out


def sympos_changes(ctx: RewriteContext) -> list[str]:
    """Names whose same-named functions changed their order by address (livepatch
    addresses a static function as name + sympos, its rank in that order)."""
    symbols = ctx.model.image.symbols
    funcs = np.flatnonzero(symbols.type == 2)
    # (only functions whose name key another shares can share their name: the
    # names of the few grouped, not of every function)
    keys = symbols.name_keys[funcs]
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    shared = np.zeros(len(funcs), bool)
    shared[1:] = ordered[1:] == ordered[:-1]
    shared[:-1] |= shared[1:]
    funcs = np.sort(funcs[order[shared]])
    names = symbols.names
    groups: dict[str, list[int]] = {}
    for i in funcs.tolist():
        groups.setdefault(names[i], []).append(i)
    changed = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        old = symbols.value[members]
        new = ctx.symbol_values[members]
        if not np.array_equal(np.argsort(old, kind="stable"), np.argsort(new, kind="stable")):
            changed.append(name)
    return changed


def symbol_values(ctx: RewriteContext, amap) -> np.ndarray:
    """Every symbol's value in the output: symbols of code that moved follow it.
    Section symbols and markers at region edges stay (a marker and the first
    function after it share an address; only the function moves)."""
    symbols = ctx.model.image.symbols
    values = symbols.value.copy()
    defined = (symbols.shndx > 0) & (symbols.shndx < 0xFF00) & (symbols.type != 3)
    marker = np.zeros(len(values), bool)
    if ctx.text is not None:
        from kbuild_bolt.kernel.text import region_markers

        marker = region_markers(ctx.model.image, ctx.text)
        defined &= ~marker
    idx = np.flatnonzero(defined)
    new, ok = amap.translate(values[idx])
    values[idx[ok]] = new[ok]
    # (references to a marker keep naming the region edge: in_sched_functions(),
    # core_kernel_text() and the like compare addresses with it)
    ctx.fixed_symbols = marker
    return values


def finish_build_id(ctx: RewriteContext) -> None:
    """The output's build-id written into it (update left it hashing)."""
    if ctx.pending_build_id is not None:
        pending, ctx.pending_build_id = ctx.pending_build_id, None
        ctx.result.build_id = (pending.note.hex(), pending.write().hex())


def verify_output(ctx: RewriteContext) -> None:
    """output, rewritten_rows, fragments -> result.verify_summary (or an error)."""
    from kbuild_bolt.rewrite.verify import verify

    ctx.say("verifying")
    path = ctx.output.tmp
    if ctx.debug_sample is not None:
        ctx.debug_sample.start_output(str(path))     # (in the background)
    beside = []
    if ctx.code_image is not None and ".orc_unwind_ip" in ctx.model.tables:
        # ORC read back from the output: each moved instruction keeps its state
        from kbuild_bolt.rewrite.verify_orc import OrcTable, orc_follows_code

        def orc_check(output, code_image=ctx.code_image):
            return ("ORC states follow moved code",
                    *orc_follows_code(OrcTable(str(ctx.input_path)), OrcTable(str(output)),
                                      code_image))
        beside.append(orc_check)
    # (the build-id is written when verification reads it: it is hashed meanwhile)
    report = verify(path, against=ctx.model, expect_rewritten=set(ctx.rewritten_rows),
                    fragments=ctx.fragments, moved_ranges=ctx.moved_ranges, beside=beside,
                    stamp_build_id=lambda: finish_build_id(ctx),
                    known_code=ctx.take_beside("new code", lambda: None))
    ctx.code_image = None
    ctx.result.verify_summary = report.summary()
    if not report.ok:
        keep = os.environ.get("KBUILD_BOLT_KEEP_REJECTED")
        if keep:  # for debugging the rewriter: keep what failed verification
            shutil.copyfile(path, keep)
        print(report.summary(), file=sys.stderr)
        raise KbbError(f"verification failed, nothing written: {report.first_problem()}")
    if ctx.debug_sample is not None:
        report = ctx.debug_sample.report()
        ctx.debug_sample = None
        ctx.result.debug_check = (
            f"inline chains equal at {report.checked:,} sampled moved instructions"
            if report.ok else f"{len(report.problems):,} of {report.checked:,} sampled "
            "instructions have another inline chain")
        if not report.ok:
            print(report.summary(), file=sys.stderr)
            raise KbbError(f"verification of the debug info failed, nothing written: "
                           f"{report.problems[0]}")


def write_output(ctx: RewriteContext) -> None:
    """output -> the output file in place; the result's totals."""
    finish_build_id(ctx)
    ctx.output.commit()
    ctx.committed = True
    result, functions = ctx.result, ctx.model.functions
    result.rewritten = len(ctx.rewritten_rows)
    result.rewritten_names = [functions.names[row] for row in ctx.rewritten_rows]
    in_text = functions.section == ctx.model.image.section(".text").index
    handled = np.zeros(len(functions), bool)
    handled[ctx.rewritten_rows + ctx.unchanged_rows] = True
    result.text_coverage = float((handled & in_text).sum() / max(1, in_text.sum()))


PASSES = (
    Pass("read", read_input),
    Pass("check", check_input),
    Pass("discover", discover),
    Pass("profile", attach_profile, when=lambda ctx: ctx.options.reorder_blocks == "ext-tsp"),
    Pass("layout", lay_out_blocks),
    Pass("promote", promote_calls, when=lambda ctx: ctx.options.indirect_call_promotion != "none"
         and (ctx.profile_layout is not None or ctx.options.icp_every_site)),
    Pass("functions", lay_out_functions, when=lambda ctx: ctx.options.moves_functions),
    Pass("emit", emit),
    Pass("dyno", predict_dyno_stats, when=lambda ctx: ctx.options.dyno_stats),
    Pass("fit", fit_metadata),
    Pass("update", update),
    Pass("verify", verify_output, when=lambda ctx: ctx.options.verify),
    Pass("write", write_output),
)


# The rewrite's decisions without its output: what a report of a layout needs.
PLAN_PASSES = PASSES[:[p.name for p in PASSES].index("fit") + 1] + (
    Pass("record", record_layout),)


def plan(input_path, options: RewriteOptions) -> RewriteResult:
    """Every pass up to the new code (fit included), timed, and result.record;
    nothing is written."""
    return rewrite(input_path, None, replace(options, keep_record=True), passes=PLAN_PASSES)


def rewrite(input_path, output_path, options: RewriteOptions,
            session: Session | None = None, passes=PASSES) -> RewriteResult:
    if options.reorder_blocks == "ext-tsp" and options.profile is None:
        raise KbbError("--reorder-blocks=ext-tsp needs a profile (--profile)")
    tune_heap()
    ctx = RewriteContext(input_path, output_path, options, session=session)
    if ProgressBar.wanted(options):
        ctx.bar = ProgressBar(len(passes))
    try:
        for step in passes:
            if ctx.bar is not None:
                ctx.bar.start(step.name)
            if step.when is None or step.when(ctx):
                started = time.perf_counter()
                step.run(ctx)
                ctx.release_file_pages()
                ctx.result.seconds[step.name] = time.perf_counter() - started
            if ctx.bar is not None:
                ctx.bar.finish_step()
    finally:
        if ctx.bar is not None:
            ctx.bar.clear()
        for rewriter in ctx.metadata or ():
            rewriter.close()
        if ctx.debug_sample is not None:
            ctx.debug_sample.cancel()
        ctx.cancel_beside()
        if ctx.output is not None and not ctx.committed:
            ctx.output.discard()
        if ctx.frozen:
            thaw()
    return ctx.result


# ---------------------------------------------------------------------------
# What emission needs to know about the code around the functions it moves.


def choose_order(strategy: str, blocks: list[int], rng: random.Random) -> list[int]:
    if strategy == "none":
        return block_orders.order_none(blocks)
    if strategy == "reverse":
        return block_orders.order_reverse(blocks)
    if strategy == "random":
        return block_orders.order_random(blocks, rng)
    raise KbbError(f"--reorder-blocks={strategy} needs a profile (--profile)")


def alignment_fill(model, rows: np.ndarray) -> np.ndarray:
    """int3/nop fill per instruction, where it matters: between functions (room to
    grow) and inside the functions ``rows`` (blocks of fill nobody reaches are
    dropped). False everywhere else."""
    # (a lookup per function row; the last slot stands for -1: no function)
    fill_checked = np.zeros(len(model.functions) + 1, bool)
    fill_checked[rows] = True
    fill_checked[-1] = True
    return model.fill_insn & fill_checked[model.function_of_insn]


def slot_ends(model, fill_insn: np.ndarray) -> np.ndarray:
    """End of each function's slot: its end plus the fill after it, up to the next symbol."""
    functions = model.functions
    labels = model.symbol_values
    ends = functions.end.astype(np.uint64)
    nxt = labels[np.minimum(np.searchsorted(labels, ends, side="left"), len(labels) - 1)]
    nxt = np.where(nxt >= ends, nxt, ends)
    insns = model.insns
    n = len(insns.addr)
    if not n:
        return ends.copy()
    # The last instruction of each run of back-to-back fill instructions: fill
    # that no fill right behind it continues.
    joined = np.zeros(n, bool)
    joined[:-1] = fill_insn[1:] & insns.follows_on()[1:]
    last = np.flatnonzero(fill_insn & ~joined)
    i = np.searchsorted(insns.addr, ends)
    at = np.minimum(i, n - 1)
    starts_run = (i < n) & (insns.addr[at] == ends) & fill_insn[at]
    if not starts_run.any():  # (a run starting there also means ``last`` is not empty)
        return ends.copy()
    # A run that starts at ``at`` ends with the first run-last instruction at or after it.
    run_end = insns.end_of(last[np.minimum(np.searchsorted(last, at), len(last) - 1)])
    return np.where(starts_run, np.minimum(run_end, nxt), ends).astype(np.uint64)
