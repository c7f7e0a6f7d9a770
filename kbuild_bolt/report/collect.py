"""Gather what the report shows: from a rewrite just done (its LayoutRecord), or
by running the layout analysis again without writing anything (``kbuild-bolt
report``), with a profile of the optimized kernel when there is one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np

from kbuild_bolt.arrays import unique

from kbuild_bolt import __version__
from kbuild_bolt.errors import KbbError
from kbuild_bolt.report import data

TOP_FUNCTIONS = 20       # hot functions whose block layouts are drawn
EXAMPLES = 5             # hottest functions named per left-alone reason


@dataclass
class Measured:
    """The optimized kernel profiled: its run and what it measured."""

    run: data.Run
    dyno: dict
    taken: dict              # measured_taken_branches of the run
    counters: dict           # the recorder's counters (simulated L1i)
    source: str


@dataclass
class ReportData:
    title: str
    facts: list                              # (what, value) for the page header
    before: data.Run
    predicted: data.Run | None               # the profile through the address map
    measured: Measured | None
    text: tuple[int, int]                    # the .text range the heatmaps cover
    counters: dict                           # the profile's recorder counters
    dyno: tuple | None                       # (before, after predicted)
    heatmaps: list = field(default_factory=list)     # data.Heatmap per run
    curves: dict = field(default_factory=dict)       # unit bytes -> data.FetchCurve per run
    taken_before: dict = field(default_factory=dict)
    taken_prediction: tuple | None = None    # whole run: (before, after predicted)
    layouts: list = field(default_factory=list)      # data.BlockLayout, hottest first
    left_alone: list = field(default_factory=list)   # (reason, count, fetches, examples)
    shares: list = field(default_factory=list)       # (what, fetches) of the run
    summary: list = field(default_factory=list)      # (what, value) headline numbers
    verify: str = ""
    timings: list = field(default_factory=list)      # (step, seconds)

    def runs(self) -> list[data.Run]:
        out = [self.before]
        if self.predicted is not None:
            out.append(self.predicted)
        if self.measured is not None:
            out.append(self.measured.run)
        return out


def from_rewrite(result, input_path, output_path, options, top: int = TOP_FUNCTIONS,
                 measured: Measured | None = None) -> ReportData:
    """The report of a rewrite done in this process (``options.keep_record``)."""
    started = time.perf_counter()
    record = result.record
    if record is None:
        raise KbbError("internal: the rewrite kept no record for a report")
    model, cfg = record.model, record.cfg
    profile = options.profile
    code_profile = record.code_profile
    if code_profile is None:
        from kbuild_bolt.profile.attach import attach
        from kbuild_bolt.profile.formats import resolve_profile

        code_profile = attach(model, resolve_profile(profile, model, cfg))
    before = data.executed("before (as built)", model, code_profile)
    amap = record.address_map
    predicted = data.carried("after (predicted)", before, amap.translate) \
        if amap is not None else replace(before, label="after (predicted)")
    text = model.image.section(".text")
    if text is None:
        raise KbbError(f"{input_path}: no .text section")
    report = ReportData(
        title=f"Linux {model.version.release}", facts=[], before=before, predicted=predicted,
        measured=measured, text=(text.addr, text.addr + text.size),
        counters=_counters(profile, model), dyno=result.dyno)
    bucket = data.bucket_size(report.text[1] - report.text[0])
    report.heatmaps = [data.heatmap(run, *report.text, bucket) for run in report.runs()]
    report.curves = {unit: [data.fetch_curve(run, unit) for run in report.runs()]
                     for unit in (64, 4096)}
    memory = _dyno(report, result, record, code_profile)
    _layouts(report, record, code_profile, top, memory, result.left_alone_rows)
    _left_alone(report, result, record)
    report.facts = _facts(result, input_path, output_path, options, model)
    if measured is not None:
        report.facts.insert(3, ("re-profile", f"{measured.source} (recorded on the output)"))
    report.summary = _summary(report, result, record)
    report.verify = "\n".join(x for x in (result.verify_summary, result.debug_check and
                                          f"DWARF checked: {result.debug_check}") if x) \
        or "not verified (--no-verify)"
    report.timings = list(result.seconds.items())
    report.timings.append(("report data", time.perf_counter() - started))
    return report


def standalone(vmlinux, options, optimized=None, reprofile=None, top: int = TOP_FUNCTIONS,
               log=None) -> ReportData:
    """``kbuild-bolt report``: the layout ``options`` give, analysed again (nothing
    written); with ``optimized``, that output verified against ``vmlinux``; with
    ``reprofile``, a profile of it, measured."""
    from kbuild_bolt.rewrite.engine import plan

    say = log or (lambda message: None)
    if reprofile is not None and optimized is None:
        raise KbbError("--reprofile needs --optimized (the kernel it was recorded on)")
    say("analysing the layout (nothing is written)")
    dyno = options.reorder_blocks == "ext-tsp"     # (the dyno pass needs the profile attached)
    result = plan(vmlinux, replace(options, dyno_stats=dyno or options.dyno_stats))
    model = result.record.model
    measured = None
    if optimized is not None:
        from kbuild_bolt.rewrite.verify import verify

        say(f"verifying {optimized} against {vmlinux}")
        started = time.perf_counter()
        outcome = verify(optimized, against=model)
        result.verify_summary = outcome.summary()
        result.seconds["verify"] = time.perf_counter() - started
        if reprofile is not None:
            say(f"measuring {reprofile} on {optimized}")
            started = time.perf_counter()
            measured = measure(optimized, reprofile, like=model)
            result.seconds["measure"] = time.perf_counter() - started
    else:
        result.verify_summary = "nothing written: give --optimized OUT to verify a rewrite"
    return from_rewrite(result, vmlinux, optimized, options, top=top, measured=measured)


def measure(optimized, reprofile, like=None) -> Measured:
    """A profile recorded on the optimized kernel, on that kernel's code."""
    from kbuild_bolt.binary.cfg import build_cfg
    from kbuild_bolt.binary.model import BinaryModel
    from kbuild_bolt.profile.attach import attach
    from kbuild_bolt.profile.dyno import dyno_stats, measured_taken_branches
    from kbuild_bolt.profile.formats import load_profile, resolve_profile

    model = BinaryModel.open(optimized, like=like)
    cfg = build_cfg(model)
    recorded = load_profile(reprofile, model)
    # (its counters from the file: matching moves counts, not the run's counters)
    code_profile = attach(model, resolve_profile(recorded, model, cfg))
    if code_profile.matched < 0.5:
        raise KbbError(f"{reprofile}: only {100 * code_profile.matched:.0f}% of it is on "
                       f"{optimized}'s code: a profile recorded on the optimized kernel?")
    return Measured(data.executed("after (measured)", model, code_profile),
                    dyno_stats(model, cfg, code_profile),
                    measured_taken_branches(model, code_profile), dict(recorded.stats),
                    str(reprofile))


