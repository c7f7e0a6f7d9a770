"""What one rewrite knows: its options, its result, and the context its passes fill in."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel, default_jobs
from kbuild_bolt.processes import ForkedCall, OnThread


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
    strip_debug: bool = False               # empty the debug sections instead of updating them
    address_map: str | None = None          # write old -> new code pieces here (npz)
    progress: bool = True
    # Put blocks that do not fit a function's slot into free room in .text.
    split: bool = True
    dyno_stats: bool = False
    # Whole-function layout: the order of functions in their regions, and
    # hot/cold splitting (either one moves every movable function).
    reorder_functions: str = "none"
    split_functions: bool = False
    # With a profile, blocks stay hot when they hold the fetches up to this share
    # of all (1.0: every block that ran at all).
    split_share: float = 1.0
    # A static-key site whose jump side the layout puts right after it is
    # reversed: that side falls through, the site jumps to the other one, and
    # its __jump_table entry flips its branch sense (and so its initial form).
    reverse_static_keys: bool = True
    # Indirect-call promotion (BOLT's -indirect-call-promotion): "calls" gives a
    # hot indirect call whose profile shows a dominant target a direct path to
    # it (see kbuild_bolt.rewrite.promote); "none" leaves every call as it is.
    indirect_call_promotion: str = "calls"
    icp_share: float = 80.0       # percent of the site's calls the target must take
    icp_min_calls: int = 100      # calls of the site in the profile, at least
    # Torture mode: every eligible indirect call promoted (to its profiled target,
    # else to some function: only the fallback runs), to prove the fixups.
    icp_every_site: bool = False
    # Where the input's analysis (decoded code, CFGs) is kept between runs, keyed
    # by its build-id and code (binary.saved); None: analysed afresh each time.
    cache_dir: str | None = None
    # Keep what a report of the run needs (result.record): the model, the profile
    # as attached, the block orders and the address map outlive the rewrite.
    keep_record: bool = False
    # What the input is called in messages (a module's placed image is a
    # temporary file: its .ko is named instead).
    input_name: str | None = None

    @property
    def moves_functions(self) -> bool:
        return self.reorder_functions != "none" or self.split_functions


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
    debug_stats: dict = field(default_factory=dict)      # DWARF updated: what changed
    debug_check: str = ""                   # the cheap DWARF check rewrite runs itself
    debug_problems: list = field(default_factory=list)   # DWARF that could not be made true
    seconds: dict = field(default_factory=dict)
    rewritten_names: list = field(default_factory=list)
    # Share of .text functions handled (rewritten or already in the chosen order).
    text_coverage: float = 0.0
    profile_used: float | None = None
    profile_applied: str = ""               # stale matching's summary
    orders_kept: tuple = (0, 0)     # (ext-TSP orders found kept from earlier runs, ordered)
    dyno: tuple | None = None   # (before, after) predicted dyno-stats
    # (taken jmp/jcc the profile counts, predicted after): what measuring will show
    taken_prediction: tuple | None = None
    static_keys_reversed: int = 0   # static-key sites whose branch sense was flipped
    # Indirect calls given a direct path: (sites, calls the profile saw there, of
    # which to the promoted target), and why other indirect calls were not.
    calls_promoted: tuple = (0, 0, 0)
    icp_skipped: Counter = field(default_factory=Counter)
    orc_entries: tuple = (0, 0)
    verify_summary: str = ""
    fragments: int = 0
    fragment_bytes: int = 0
    free_room: int = 0
    moved_functions: int = 0
    in_place: int = 0           # functions that stay, their blocks laid out anew inside them
    fallback: int = 0           # placed in their original order: their region was full
    unnamed: int = 0            # cold parts without a kallsyms name (no room)
    sympos_changed: list = field(default_factory=list)  # same-named functions reordered
    build_id: tuple | None = None  # (input's, output's) hex build-ids, when code changed
    left_alone_rows: dict = field(default_factory=dict)   # reason -> function rows
    record: "LayoutRecord | None" = None    # with options.keep_record: for a report
    module: str = ""            # the module rewritten ("": a vmlinux)
    module_notes: list = field(default_factory=list)   # options that do not apply to it

    def leave_alone(self, reason: str, names: list[str]) -> None:
        """Count functions left byte for byte alone for ``reason`` (the first as example)."""
        if names:
            self.left_alone[reason] += len(names)
            self.examples.setdefault(reason, names[0])

    def predicted_taken_change(self) -> float | None:
        """The predicted relative change of taken jmp/jcc: of the whole run where
        the profile counts them (what measuring the new kernel shows), else of
        the functions dyno-stats model."""
        if self.taken_prediction:
            before, after = self.taken_prediction
            return after / before - 1
        if self.dyno and self.dyno[0].get("ALL_TAKEN"):
            return self.dyno[1]["ALL_TAKEN"] / self.dyno[0]["ALL_TAKEN"] - 1
        return None

    def brief(self) -> str:
        """One line for build logs (``kbuild-bolt rewrite -q``)."""
        parts = [f"module {self.module}: {self.rewritten:,} functions rewritten"
                 if self.module else f"{self.rewritten:,} functions rewritten",
                 f"{sum(self.left_alone.values()):,} left alone"]
        if self.moved_functions:
            parts.append(f"{self.moved_functions:,} placed anew, {self.fragments:,} cold parts")
        if self.unnamed:
            parts.append(f"{self.unnamed:,} cold parts unnamed in kallsyms (no room)")
        if self.static_keys_reversed:
            parts.append(f"{self.static_keys_reversed:,} static-key sites reversed")
        if self.calls_promoted[0]:
            parts.append(f"{self.calls_promoted[0]:,} indirect calls promoted")
        if self.sympos_changed:
            parts.append(f"livepatch sympos changed for {len(self.sympos_changed)} names")
        if self.profile_used is not None:
            parts.append(f"profile {100 * self.profile_used:.1f}% used")
        change = self.predicted_taken_change()
        if change is not None:
            parts.append(f"taken branches {100 * change:+.1f}% (predicted)")
        if self.stripped:
            parts.append("debug info removed")
        parts.append(self.verify_summary.splitlines()[0].replace(":", "", 1)
                     if self.verify_summary else "not verified")
        return ", ".join(parts)

    def summary(self) -> str:
        lines = [f"module {self.module}: functions: {self.functions:,} in its code sections"
                 if self.module else
                 f"functions: {self.functions:,} in .text/.init.text/.exit.text"]
        lines += [f"  ({note})" for note in self.module_notes]
        lines.append(f"  rewritten                 {self.rewritten:>9,}   "
                     f"({100 * self.text_coverage:.1f}% of .text handled)")
        lines.append(f"  same layout (unchanged)   {self.unchanged:>9,}")
        for reason, count in self.left_alone.most_common():
            example = self.examples.get(reason, "")
            lines.append(f"  left alone: {reason:<24} {count:>9,}   e.g. {example}")
        if self.moved_functions:
            lines.append(f"functions placed anew: {self.moved_functions:,}"
                         + (f" ({self.fallback:,} in their original block order: their "
                            "region had no room for the new one)" if self.fallback else ""))
            if self.in_place:
                lines.append(f"functions that stay, their blocks laid out in place: "
                             f"{self.in_place:,}")
        if self.fragments:
            where = "in cold areas" if self.moved_functions else \
                f"in free room of .text ({self.free_room:,} bytes free)"
            lines.append(f"cold parts: {self.fragments:,} functions placed "
                         f"{self.fragment_bytes:,} bytes {where}, each named name.cold")
        if self.sympos_changed:
            lines.append(f"livepatch sympos: {len(self.sympos_changed)} names whose same-named "
                         f"functions changed order (e.g. {self.sympos_changed[0]}): a livepatch "
                         "naming them by sympos must be built against this vmlinux")
        if self.build_id:
            lines.append(f"build-id: {self.build_id[1]} (was {self.build_id[0]})")
        if self.unnamed:
            lines.append(f"kallsyms: no room for {self.unnamed:,} cold part names (build the "
                         "kernel with CONFIG_BOLT to reserve it): stack traces, perf and "
                         "/proc/kallsyms show them as part of the symbol before them")
        if self.calls_promoted[0] or self.icp_skipped:
            sites, calls, hits = self.calls_promoted
            share = f", {100 * hits / calls:.1f}% of their {calls:,} profiled calls go " \
                "the direct way" if calls else ""
            lines.append(f"indirect calls promoted: {sites:,} sites{share}")
            if self.icp_skipped:
                lines.append("  not promoted: " + ", ".join(
                    f"{reason} {n:,}" for reason, n in self.icp_skipped.most_common()))
        lines.append(f"bytes changed: {self.bytes_changed:,} "
                     f"(jumps added {self.inserted_jumps:,}, bytes dropped {self.dropped_bytes:,})")
        lines.append(f"relocations updated: {self.relocations_changed:,} "
                     f"({self.fields_rewritten:,} fields recomputed)")
        if self.tables:
            lines.append("tables updated: " + ", ".join(f"{k} {v:,}" for k, v in self.tables.items()))
        lines.append(f"ORC entries: {self.orc_entries[0]:,} used of {self.orc_entries[1]:,} "
                     "(regenerated; the table keeps its size)")
        if self.debug_stats:
            lines.append("DWARF updated: " + ", ".join(f"{k} {v:,}" for k, v in self.debug_stats.items()))
        for problem in self.debug_problems:
            lines.append(f"DWARF: {problem}")
        if self.debug_check:
            lines.append(f"DWARF checked: {self.debug_check}")
        if self.stripped:
            lines.append(f"debug sections removed (they described the old layout): "
                         f"{', '.join(self.stripped)}")
        if self.verify_summary:
            lines.append(self.verify_summary)
        if self.dyno:
            from kbuild_bolt.profile.dyno import format_comparison
            lines.append(format_comparison(*self.dyno, "before", "after (predicted)",
                                           whole_run=self.taken_prediction))
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


@dataclass
class LayoutRecord:
    """What a report needs of a rewrite once it is done (taken before the update
    frees the layout): the input, the profile on its code, the new block order
    of every rewritten function, where old code now is, and the cold parts."""

    model: BinaryModel
    cfg: object
    code_profile: object | None             # CodeProfile (None: no profile was attached)
    orders: dict                            # row -> block order, every rewritten function
    address_map: object | None              # AddressMap (None: no code moved)
    cold: np.ndarray                        # (n, 2) uint64 new [start, end) of cold parts
    reverse_sites: object = False           # static-key sites the layout may reverse


class Session:
    """A vmlinux read once and rewritten many times (bisect)."""

    def __init__(self, input_path, cache_dir=None):
        """``cache_dir``: where the input's decoded code and CFGs are kept between
        runs (binary.saved; None: always analysed afresh)."""
        from kbuild_bolt.binary import saved
        from kbuild_bolt.kernel.vmlinux import open_vmlinux

        image = open_vmlinux(input_path)
        key = saved.analysis_key(image) if cache_dir is not None else None
        # Whether this very file passed the input's cross-check before: a CRC of
        # the whole file, on a thread while the rest is read.
        self._checking = OnThread(saved.was_checked, cache_dir, key, image) \
            if key is not None else None
        self._checked = False
        kept = saved.load(cache_dir, key)
        self.model = BinaryModel(image, require_relocations=True,
                                 decoded=kept.insns if kept else None)
        if kept:
            self.model.__dict__["fill_insn"] = kept.fill_insn    # (a cached_property)
        self.cfg = kept.cfg if kept else build_cfg(self.model)
        self.analysis = "kept" if kept else "made"
        if key is not None and not kept:
            saved.save(cache_dir, key, self.model.insns, self.cfg, self.model.fill_insn)
        self._cache = (cache_dir, key)

    @property
    def checked(self) -> bool:
        """The input's tables and relocations agree with its code (found so by
        an earlier run that made the analysis kept now, or by this one)."""
        if self._checking is not None:
            checking, self._checking = self._checking, None
            self._checked = bool(checking.result()) and self.analysis == "kept"
        return self._checked

    def passed_check(self) -> None:
        """The input's cross-check found no problem (kept with its analysis)."""
        from kbuild_bolt.binary import saved

        self._checking, self._checked = None, True
        saved.mark_checked(*self._cache, self.model.image)


