"""What the report draws, computed from instruction fetches with numpy.

A *run* is the fetches of one profile at the addresses of one kernel image:
every executed instruction once per execution, counted at its first byte (as
:mod:`kbuild_bolt.profile.footprint` counts). The run before the rewrite is the
profile on the input; the run after is that profile carried through the
rewrite's address map (predicted), or a profile recorded on the output
(measured). Everything here is numbers for the pictures (numpy over whole
arrays: a distro kernel's run bins in milliseconds); nothing here draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import union1d, unique
from kbuild_bolt.profile.footprint import covering, hottest_cumulative

# Cells of one heatmap row, and at most this many rows: the bucket size grows in
# powers of two until .text fits (a 14 MB distro .text: 1 KiB per cell).
COLUMNS = 128
MAX_ROWS = 128
MIN_BUCKET = 64           # one cache line: finer says nothing more about fetches
LEVELS = 8                # colours of the heat scale


@dataclass
class Run:
    """Instruction fetches of one run at one image's addresses."""

    label: str
    addr: np.ndarray        # uint64, one executed instruction each
    count: np.ndarray       # int64 executions
    func: np.ndarray        # int64 function row of each (-1: outside functions)
    names: list             # function row -> name
    lost: int = 0           # fetches the run had that no longer exist (dropped jumps)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def per_function(self) -> np.ndarray:
        """Fetches of each function row."""
        ok = self.func >= 0
        return np.bincount(self.func[ok], weights=self.count[ok],
                           minlength=len(self.names)).astype(np.int64)


def executed(label: str, model, code_profile) -> Run:
    """The run a profile attached to ``model`` describes."""
    ran = np.flatnonzero(code_profile.insn_count > 0)
    return Run(label, model.insns.addr[ran], code_profile.insn_count[ran].astype(np.int64),
               model.function_of_insn[ran], model.functions.names)


def carried(label: str, run: Run, translate) -> Run:
    """``run`` at the new addresses: ``translate(addrs) -> (new, ok)`` (an
    AddressMap's). Instructions the rewrite dropped (a jump that now falls
    through) are no longer fetched: their count is ``lost``."""
    new, ok = translate(run.addr)
    order = np.argsort(new[ok], kind="stable")
    return Run(label, new[ok][order], run.count[ok][order], run.func[ok][order], run.names,
               lost=int(run.count[~ok].sum()))


# ---------------------------------------------------------------------------
# Heatmap: llvm-bolt-heatmap's picture (rows of equal address buckets, colour by
# the fetches in each), over one address range.


@dataclass
class Heatmap:
    label: str
    base: int               # address of the first cell (aligned to a row)
    bucket: int             # bytes per cell
    columns: int
    rows: int
    lo: int                 # the range shown: [lo, hi)
    hi: int
    counts: np.ndarray      # int64 fetches per cell, rows * columns
    hottest: np.ndarray     # int64 per cell: function row of its hottest instruction (-1)
    total: int              # fetches of the run (shares are of this)
    outside: int            # fetches of the run outside [lo, hi)
    names: list             # function row -> name (for ``hottest``)

    @property
    def cells(self) -> np.ndarray:
        """Indexes of the cells that were fetched from."""
        return np.flatnonzero(self.counts)