def _counters(profile, model) -> dict:
    from kbuild_bolt.profile.formats import load_profile
    from kbuild_bolt.profile.model import Profile

    if isinstance(profile, Profile):
        return dict(profile.stats)
    return dict(load_profile(profile, model).stats) if profile else {}


def _dyno(report: ReportData, result, record, code_profile):
    from kbuild_bolt.profile.dyno import (MemoryCounter, dyno_stats, measured_taken_branches,
                                          whole_run_taken)

    model, cfg = record.model, record.cfg
    memory = MemoryCounter(model)
    if report.dyno is None:
        # (a layout made without the profile: its effect predicted the same way)
        before = dyno_stats(model, cfg, code_profile, memory=memory)
        after = dyno_stats(model, cfg, code_profile, memory=memory, orders=record.orders,
                           reverse_sites=record.reverse_sites)
        report.dyno = (before, after)
    report.taken_before = measured_taken_branches(model, code_profile)
    report.taken_prediction = result.taken_prediction or whole_run_taken(
        model, code_profile, *report.dyno)
    return memory


def _layouts(report: ReportData, record, code_profile, top: int, memory,
             left_alone_rows: dict) -> None:
    from kbuild_bolt.profile.dyno import dyno_stats

    model, cfg = record.model, record.cfg
    fetches = report.before.per_function()
    rows = [r for r in np.argsort(-fetches, kind="stable")[:top].tolist() if fetches[r] > 0]
    amap = record.address_map
    layouts = data.block_layouts(model, cfg, code_profile, rows, fetches, record.orders,
                                 translate=amap.translate if amap is not None else None,
                                 cold_ranges=record.cold)
    for layout in layouts:
        if code_profile.sampled:
            continue
        kw = dict(rows=[layout.row], memory=memory)
        before = dyno_stats(model, cfg, code_profile, **kw)["ALL_TAKEN"]
        after = before
        if layout.row in record.orders:
            after = dyno_stats(model, cfg, code_profile, orders=record.orders,
                               reverse_sites=record.reverse_sites, **kw)["ALL_TAKEN"]
        if before or after:
            layout.taken = (before, after)
    reasons = {int(row): reason for reason, rows in left_alone_rows.items() for row in rows}
    for layout in layouts:
        layout.note = reasons.get(layout.row, "")
    report.layouts = layouts


