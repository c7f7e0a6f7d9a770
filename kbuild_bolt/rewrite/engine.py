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

import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.binary.cfg import REASONS, build_cfg
from kbuild_bolt.binary.model import BinaryModel, in_sorted
from kbuild_bolt.elf.writer import OutputImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.kernel.tables import orc as orc_table
from kbuild_bolt.layout import orders
from kbuild_bolt.memory import trim
from kbuild_bolt.rewrite import relocations as relocs
from kbuild_bolt.rewrite import tables as table_update
from kbuild_bolt.rewrite.addressmap import AddressMap
from kbuild_bolt.rewrite.emit import BlockTable, emit_functions
from kbuild_bolt.rewrite.holes import HoleAllocator, find_holes
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86.patterns import is_fill


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
    trim()
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
        if layout_fn is not None:
            by_profile = layout_fn.for_function(row)
            order = by_profile(blocks) if by_profile else blocks  # never ran: keep its order
        elif len(blocks) <= 2 or options.reorder_blocks == "none":
            order = blocks  # (the entry block stays first: nothing to reorder)
        else:
            # One generator per function: its order does not depend on which other
            # functions are selected (bisect rewrites subsets and must see the same).
            rng = random.Random(f"{options.seed}:{names[row]}")
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
    # (a lookup per function row; the last slot stands for -1: no function)
    fill_checked = np.zeros(len(functions) + 1, bool)
    fill_checked[rows_candidates] = True
    fill_checked[-1] = True
    check = np.flatnonzero(fill_checked[model.function_of_insn])
    check = check[np.isin(insns.flow[check], (x86.NEXT, x86.INTERRUPT))]
    fill_insn[check] = is_fill(model, check)
    del check, fill_checked
    slots = slot_ends(model, fill_insn)

    is_site = np.zeros(len(insns), bool)
    for data in model.tables.values():
        for ref in data.spec.refs:
            if ref.role in (base.SITE, base.BRANCH, base.RANGE):
                idx = model.insn_index(data.targets(ref.field))
                is_site[idx[idx >= 0]] = True

    cand_start = functions.start[rows_candidates]
    cand_end = functions.end[rows_candidates]

    def moved_interior(addrs: np.ndarray) -> np.ndarray:
        i = np.searchsorted(cand_start, addrs, side="right").astype(np.int64) - 1
        at = np.maximum(i, 0)
        return (i >= 0) & (cand_start[at] < addrs) & (addrs < cand_end[at])

    block_table = BlockTable(model, cfg, is_site, fill_insn)
    holes = find_holes(model) if options.split else []
    result.free_room = sum(b - a for a, b in holes)
    _say(options, f"laying out {len(wanted_orders):,} functions ({options.reorder_blocks})")
    trim()
    emission, failures = emit_functions(model, cfg, block_table, wanted_orders, slots,
                                        moved_interior,
                                        HoleAllocator(holes) if options.split else None)
    del block_table, is_site
    trim()
    for row, reason in failures:
        result.left_alone[reason] += 1
        result.examples.setdefault(reason, names[row])
    result.fragments = int((emission.frag_len > 0).sum())
    result.fragment_bytes = int(emission.frag_len.sum())
    result.seconds["emit"] = time.perf_counter() - t
    t = time.perf_counter()

    if options.dyno_stats:
        if layout_fn is None:
            raise KbbError("--dyno-stats needs a profile (--profile)")
        from kbuild_bolt.profile.dyno import MemoryCounter, dyno_stats
        memory = MemoryCounter(model)
        before = dyno_stats(model, cfg, layout_fn.profile, memory=memory)
        after = dyno_stats(model, cfg, layout_fn.profile,
                           orders={row: wanted_orders[row] for row in emission.rows.tolist()},
                           memory=memory)
        result.dyno = (before, after)

    # --- ORC first: the table cannot grow, so the layout must fit it ----------------
    orc = None
    if ".orc_unwind_ip" in model.tables and ".orc_unwind" in model.tables and len(emission):
        while True:
            try:
                orc = orc_table.regenerate(model, emission.runs, emission.branch_states,
                                           emission.moved_ranges())
                break
            except orc_table.OrcCapacityError:
                # Leave alone the functions whose new layout costs the most entries
                # (an entry per copied run and per emitted branch at most).
                cost = np.argsort(-emission.items_per_function(), kind="stable")
                drop = cost[:max(1, len(emission) // 20)]
                for row in emission.rows[drop].tolist():
                    result.left_alone["orc-table-full"] += 1
                    result.examples.setdefault("orc-table-full", names[row])
                keep = np.ones(len(emission), bool)
                keep[drop] = False
                emission = emission.select(keep)

    # --- update --------------------------------------------------------------------
    amap = AddressMap(model, emission)
    # (debug sections are emptied when code moved: no need to copy them)
    out = OutputImage(model.image, output_path, drop_debug=len(emission) > 0)
    try:
        if len(emission):  # (nothing moved: the output is the input, byte for byte)
            _apply(model, emission, amap, out, result, options, slots, orc)
        result.seconds["update"] = time.perf_counter() - t
        t = time.perf_counter()
        tmp = out.finish()
        shutil.copymode(model.image.path, tmp)
        if len(emission):
            result.stripped = out.strip_debug()
        rewritten_rows = emission.rows.tolist()
        fragments = emission.fragments()
        # Verification decodes the output beside the input: free the new code first.
        del emission, amap, orc
        trim()
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


def _apply(model, emission, amap, out, result, options, slots, orc) -> None:
    insns = model.insns
    e = emission
    code = e.code
    # 1. New code, int3 after it up to the old end.
    for row, start, end, off, n, frag, frag_off, frag_len in zip(
            e.rows.tolist(), e.start.tolist(), e.end.tolist(), e.code_off.tolist(),
            e.code_len.tolist(), e.frag_base.tolist(), e.frag_off.tolist(),
            e.frag_len.tolist()):
        new_end = start + n
        out.write_at(start, code[off:off + n].tobytes())
        # int3 after the new code: up to the old end, or, when the code grew into
        # the fill after it, over the rest of that fill (no half nop left behind).
        fill_end = end if new_end <= end else int(slots[row])
        if fill_end > new_end:
            out.write_at(new_end, b"\xcc" * (fill_end - new_end))
        if frag_len:
            out.write_at(frag, code[frag_off:frag_off + frag_len].tobytes())
    result.bytes_changed += int(e.code_len.sum() + e.frag_len.sum())
    result.inserted_jumps += int(e.inserted_jumps.sum())
    result.dropped_bytes += int(e.dropped_bytes.sum())
    # 2. PC-relative fields between two rewritten functions.
    _, field_addr, size, next_ip, target = e.deferred
    _retarget(amap, out, field_addr, size, next_ip, target,
              dropped=lambda k: f"reference at {int(field_addr[k]):#x} to dropped code "
                                f"{int(target[k]):#x}",
              unreachable=lambda k: f"reference at {int(field_addr[k]):#x} cannot reach its "
                                    "moved target")
    # 3. Code that stays but points into moved code without a relocation.
    rewritten = np.zeros(len(model.functions) + 1, bool)
    rewritten[e.rows] = True
    refs = np.flatnonzero(~rewritten[model.function_of_insn] & (insns.field_size > 0))
    refs = refs[amap.moved(insns.ref[refs])]
    field_addr = insns.addr[refs] + insns.field_off[refs]
    # (a field that carries a relocation is rewritten by the relocation pass)
    unrelocated = ~in_sorted(model.code_relocations.offset, field_addr)
    refs, field_addr = refs[unrelocated], field_addr[unrelocated]

    def unreachable(k: int) -> str:
        return f"{model.symbolize(int(insns.addr[refs[k]]))} cannot reach moved code"

    _retarget(amap, out, field_addr, insns.field_size[refs],
              insns.addr[refs] + insns.length[refs], insns.ref[refs],
              dropped=unreachable, unreachable=unreachable)
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
    _grow_symbols(model, out, emission)
    if options.plant_fault:
        _plant_fault(model, amap, out, options.plant_fault)


def _retarget(amap, out, field_addr, size, next_ip, target, dropped, unreachable) -> None:
    """Point PC-relative fields (``size`` bytes at ``field_addr``, relative to
    ``next_ip``) at where their old ``target`` moved. Raises with ``dropped(k)`` or
    ``unreachable(k)`` for the first field whose target is gone or out of reach."""
    if not len(target):
        return
    new_target, ok = amap.translate(target)
    if not ok.all():
        raise KbbError(dropped(int(np.flatnonzero(~ok)[0])))
    disp = (new_target - next_ip).view(np.int64)
    size = np.asarray(size).astype(np.int64)
    limit = np.left_shift(1, 8 * size - 1)
    bad = (disp < -limit) | (disp >= limit)
    if bad.any():
        raise KbbError(unreachable(int(np.flatnonzero(bad)[0])))
    for width in np.unique(size).tolist():
        sel = size == width
        out.write_fields(field_addr[sel], int(width), disp[sel])


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


def _grow_symbols(model, out, emission) -> None:
    """A function whose new code runs into the fill after it gets the new size."""
    from kbuild_bolt.elf.image import SYM

    image = model.image
    symtab = image.symtab
    symbols = image.symbols
    records = np.frombuffer(out.mem, SYM, len(symbols), symtab.offset)
    grown = list(zip(emission.start.tolist(), (emission.end - emission.start).tolist(),
                     emission.code_len.tolist()))
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