@dataclass
class RewriteContext:
    """The state passes hand on to each other. Each field is written by one pass
    (named beside it) and read by the passes after it."""

    input_path: object
    output_path: object
    options: RewriteOptions
    result: RewriteResult = field(default_factory=RewriteResult)
    session: Session | None = None          # read (or given: bisect reuses one)
    own_session: bool = False               # read: made by this run (not given)
    model: BinaryModel | None = None        # read
    cfg: object = None                      # read: the CFG of every function
    candidates: np.ndarray | None = None    # discover: rows that may be laid out again
    profile_layout: object = None           # profile: ProfileLayout (counts per block/edge)
    orders: dict = field(default_factory=dict)      # layout: row -> new block order
    unchanged_rows: list = field(default_factory=list)  # layout: already in that order
    moves: object = None                    # functions: MovePlan (whole functions that move)
    relaid: np.ndarray | None = None        # functions: bool per function, new block order
    text: object = None                     # functions: the kernel's TextLayout
    move_analysis: object = None            # functions: MoveAnalysis (what can move)
    hot_len: dict = field(default_factory=dict)     # functions: row -> blocks in its hot part
    rank: np.ndarray | None = None          # functions: placement order of each moving one
    same_name_before: np.ndarray | None = None  # functions: same-named function before each
    promotions: object = None               # promote: indirect calls given a direct path
    slots: np.ndarray | None = None         # emit: end of every function's slot
    emission: object = None                 # emit: new code of every rewritten function
    metadata: list = field(default_factory=list)    # fit: the metadata rewriters of this run
    output: object = None                   # update: the OutputImage (a temporary file)
    rewritten_rows: list = field(default_factory=list)  # update: functions actually rewritten
    fragments: list = field(default_factory=list)       # update: (start, end) of cold fragments
    symbol_values: np.ndarray | None = None  # update: every symbol's value in the output
    fixed_symbols: np.ndarray | None = None  # update: markers that stay where code moved
    code_image: object = None               # update: CodeImage, where each old piece is now
    debug_sample: object = None             # update: DebugSample (rewrite's own DWARF check)
    new_symbols: list = field(default_factory=list)  # update: (name, value, size, section)
    moved_ranges: np.ndarray | None = None  # update: where whole functions were placed
    pending_build_id: object = None         # update: PendingStamp (written by verify/write)
    committed: bool = False                 # write

    # read: work on the other CPU (forked children) whose results later passes
    # take by name: the profile file read, the input's kallsyms decoded
    beside: dict = field(default_factory=dict)
    bar: object = None                      # the passes' progress bar (a terminal only)
    frozen: bool = False                    # read: the collector ignores what was alive

    def say(self, message: str) -> None:
        if self.options.progress:
            if self.bar is not None:
                self.bar.clear()
            print(f"  BOLT    {message}", file=sys.stderr, flush=True)
            if self.bar is not None:
                self.bar.draw()

    def start_beside(self, name: str, fn, *args) -> None:
        """``fn(*args)`` started on the other CPU (a forked child) for a later pass
        to :meth:`take_beside`; nothing when there is no CPU to spare."""
        if default_jobs() > 1:
            self.beside[name] = ForkedCall(fn, *args)

    def take_beside(self, name: str, fn, *args):
        """What :meth:`start_beside` began as ``name`` (an error it raised is
        raised here), else ``fn(*args)`` now."""
        call = self.beside.pop(name, None)
        return call.result() if call is not None else fn(*args)

    def cancel_beside(self) -> None:
        for call in self.beside.values():
            call.cancel()
        self.beside.clear()

    def release_file_pages(self) -> None:
        """Between passes: the input's and the output's file pages go back to the
        page cache (each pass maps again what it reads; see ElfImage.release_pages)."""
        if self.model is not None:
            self.model.image.release_pages()
        if self.output is not None:
            self.output.release_pages()

    def leave_alone(self, rows, reason: str) -> None:
        names = self.model.functions.names
        self.result.leave_alone(reason, [names[row] for row in rows])
        self.result.left_alone_rows.setdefault(reason, []).extend(rows)


class ProgressBar:
    """One line at the bottom of a terminal: which pass runs, and how many of the
    run's passes are done. Drawn only on a terminal (a build log gets the plain
    ``BOLT`` lines); messages print above it."""

    WIDTH = 24

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = max(1, total)
        self.done = 0
        self.name = ""

    @staticmethod
    def wanted(options, stream=None) -> bool:
        stream = stream or sys.stderr
        return bool(options.progress and hasattr(stream, "isatty") and stream.isatty())

    def start(self, name: str) -> None:
        self.name = name
        self.draw()

    def finish_step(self) -> None:
        self.done += 1
        self.draw()

    def draw(self) -> None:
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r\033[K  BOLT    [{bar}] {self.done}/{self.total} {self.name}")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()