def _left_alone(report: ReportData, result, record) -> None:
    fetches = report.before.per_function()
    names = record.model.functions.names
    rows_by_reason = result.left_alone_rows
    out = []
    for reason, count in result.left_alone.items():
        rows = unique(np.asarray(rows_by_reason.get(reason, []), np.int64))
        hot = rows[np.argsort(-fetches[rows], kind="stable")][:EXAMPLES] if len(rows) else rows
        examples = [(names[r], int(fetches[r])) for r in hot.tolist() if fetches[r] > 0]
        if not examples and reason in result.examples:
            examples = [(result.examples[reason], 0)]
        out.append((reason, int(count), int(fetches[rows].sum()) if len(rows) else 0,
                    examples))
    out.sort(key=lambda r: (-r[2], -r[1]))
    report.left_alone = out
    # Where the run's fetches are: functions laid out anew, left alone, the rest.
    rewritten = np.zeros(len(names), bool)
    rewritten[list(record.orders)] = True
    left = np.zeros(len(names), bool)
    for rows in rows_by_reason.values():
        left[np.asarray(rows, np.int64)] = True
    outside = int(report.before.count[report.before.func < 0].sum())
    report.shares = [
        ("in functions laid out anew", int(fetches[rewritten].sum())),
        ("in functions left alone", int(fetches[left & ~rewritten].sum())),
        ("in functions whose block order stays", int(fetches[~left & ~rewritten].sum())),
        ("outside functions (entry code, thunks, ...)", outside),
    ]


def _option_text(options) -> str:
    parts = [f"blocks {options.reorder_blocks}"]
    if options.reorder_functions != "none":
        parts.append(f"functions {options.reorder_functions}")
    if options.split_functions:
        parts.append("hot/cold split")
    if options.indirect_call_promotion != "none":
        parts.append(f"indirect-call promotion ({options.icp_share:g}%, "
                     f"{options.icp_min_calls} calls)")
    if not options.reverse_static_keys:
        parts.append("static keys kept")
    if options.funcs is not None:
        parts.append(f"{len(options.funcs)} functions selected")
    return ", ".join(parts)


def _facts(result, input_path, output_path, options, model) -> list:
    from kbuild_bolt.profile.model import Profile

    profile = options.profile
    applied = getattr(result, "profile_applied", "")   # (stale matching's summary)
    used = "" if result.profile_used is None or applied else \
        f", {100 * result.profile_used:.1f}% of it on this kernel's code"
    applied = applied.removeprefix("profile: ")
    facts = [
        ("input", f"{input_path} (Linux {model.version.release}, "
                  f"{len(model.functions):,} functions)"),
        ("output", str(output_path) if output_path else "not written (analysis only)"),
        ("profile", ("(in memory)" if isinstance(profile, Profile) else str(profile)) + used
         + (f"; {applied}" if applied else "")),
        ("layout", _option_text(options)),
    ]
    if result.build_id:
        facts.append(("build-id", f"{result.build_id[1]} (was {result.build_id[0]})"))
    facts.append(("made", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by kbuild-bolt "
                          f"{__version__}"))
    return facts


def _summary(report: ReportData, result, record) -> list:
    out = [("functions laid out anew", f"{len(record.orders):,}"),
           ("left alone", f"{sum(result.left_alone.values()):,}")]
    if report.taken_prediction:
        a, b = report.taken_prediction
        out.append(("taken branches (predicted)", f"{100 * (b - a) / max(a, 1):+.1f}%"))
    if report.measured is not None and report.taken_before.get("taken_branches"):
        a = report.taken_before["taken_branches"]
        b = report.measured.taken["taken_branches"]
        out.append(("taken branches (measured)", f"{100 * (b - a) / a:+.1f}%"))
    after = " (measured)" if report.measured is not None else ""
    for unit, share, name in ((64, 0.9, "64-B lines"), (4096, 0.99, "4-KiB pages")):
        curves = report.curves[unit]
        out.append((f"{name} holding {100 * share:.0f}% of fetches{after}",
                    f"{curves[0].covering(share):,} → {curves[-1].covering(share):,}"))
    return out