def bucket_size(span: int, columns: int = COLUMNS, max_rows: int = MAX_ROWS) -> int:
    """The smallest power of two (a cache line at least) whose rows of ``columns``
    cells cover ``span`` bytes in ``max_rows`` rows."""
    need = -(-max(span, 1) // (columns * max_rows))
    return max(MIN_BUCKET, 1 << (int(need) - 1).bit_length())


def heatmap(run: Run, lo: int, hi: int, bucket: int, columns: int = COLUMNS) -> Heatmap:
    """Fetches of ``run`` in [lo, hi) binned into cells of ``bucket`` bytes."""
    row_bytes = bucket * columns
    base = lo - lo % row_bytes
    rows = max(1, -(-(hi - base) // row_bytes))
    inside = (run.addr >= np.uint64(lo)) & (run.addr < np.uint64(hi))
    cell = ((run.addr[inside] - np.uint64(base)) // np.uint64(bucket)).astype(np.int64)
    count = run.count[inside]
    n = rows * columns
    # (float weights are exact below 2**53 fetches)
    counts = np.rint(np.bincount(cell, weights=count, minlength=n)).astype(np.int64)
    hottest = np.full(n, -1, np.int64)
    if len(cell):
        # Per cell, its hottest instruction first: the first of each cell's run.
        order = np.lexsort((-count, cell))
        first = order[np.r_[True, cell[order][1:] != cell[order][:-1]]]
        hottest[cell[first]] = run.func[inside][first]
    return Heatmap(run.label, base, bucket, columns, rows, lo, hi, counts, hottest,
                   run.total, run.total - int(count.sum()), run.names)


def heat_thresholds(peak: float, levels: int = LEVELS) -> np.ndarray:
    """Upper bounds of the colour levels on a log scale from 1 to ``peak``
    (llvm-bolt-heatmap's: level i holds values up to peak**((i+1)/levels))."""
    peak = max(float(peak), 1.0)
    return peak ** (np.arange(1, levels + 1) / levels)


def heat_levels(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The colour level of each value (> 0) under ``thresholds``."""
    return np.minimum(np.searchsorted(thresholds, values, side="left"), len(thresholds) - 1)


# ---------------------------------------------------------------------------
# Hot footprint: how many cache lines or pages hold a given share of the fetches.


@dataclass
class FetchCurve:
    label: str
    unit_bytes: int         # 64 (cache lines) or 4096 (pages)
    cumulative: np.ndarray  # fetches held by the N hottest units, N = 1, 2, ...

    @property
    def touched(self) -> int:
        """Units fetched from at all."""
        return len(self.cumulative)

    def covering(self, share: float) -> int:
        """Units, hottest first, that hold ``share`` of the fetches (footprint.py's
        lines90, pages99, ...)."""
        return covering(self.cumulative, share)

    def points(self, count: int = 240) -> tuple[np.ndarray, np.ndarray]:
        """(N, share of the fetches) at about ``count`` values of N spread on a log
        scale, the 90% and 99% points and the last one included."""
        n = self.touched
        if not n or self.cumulative[-1] <= 0:
            return np.zeros(0, np.int64), np.zeros(0)
        x = unique(np.round(np.logspace(0, np.log10(n), count)).astype(np.int64))
        x = union1d(x, [self.covering(0.9), self.covering(0.99), n]).astype(np.int64)
        return x, self.cumulative[x - 1] / self.cumulative[-1]


def fetch_curve(run: Run, unit_bytes: int) -> FetchCurve:
    """The fetches of ``run`` per unit of ``unit_bytes`` (a power of two),
    hottest unit first, accumulated."""
    shift = np.uint64(int(unit_bytes).bit_length() - 1)
    return FetchCurve(run.label, unit_bytes, hottest_cumulative(run.addr >> shift, run.count))


# ---------------------------------------------------------------------------
# Block layouts of hot functions.


@dataclass
class BlockLayout:
    """One function's blocks as built and as laid out anew."""

    row: int
    name: str
    fetches: int
    offsets: np.ndarray     # int64 offset of each block in the function, original order
    sizes: np.ndarray       # int64 bytes of each block
    counts: np.ndarray      # int64 executions of each block
    new_order: np.ndarray   # int64 positions (into the original order) in the new order
    cold: np.ndarray        # bool per block: placed in the function's cold part
    dropped: np.ndarray     # bool per block: no longer exists (a jump that falls through)
    taken: tuple | None = None   # (taken branches before, predicted after)
    note: str = ""               # why it was left alone, when it was

    @property
    def moved(self) -> bool:
        return not np.array_equal(self.new_order, np.arange(len(self.sizes)))


def block_layouts(model, cfg, code_profile, rows, fetches: np.ndarray, orders: dict,
                  translate=None, cold_ranges: np.ndarray | None = None) -> list[BlockLayout]:
    """For each function row: its blocks in their original order with sizes and
    counts, the order the rewrite gave them (``orders``; unchanged if absent),
    which landed in a cold part (``cold_ranges`` of new addresses) and which
    are gone (their instructions map nowhere)."""
    insns = model.insns
    counts_all = code_profile.block_counts(cfg)
    if cold_ranges is not None:
        cold_ranges = cold_ranges[np.argsort(cold_ranges[:, 0], kind="stable")]
    out = []
    for row in rows:
        blocks = cfg.blocks_of(row)
        lo, hi = blocks.start, blocks.stop
        if hi <= lo:
            continue
        first, end = cfg.block_first[lo:hi], cfg.block_end[lo:hi]
        sizes = (insns.end_of(end - 1) - insns.addr[first]).astype(np.int64)
        offsets = (insns.addr[first] - model.functions.start[row]).astype(np.int64)
        order = np.asarray(orders.get(row, range(lo, hi)), np.int64) - lo
        cold = np.zeros(hi - lo, bool)
        dropped = np.zeros(hi - lo, bool)
        if translate is not None:
            # A block is where its first surviving instruction now is.
            i0, i1 = int(first[0]), int(end[-1])
            new, ok = translate(insns.addr[i0:i1])
            block_of = np.searchsorted(first, np.arange(i0, i1), side="right") - 1
            alive = np.bincount(block_of, weights=ok, minlength=hi - lo) > 0
            dropped = ~alive
            where = np.full(hi - lo, np.iinfo(np.uint64).max, np.uint64)
            np.minimum.at(where, block_of[ok], new[ok])
            if cold_ranges is not None and len(cold_ranges):
                k = np.searchsorted(cold_ranges[:, 0], where, side="right").astype(np.int64) - 1
                cold = alive & (k >= 0) & (where < cold_ranges[np.maximum(k, 0), 1])
        out.append(BlockLayout(int(row), model.functions.names[row], int(fetches[row]),
                               offsets, sizes,
                               counts_all[lo:hi].astype(np.int64), order, cold, dropped))
    return out
