"""The rewrite: lay functions out again and keep everything that points into them right.

Phases (BOLT's, for a kernel):
1. read: the binary model (functions, decoded code, kernel tables) and CFGs;
2. layout: a block order per selected simple function;
3. emit: each function's new bytes inside its own slot (function start and
   size unchanged; growth may use the fill after it), or the function is left
   byte-for-byte alone with a reason;
4. update: code that points into moved code, every relocation (records and
   bytes), ORC regenerated, __ex_table re-sorted; every other table is data
   with relocations and follows through them;
5. verify the output, then rename it into place.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.binary.cfg import REASONS, build_cfg
from kbuild_bolt.binary.model import BinaryModel, default_jobs
from kbuild_bolt.elf.writer import OutputImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.kernel.tables import orc as orc_table
from kbuild_bolt.layout import orders
from kbuild_bolt.rewrite import relocations as relocs
from kbuild_bolt.rewrite import tables as table_update
from kbuild_bolt.rewrite.addressmap import AddressMap
from kbuild_bolt.rewrite.emit import BlockTable, EmitContext, EmitError, plan_function
from kbuild_bolt.rewrite.holes import HoleAllocator, find_holes
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86.patterns import is_fill
from kbuild_bolt.x86 import encode as enc


@dataclass
class RewriteOptions:
    reorder_blocks: str = "ext-tsp"
    seed: int = 0
    funcs: set[str] | None = None
    skip_funcs: set[str] = field(default_factory=set)
    profile: object = None
    verify: bool = True
    # Testing hook for bisect: leave this many table entries stale on purpose.
    plant_fault: str | None = None
    progress: bool = True
    # Put blocks that do not fit a function's slot into free room in .text.
    split: bool = True
    jobs: int | None = None
    dyno_stats: bool = False


@dataclass
class RewriteResult:
    functions: int = 0
    rewritten: int = 0
    unchanged: int = 0
    left_alone: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    bytes_changed: int = 0
    inserted_jumps: int = 0
    dropped_bytes: int = 0
    tables: dict = field(default_factory=dict)
    relocations_changed: int = 0
    fields_rewritten: int = 0
    stripped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    rewritten_names: list = field(default_factory=list)
    # Share of .text functions handled (rewritten or already in the chosen order).
    text_coverage: float = 0.0
    profile_used: float | None = None
    dyno: tuple | None = None   # (before, after) predicted dyno-stats
    orc_entries: tuple = (0, 0)
    verify_summary: str = ""
    fragments: int = 0
    fragment_bytes: int = 0
    free_room: int = 0

    def brief(self) -> str:
        """One line for build logs (``kbuild-bolt rewrite -q``)."""
        parts = [f"{self.rewritten:,} functions rewritten",
                 f"{sum(self.left_alone.values()):,} left alone"]
        if self.profile_used is not None:
            parts.append(f"profile {100 * self.profile_used:.1f}% used")
        if self.dyno:
            before, after = self.dyno
            if before.get("ALL_TAKEN"):
                change = 100 * (after["ALL_TAKEN"] / before["ALL_TAKEN"] - 1)
                parts.append(f"taken branches {change:+.1f}% (predicted)")
        if self.stripped:
            parts.append("debug info removed")
        parts.append(self.verify_summary.splitlines()[0].replace(":", "", 1)
                     if self.verify_summary else "not verified")
        return ", ".join(parts)

    def summary(self) -> str:
        lines = [f"functions: {self.functions:,} in .text/.init.text/.exit.text"]
        lines.append(f"  rewritten                 {self.rewritten:>9,}   "
                     f"({100 * self.text_coverage:.1f}% of .text handled)")
        lines.append(f"  same layout (unchanged)   {self.unchanged:>9,}")
        for reason, count in self.left_alone.most_common():
            example = self.examples.get(reason, "")
            lines.append(f"  left alone: {reason:<24} {count:>9,}   e.g. {example}")
        if self.fragments:
            lines.append(f"cold fragments: {self.fragments:,} functions placed "
                         f"{self.fragment_bytes:,} bytes in free room of .text "
                         f"({self.free_room:,} bytes free)")
        lines.append(f"bytes changed: {self.bytes_changed:,} "
                     f"(jumps added {self.inserted_jumps:,}, bytes dropped {self.dropped_bytes:,})")
        lines.append(f"relocations updated: {self.relocations_changed:,} "
                     f"({self.fields_rewritten:,} fields recomputed)")
        if self.tables:
            lines.append("tables updated: " + ", ".join(f"{k} {v:,}" for k, v in self.tables.items()))
        lines.append(f"ORC entries: {self.orc_entries[0]:,} used of {self.orc_entries[1]:,} "
                     "(regenerated; the table keeps its size)")
        if self.stripped:
            lines.append(f"debug sections removed (they described the old layout): "
                         f"{', '.join(self.stripped)}")
        if self.verify_summary:
            lines.append(self.verify_summary)
        if self.dyno:
            from kbuild_bolt.profile.dyno import format_comparison
            lines.append(format_comparison(*self.dyno, "before", "after (predicted)"))
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _say(options, message):
    if options.progress:
        print(f"  BOLT    {message}", file=sys.stderr, flush=True)


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
    # End of the run of back-to-back fill instructions that starts at each instruction.
    insn_end = insns.addr + insns.length.astype(np.uint64)
    joined = np.zeros(n, bool)
    joined[:-1] = fill_insn[1:] & (insn_end[:-1] == insns.addr[1:])
    last = np.flatnonzero(fill_insn & ~joined)            # last instruction of each run
    i = np.searchsorted(insns.addr, ends)
    at = np.minimum(i, n - 1)
    starts_run = (i < n) & (insns.addr[at] == ends) & fill_insn[at]
    if not starts_run.any():  # (a run starting there also means ``last`` is not empty)
        return ends.copy()
    # A run that starts at ``at`` ends with the first run-last instruction at or after it.
    run_end = insn_end[last[np.minimum(np.searchsorted(last, at), len(last) - 1)]]
    return np.where(starts_run, np.minimum(run_end, nxt), ends).astype(np.uint64)


@dataclass
class _EmitState:
    model: object
    cfg: object
    is_site: np.ndarray
    in_unit: np.ndarray
    fill: np.ndarray
    moved_interior: object
    blocks: object
    slots: np.ndarray
    split: bool


_STATE: _EmitState | None = None


def _emit_chunk(work) -> tuple[list, list]:
    """Emit a list of (row, order) with fragments in ``holes`` (runs in a worker)."""
    pairs, holes = work
    st = _STATE
    model = st.model
    functions = model.functions
    allocator = HoleAllocator(holes) if st.split else None
    sections = {}
    plans, failures = [], []
    for row, order in pairs:
        sec = model.image.sections[int(functions.section[row])]
        if sec.index not in sections:
            sections[sec.index] = bytes(model.image.section_data(sec))
        ctx = EmitContext(model, st.cfg, st.is_site, st.in_unit, st.fill, sections[sec.index],
                          sec.addr, st.moved_interior, st.blocks)
        # Too big for its slot: the blocks that do not fit go to free room. (Only
        # .text: the free room is there, and relocations of code must stay in
        # their section's .rela.)
        room = allocator if sec.name == ".text" else None
        try:
            plans.append(plan_function(ctx, row, order, int(st.slots[row]), room))
        except EmitError as err:
            failures.append((row, err.reason))
    return plans, failures


def _emit_all(state: _EmitState, pairs, holes, jobs: int) -> tuple[list, list]:
    """Emit every function, in ``jobs`` forked workers, each with its share of the
    free room (so fragment placement needs no coordination)."""
    global _STATE
    _STATE = state
    try:
        if jobs <= 1 or len(pairs) < 256:
            return _emit_chunk((pairs, holes))
        shares = [[] for _ in range(jobs)]
        for a, b in holes:
            step = (b - a) // jobs // 16 * 16
            for k in range(jobs):
                lo = a + k * step
                hi = b if k == jobs - 1 else lo + step
                shares[k].append((lo, hi))
        chunks = [(pairs[k::jobs], shares[k]) for k in range(jobs)]
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(_emit_chunk, chunks))
    finally:
        _STATE = None
    plans = [p for r in results for p in r[0]]
    failures = [f for r in results for f in r[1]]
    plans.sort(key=lambda p: p.row)
    return plans, failures


def choose_order(strategy: str, blocks: list[int], rng: random.Random) -> list[int]:
    if strategy == "none":
        return orders.order_none(blocks)
    if strategy == "reverse":
        return orders.order_reverse(blocks)
    if strategy == "random":
        return orders.order_random(blocks, rng)
    raise KbbError(f"--reorder-blocks={strategy} needs a profile (--profile)")


class Session:
    """A vmlinux read once and rewritten many times (bisect)."""

    def __init__(self, input_path):
        self.model = BinaryModel.open(input_path, require_relocations=True)
        self.cfg = build_cfg(self.model)


def rewrite(input_path, output_path, options: RewriteOptions,
            session: Session | None = None) -> RewriteResult:
    result = RewriteResult()
    t0 = time.perf_counter()
    if session is None:
        _say(options, f"reading {input_path}")
        session = Session(input_path)
    model, cfg = session.model, session.cfg
    functions = model.functions
    result.functions = len(functions)
    result.seconds["read"] = time.perf_counter() - t0
    t = time.perf_counter()

    # --- what to rewrite -----------------------------------------------------
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
    for row in np.flatnonzero(~selected).tolist():
        result.left_alone["not selected"] += 1
        result.examples.setdefault("not selected", names[row])
    for row in np.flatnonzero(selected & (cfg.func_reason != 0)).tolist():
        reason = REASONS[int(cfg.func_reason[row])]
        result.left_alone[reason] += 1
        result.examples.setdefault(reason, names[row])
    candidates = np.flatnonzero(selected & (cfg.func_reason == 0))

    layout_fn = None
    if options.reorder_blocks == "ext-tsp":
        from kbuild_bolt.layout.exttsp import ProfileLayout
        from kbuild_bolt.profile import resolve_profile
        if options.profile is None:
            raise KbbError("--reorder-blocks=ext-tsp needs a profile (--profile)")
        profile = resolve_profile(options.profile, model, cfg,
                                  log=lambda m: _say(options, m))
        layout_fn = ProfileLayout(model, cfg, profile)
        result.profile_used = (profile.used if profile.used is not None
                               else layout_fn.profile.matched)
        _say(options, f"profile: {100 * layout_fn.profile.matched:.1f}% of its counts on this "
                      f"kernel's code, {len(layout_fn.hot_rows):,} functions ran")
    wanted_orders = {}
    unchanged_rows = []
    for row in candidates.tolist():
        blocks = list(cfg.blocks_of(row))
        # One generator per function: its order does not depend on which other
        # functions are selected (bisect rewrites subsets and must see the same).
        rng = random.Random(f"{options.seed}:{names[row]}")
        if layout_fn is not None:
            by_profile = layout_fn.for_function(row)
            order = by_profile(blocks) if by_profile else blocks  # never ran: keep its order
        else:
            order = choose_order(options.reorder_blocks, blocks, rng)
        if order == blocks:
            result.unchanged += 1
            unchanged_rows.append(row)
            continue
        wanted_orders[row] = order

    # --- emit --------------------------------------------------------------------
    insns = model.insns
    fill_insn = np.zeros(len(insns), bool)
    rows_candidates = np.array(sorted(wanted_orders), dtype=np.int64)
    # Alignment fill: between functions (room to grow) and in candidate functions
    # (blocks of fill nobody reaches are dropped).
    check = np.flatnonzero((model.function_of_insn < 0)
                           | np.isin(model.function_of_insn, rows_candidates))
    check = check[np.isin(insns.flow[check], (x86.NEXT, x86.INTERRUPT))]
    fill_insn[check] = is_fill(model, check)
    slots = slot_ends(model, fill_insn)

    is_site = np.zeros(len(insns), bool)
    for data in model.tables.values():
        for ref in data.spec.refs:
            if ref.role in (base.SITE, base.BRANCH, base.RANGE):
                idx = model.insn_index(data.targets(ref.field))
                is_site[idx[idx >= 0]] = True
    in_unit = model.inside_patch_unit(insns.addr)

    cand_start = functions.start[rows_candidates]
    cand_end = functions.end[rows_candidates]

    def moved_interior(addrs: np.ndarray) -> np.ndarray:
        i = np.searchsorted(cand_start, addrs, side="right").astype(np.int64) - 1
        at = np.maximum(i, 0)
        return (i >= 0) & (cand_start[at] < addrs) & (addrs < cand_end[at])

    block_table = BlockTable(model, cfg, is_site, in_unit)
    holes = find_holes(model) if options.split else []
    result.free_room = sum(b - a for a, b in holes)
    _say(options, f"laying out {len(wanted_orders):,} functions ({options.reorder_blocks})")
    state = _EmitState(model, cfg, is_site, in_unit, fill_insn, moved_interior, block_table,
                       slots, options.split)
    plans, failures = _emit_all(state, list(wanted_orders.items()), holes,
                                options.jobs or default_jobs())
    del state, block_table  # per-block lists for emission: large, not needed again
    for row, reason in failures:
        result.left_alone[reason] += 1
        result.examples.setdefault(reason, names[row])
    result.fragments = sum(1 for p in plans if p.fragment)
    result.fragment_bytes = sum(len(p.fragment[1]) for p in plans if p.fragment)
    result.seconds["emit"] = time.perf_counter() - t
    t = time.perf_counter()

    if options.dyno_stats:
        if layout_fn is None:
            raise KbbError("--dyno-stats needs a profile (--profile)")
        from kbuild_bolt.profile.dyno import MemoryCounter, dyno_stats
        memory = MemoryCounter(model)
        before = dyno_stats(model, cfg, layout_fn.profile, memory=memory)
        after = dyno_stats(model, cfg, layout_fn.profile,
                           orders={p.row: wanted_orders[p.row] for p in plans}, memory=memory)
        result.dyno = (before, after)

    # --- ORC first: the table cannot grow, so the layout must fit it ----------------
    orc = None
    if ".orc_unwind_ip" in model.tables and ".orc_unwind" in model.tables and plans:
        while True:
            try:
                orc = orc_table.regenerate(model, plans, _moved_ranges(model, plans))
                break
            except orc_table.OrcCapacityError:
                # Leave alone the functions whose new layout costs the most entries.
                cost = sorted(plans, key=lambda p: -(len(p.runs) + len(p.branch_states)))
                drop = {p.row for p in cost[:max(1, len(plans) // 20)]}
                for row in drop:
                    result.left_alone["orc-table-full"] += 1
                    result.examples.setdefault("orc-table-full", names[row])
                plans = [p for p in plans if p.row not in drop]

    # --- update --------------------------------------------------------------------
    amap = AddressMap(model, plans)
    out = OutputImage(model.image, output_path)
    try:
        if plans:  # (nothing moved: the output is the input, byte for byte)
            _apply(model, cfg, plans, amap, out, result, options, slots, orc)
        result.seconds["update"] = time.perf_counter() - t
        t = time.perf_counter()
        tmp = out.finish()
        shutil.copymode(model.image.path, tmp)
        if plans:
            result.stripped = out.strip_debug()
        rewritten_rows = [p.row for p in plans]
        fragments = [(p.fragment[0], p.fragment[0] + len(p.fragment[1]))
                     for p in plans if p.fragment]
        # Verification decodes the output beside the input: free the new code first.
        del plans, amap, orc
        if options.verify:
            from kbuild_bolt.rewrite.verify import verify
            _say(options, "verifying")
            report = verify(tmp, against=model, expect_rewritten=set(rewritten_rows),
                            fragments=fragments)
            result.verify_summary = report.summary()
            if not report.ok:
                keep = os.environ.get("KBUILD_BOLT_KEEP_REJECTED")
                if keep:  # for debugging the rewriter: keep what failed verification
                    shutil.copyfile(tmp, keep)
                print(report.summary(), file=sys.stderr)
                raise KbbError(f"verification failed, nothing written: {report.first_problem()}")
            result.seconds["verify"] = time.perf_counter() - t
        out.commit()
    except BaseException:
        out.discard()
        raise
    result.rewritten = len(rewritten_rows)
    result.rewritten_names = [names[row] for row in rewritten_rows]
    text = model.image.section(".text")
    in_text = functions.section == text.index
    handled = np.zeros(len(functions), bool)
    handled[rewritten_rows + unchanged_rows] = True
    result.text_coverage = float((handled & in_text).sum() / max(1, in_text.sum()))
    return result


def _moved_ranges(model, plans) -> list[tuple[int, int, int]]:
    """(start, old end, new end) of every rewritten slot and placed fragment."""
    ranges = []
    for p in plans:
        ranges.append((p.start, int(model.functions.end[p.row]), p.start + len(p.code)))
        if p.fragment:
            base, code = p.fragment
            ranges.append((base, base, base + len(code)))
    return ranges


def _apply(model, cfg, plans, amap, out, result, options, slots, orc) -> None:
    insns = model.insns
    functions = model.functions
    # 1. New code, int3 after it up to the old end.
    for p in plans:
        old_end = int(functions.end[p.row])
        new_end = p.start + len(p.code)
        out.write_at(p.start, p.code)
        # int3 after the new code: up to the old end, or, when the code grew into
        # the fill after it, over the rest of that fill (no half nop left behind).
        fill_end = old_end if new_end <= old_end else int(slots[p.row])
        if fill_end > new_end:
            out.write_at(new_end, b"\xcc" * (fill_end - new_end))
        if p.fragment:
            base, code = p.fragment
            out.write_at(base, code)
            result.bytes_changed += len(code)
        result.bytes_changed += len(p.code)
        result.inserted_jumps += p.inserted_jumps
        result.dropped_bytes += p.dropped_bytes
    # 2. PC-relative fields between two rewritten functions.
    for p in plans:
        for field_addr, size, next_ip, target in p.deferred:
            new_target, ok = amap.translate(np.array([target], dtype=np.uint64))
            if not ok[0]:
                raise KbbError(f"reference at {field_addr:#x} to dropped code {target:#x}")
            buf = bytearray(size)
            if not enc.put_disp(buf, 0, size, enc.rel(int(new_target[0]), next_ip)):
                raise KbbError(f"reference at {field_addr:#x} cannot reach its moved target")
            out.write_at(field_addr, bytes(buf))
    # 3. Code that stays but points into moved code without a relocation.
    relocated = _relocated_field_starts(model)
    outside = model.function_of_insn < 0
    if len(plans):
        rewritten_rows = np.array([p.row for p in plans])
        outside |= ~np.isin(model.function_of_insn, rewritten_rows)
    refs = np.flatnonzero(outside & (insns.field_size > 0))
    hit = refs[amap.moved(insns.ref[refs])]
    for i in hit.tolist():
        field_addr = int(insns.addr[i]) + int(insns.field_off[i])
        if field_addr in relocated:
            continue  # the relocation pass rewrites it
        new_target, ok = amap.translate(np.array([insns.ref[i]], dtype=np.uint64))
        size = int(insns.field_size[i])
        buf = bytearray(size)
        next_ip = int(insns.addr[i]) + int(insns.length[i])
        if not ok[0] or not enc.put_disp(buf, 0, size, enc.rel(int(new_target[0]), next_ip)):
            raise KbbError(f"{model.symbolize(int(insns.addr[i]))} cannot reach moved code")
        out.write_at(field_addr, bytes(buf))
    # 4. Relocations outside the kernel tables (records and fields).
    table_ranges = [(d.addr, d.addr + d.size) for d in model.tables.values()]
    updates = relocs.plan_updates(model, amap, skip_ranges=table_ranges)
    result.relocations_changed = sum(len(u.index) for u in updates)
    result.fields_rewritten = relocs.apply_updates(model, out, updates)
    # 5. Tables follow their code (and stay sorted); their records follow the bytes.
    result.tables = table_update.update_entries(model, amap, out)
    result.relocations_changed += table_update.recompute_records(model, out, set(result.tables))
    # 6. ORC for the new layout.
    if orc is not None:
        ips, states = orc
        _write_orc(model, out, ips, states)
        padding = int(np.sum(ips[1:] == ips[:-1]))
        result.orc_entries = (len(ips) - padding, len(ips))
    # 7. Functions that grew into the fill after them.
    _grow_symbols(model, out, plans)
    if options.plant_fault:
        _plant_fault(model, amap, out, options.plant_fault)


def _relocated_field_starts(model) -> set:
    """Addresses of code fields that carry a relocation."""
    r = model.code_relocations
    return set(r.offset.tolist())


def _write_orc(model, out, ips, states) -> None:
    """Write the ORC tables and their relocations (PC32 against the section symbol)."""
    ip_table = model.tables[".orc_unwind_ip"]
    orc_table_data = model.tables[".orc_unwind"]
    n = len(ips)
    where = np.uint64(ip_table.addr) + np.uint64(4) * np.arange(n, dtype=np.uint64)
    values = (ips - where).view(np.int64)
    out.array(ip_table.addr, "<i4", n)[:] = values.astype(np.int32)
    dest = out.array(orc_table_data.addr, orc_table_data.layout.dtype, n)
    for name in ("sp_offset", "bp_offset", "bits"):
        dest[name] = states[name]
    rela = [r for r in model.image.rela_sections
            if model.image.sections[r.info].name == ".orc_unwind_ip"]
    if not rela:
        return
    from kbuild_bolt.elf.image import RELA
    r = model.image.relocations(rela[0])
    if len(r) != n:
        raise KbbError(f".rela.orc_unwind_ip has {len(r)} entries for {n} ORC entries")
    records = np.frombuffer(out.mem, RELA, n, rela[0].offset)
    sec_sym = _section_symbols(model)
    sec_idx = model.section_index_of(ips)
    # Terminator entries sit at the end of a code section, just outside it.
    for k in np.flatnonzero(sec_idx < 0).tolist():
        ends = [sec.index for sec in model.image.sections
                if sec.is_alloc and sec.is_exec and sec.end == int(ips[k])]
        if ends:
            sec_idx[k] = ends[0]
    syms = np.array([sec_sym.get(int(s), 0) for s in sec_idx.tolist()], dtype=np.uint64)
    if (syms == 0).any():
        raise KbbError("ORC entry outside every section with a section symbol")
    sec_addr = np.array([model.image.sections[int(s)].addr for s in sec_idx.tolist()],
                        dtype=np.uint64)
    order = np.argsort(r["offset"])
    records["offset"][order] = where
    records["info"][order] = (syms << np.uint64(32)) | np.uint64(relocs.R_X86_64_PC32)
    records["addend"][order] = (ips - sec_addr).view(np.int64)


def _section_symbols(model) -> dict[int, int]:
    symbols = model.image.symbols
    idx = np.flatnonzero(symbols.type == 3)
    return {int(symbols.shndx[i]): int(i) for i in idx.tolist()}


def _grow_symbols(model, out, plans) -> None:
    """A function whose new code runs into the fill after it gets the new size."""
    from kbuild_bolt.elf.image import SYM

    image = model.image
    symtab = image.symtab
    symbols = image.symbols
    records = np.frombuffer(out.mem, SYM, len(symbols), symtab.offset)
    grown = [(p.start, int(model.functions.end[p.row] - model.functions.start[p.row]),
              len(p.code)) for p in plans]
    grown = [g for g in grown if g[2] > g[1]]
    if not grown:
        return
    # Every FUNC symbol naming a grown function (its aliases too): same address, same size.
    funcs = np.flatnonzero(symbols.type == 2)
    funcs = funcs[np.argsort(symbols.value[funcs], kind="stable")]
    values, sizes = symbols.value[funcs], symbols.size[funcs]
    starts = np.array([g[0] for g in grown], np.uint64)
    lo = np.searchsorted(values, starts, side="left").tolist()
    hi = np.searchsorted(values, starts, side="right").tolist()
    for (_start, old_size, new_size), a, b in zip(grown, lo, hi):
        for k in range(a, b):
            if int(sizes[k]) == old_size:
                records["size"][funcs[k]] = new_size


def _plant_fault(model, amap, out, fault: str) -> None:
    """Deliberately leave one table entry stale (to test verify and bisect).

    ``fault`` is ``KIND`` or ``KIND@FUNCTION``: the first entry of that table
    pointing into moved code (of FUNCTION, when given) keeps its old value."""
    kind, _, function = fault.partition("@")
    name = {"smp-lock": ".smp_locks", "bug": "__bug_table", "return": ".return_sites"}.get(kind)
    if name is None or name not in model.tables:
        raise KbbError(f"--plant-fault {kind}: this kernel has no such table")
    data = model.tables[name]
    field_name = data.spec.refs[0].field
    targets = data.targets(field_name)
    moved = amap.moved(targets)
    if function:
        row = model.functions.by_name(function)
        if row < 0:
            raise KbbError(f"--plant-fault: no function {function}")
        moved &= model.functions.rows_containing(targets) == row
    moved = np.flatnonzero(moved)
    if not len(moved):
        return  # nothing of that table moved in this rewrite
    index = int(data.indices[int(moved[0])])
    f = data.layout.field(field_name)
    field_addr = int(data.entry_address(index)) + f.offset
    old_value = int(data.entries[field_name][index])
    out.write_at(field_addr, int(old_value).to_bytes(f.size, "little", signed=True))
