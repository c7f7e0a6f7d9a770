"""The report page: ReportData drawn as inline SVG in one HTML file (a jinja2
template beside this module), with a few lines of script for hover details.
No network: styles, pictures and data are all inside the page."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import jinja2
import numpy as np

from kbuild_bolt.arrays import unique
from markupsafe import Markup

from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.dyno import ROWS as DYNO_ROWS
from kbuild_bolt.report import data

TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html.j2"

# Heat colours, coldest first (ColorBrewer YlOrRd: readable on white, in print too).
HEAT = ["#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]
NOT_RUN = "#e6e8ec"        # code that never ran
RUN_COLOURS = ["#4c72b0", "#dd8452", "#55a868"]   # before, after (predicted), after (measured)
PREDICTED = 1              # (the runs' order: see ReportData.runs)

CELL = 4                   # heatmap cell, px
ROW_LABEL = 132            # px left of the heatmap grid for row addresses
STRIP_WIDTH = 760          # px of a block strip


def render(report) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE.read_text())
    heat = _heat_scale(report.heatmaps)
    names, heat_json = _heat_data(report.heatmaps)
    runs = report.runs()
    return template.render(
        r=report, fmt=_count, pct=_pct,
        heatmaps=[Markup(_heatmap_svg(i, hm, heat)) for i, hm in enumerate(report.heatmaps)],
        heat_legend=_legend(heat, report.before.total), heat_colours=HEAT, not_run=NOT_RUN,
        heat_json=Markup(_script_json({"names": names, "maps": heat_json})),
        bucket=report.heatmaps[0].bucket if report.heatmaps else 0,
        curves=[Markup(_curve_svg(report.curves[unit], unit)) for unit in (64, 4096)],
        run_colours=RUN_COLOURS, footprint=_footprint_rows(report, runs),
        dyno=_dyno_rows(report), strips=_strips(report.layouts),
        timings=_timings(report.timings))


def write_report(path, report) -> int:
    """Render ``report`` into ``path`` (atomically); its size in bytes."""
    page = render(report).encode()
    umask = os.umask(0)
    os.umask(umask)
    try:
        # (a page to open and pass around: readable as any file the user makes)
        with atomic_output(path, mode=0o666 & ~umask) as tmp:
            tmp.write_bytes(page)
    except OSError as err:
        raise KbbError(f"{path}: {err.strerror}") from None
    return len(page)


# ---------------------------------------------------------------------------
# numbers


def _count(n) -> str:
    """A count with thousands separators."""
    return f"{int(n):,}"


def _pct(part, whole, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}%" if whole else "–"


def _short(n: float) -> str:
    """3 significant digits with an SI suffix (legends, axes)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def _script_json(obj) -> str:
    # (inside <script>: "</" would end it)
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


# ---------------------------------------------------------------------------
# heatmaps


def _heat_scale(heatmaps) -> np.ndarray:
    """Thresholds of the colour levels, as shares of a run's fetches per cell: one
    scale for every heatmap (runs of different lengths compare)."""
    shares = [hm.counts[hm.counts > 0] / max(hm.total, 1) for hm in heatmaps]
    shares = np.concatenate(shares) if shares else np.zeros(0)
    if not len(shares):
        return data.heat_thresholds(1.0)
    floor = float(shares.min())
    # log scale from the coolest cell to the hottest one
    return floor * data.heat_thresholds(float(shares.max()) / floor)


def _legend(thresholds, fetches: int) -> list[tuple[str, str]]:
    """Each colour's range in fetches per cell, for a run of ``fetches`` (the
    scale itself is of shares: runs of other lengths are scaled to it)."""
    out, low = [], 0.0
    for colour, high in zip(HEAT, (thresholds * fetches).tolist()):
        high = round(high)
        out.append((colour, f"{_short(low)} – {_short(high)}" if low else f"≤ {_short(high)}"))
        low = high
    return out


def _heatmap_svg(index: int, hm: data.Heatmap, thresholds) -> str:
    top = 20
    width = ROW_LABEL + hm.columns * CELL + 2
    height = top + hm.rows * CELL + 2
    row_bytes = hm.bucket * hm.columns
    parts = [f'<svg class="heatmap" id="heatmap-{index}" data-map="{index}" '
             f'data-cells="{len(hm.cells)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{html.escape(hm.label)}: fetches per {hm.bucket} bytes">']
    # Column offsets along the top, like llvm-bolt-heatmap's hex header.
    for k in range(0, hm.columns + 1, hm.columns // 4):
        x = ROW_LABEL + k * CELL
        anchor = "start" if k == 0 else "end" if k == hm.columns else "middle"
        parts.append(f'<text class="ax" x="{x}" y="12" text-anchor="{anchor}">'
                     f'+{_bytes(k * hm.bucket)}</text>')
    # What .text covers: grey (code that did not run); outside it nothing.
    first = (hm.lo - hm.base) // hm.bucket
    last = -(-(hm.hi - hm.base) // hm.bucket)
    parts.append(f'<path class="bg" fill="{NOT_RUN}" '
                 f'd="{_span_path(first, last, hm.columns, top)}"/>')
    # Row addresses: as many as fit, one every 16 px at least.
    step = max(1, -(-14 // CELL))
    step = 1 << (step - 1).bit_length()
    for row in range(0, hm.rows, step):
        y = top + row * CELL
        parts.append(f'<text class="ax mono" x="{ROW_LABEL - 6}" y="{y + 4}" '
                     f'text-anchor="end">{hm.base + row * row_bytes:x}</text>'
                     f'<line class="tick" x1="{ROW_LABEL - 4}" x2="{ROW_LABEL}" '
                     f'y1="{y + 0.5}" y2="{y + 0.5}"/>')
    cells = hm.cells
    levels = data.heat_levels(hm.counts[cells] / max(hm.total, 1), thresholds)
    xs = ROW_LABEL + (cells % hm.columns) * CELL
    ys = top + (cells // hm.columns) * CELL
    parts.append('<g class="cells">')
    parts.extend(f'<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" class="h{lv}"/>'
                 for x, y, lv in zip(xs.tolist(), ys.tolist(), levels.tolist()))
    parts.append('</g><rect class="hover" width="4" height="4" x="-10" y="-10"/></svg>')
    return "".join(parts)


def _span_path(first: int, last: int, columns: int, top: int) -> str:
    """The cells [first, last) of a grid as one path (up to three rectangles)."""
    rects = []
    r0, c0 = divmod(first, columns)
    r1, c1 = divmod(last, columns)
    if r0 == r1:
        rects.append((r0, c0, r0 + 1, c1))
    else:
        rects.append((r0, c0, r0 + 1, columns))
        if r1 > r0 + 1:
            rects.append((r0 + 1, 0, r1, columns))
        if c1:
            rects.append((r1, 0, r1 + 1, c1))
    return "".join(f"M{ROW_LABEL + a * CELL} {top + r * CELL}H{ROW_LABEL + b * CELL}"
                   f"V{top + r2 * CELL}H{ROW_LABEL + a * CELL}Z" for r, a, r2, b in rects)


def _heat_data(heatmaps) -> tuple[list[str], list[dict]]:
    """For the hover details: per heatmap its fetched cells, their fetches and
    the function of their hottest instruction (an index into one name table)."""
    names: list[str] = []
    table: dict[str, int] = {}
    maps = []
    for hm in heatmaps:
        cells = hm.cells
        hottest = hm.hottest[cells]
        name_index = []
        for row in hottest.tolist():
            name = hm.names[row] if row >= 0 else "(outside functions)"
            k = table.get(name)
            if k is None:
                k = table[name] = len(names)
                names.append(name)
            name_index.append(k)
        maps.append({"label": hm.label, "base": f"{hm.base:x}", "bucket": hm.bucket,
                     "columns": hm.columns, "cell": CELL, "left": ROW_LABEL, "top": 20,
                     "total": hm.total, "cells": cells.tolist(),
                     "counts": hm.counts[cells].tolist(), "names": name_index})
    return names, maps


def _bytes(n: int) -> str:
    for div, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


# ---------------------------------------------------------------------------
# hot footprint curves


def _curve_svg(curves, unit: int) -> str:
    width, height = 500, 290
    left, right, top, bottom = 48, 14, 22, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    most = max([c.touched for c in curves] + [10])
    decades = int(np.ceil(np.log10(most)))

    def x_of(n):
        return left + plot_w * np.log10(np.maximum(n, 1)) / decades

    def y_of(share):
        return top + plot_h * (1 - share)

    what = "64-byte lines" if unit == 64 else "4-KiB pages"
    parts = [f'<svg class="curve" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="share of instruction fetches in the hottest {what}">']
    parts.append(f'<text class="ax title" x="{left}" y="{top - 9}">share of instruction '
                 f'fetches</text>')
    for share in (0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0):
        y = y_of(share)
        cls = "grid strong" if share in (0.9, 0.99) else "grid"
        parts.append(f'<line class="{cls}" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/>')
        if share != 1.0:      # (100% sits on 99%)
            parts.append(f'<text class="ax" x="{left - 5}" y="{y + 3.5:.1f}" '
                         f'text-anchor="end">{100 * share:g}%</text>')
    for d in range(decades + 1):
        x = x_of(10 ** d)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                     f'y2="{top + plot_h}"/><text class="ax" x="{x:.1f}" '
                     f'y="{top + plot_h + 14}" text-anchor="middle">{_short(10 ** d)}</text>')
    parts.append(f'<text class="ax title" x="{left + plot_w / 2}" y="{height - 6}" '
                 f'text-anchor="middle">hottest {what} (log scale)</text>')
    # (the prediction dashed and drawn last: over a measurement that matches it,
    # both still show)
    order = sorted(range(len(curves)), key=lambda k: k == PREDICTED)
    for k in order:
        colour, curve = RUN_COLOURS[k], curves[k]
        y = top + plot_h - 12 - 14 * (len(curves) - 1 - k)
        x = left + plot_w - 150
        dashed = " predicted" if k == PREDICTED else ""
        parts.append(f'<line class="key{dashed}" x1="{x}" x2="{x + 18}" y1="{y - 3.5}" '
                     f'y2="{y - 3.5}" stroke="{colour}"/><text class="ax title" '
                     f'x="{x + 24}" y="{y}">{html.escape(curve.label)}</text>')
        xs, ys = curve.points()
        if not len(xs):
            continue
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(x_of(xs), y_of(ys)))
        parts.append(f'<polyline class="line{dashed}" stroke="{colour}" points="{points}">'
                     f'<title>{html.escape(curve.label)}</title></polyline>')
        for share in (0.9, 0.99):
            n = curve.covering(share)
            parts.append(f'<circle cx="{x_of(n):.1f}" cy="{y_of(share):.1f}" r="3" '
                         f'fill="{colour}"><title>{html.escape(curve.label)}: '
                         f'{n:,} {what} hold {100 * share:g}% of fetches</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _footprint_rows(report, runs) -> list[dict]:
    rows = []
    lines, pages = report.curves[64], report.curves[4096]
    for k, run in enumerate(runs):
        counters = report.counters if k == 0 else (
            report.measured.counters if report.measured is not None and run is
            report.measured.run else {})
        mpki = (f"{1000 * counters['l1i_misses'] / run.total:.2f}"
                if counters.get("l1i_misses") is not None and run.total else "–")
        rows.append({
            "label": run.label, "colour": RUN_COLOURS[k], "dashed": k == PREDICTED,
            "fetches": run.total,
            "lines90": lines[k].covering(0.9), "lines99": lines[k].covering(0.99),
            "lines": lines[k].touched,
            "pages90": pages[k].covering(0.9), "pages99": pages[k].covering(0.99),
            "pages": pages[k].touched,
            "huge": int(len(unique(run.addr >> np.uint64(21)))), "mpki": mpki,
            "lost": run.lost})
    return rows


# ---------------------------------------------------------------------------
# dyno-stats


def _change(a, b) -> str:
    return f"{100 * (b - a) / a:+.1f}%" if a else "–"


def _dyno_rows(report) -> list[dict]:
    if report.dyno is None:
        return []
    before, after = report.dyno
    measured = report.measured.dyno if report.measured is not None else None
    rows = []
    for key, label in DYNO_ROWS.items():
        row = {"label": label, "key": key, "before": before[key], "after": after[key],
               "change": _change(before[key], after[key])}
        if measured is not None:
            row.update(measured=measured[key], measured_change=_change(before[key],
                                                                       measured[key]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# block layouts


def _strips(layouts) -> list[dict]:
    peak = max([int(l.counts.max()) for l in layouts if len(l.counts)] + [1])
    thresholds = data.heat_thresholds(peak)
    out = []
    for layout in layouts:
        out.append({"name": layout.name, "fetches": layout.fetches,
                    "blocks": len(layout.sizes), "bytes": int(layout.sizes.sum()),
                    "ran": int((layout.counts > 0).sum()), "moved": layout.moved,
                    "cold": int(layout.cold.sum()), "dropped": int(layout.dropped.sum()),
                    "taken": layout.taken, "note": layout.note,
                    "svg": Markup(_strip_svg(layout, thresholds))})
    return out


def _strip_svg(layout: data.BlockLayout, thresholds) -> str:
    label_w, row_h, gap, cold_gap = 44, 13, 5, 16
    width = label_w + STRIP_WIDTH
    height = 2 * row_h + gap + 1
    total = max(int(layout.sizes.sum()), 1)
    scale = (STRIP_WIDTH - cold_gap) / total
    colours = np.where(layout.counts > 0, 0, -1)
    ran = layout.counts > 0
    colours[ran] = data.heat_levels(layout.counts[ran], thresholds)
    parts = [f'<svg class="strip" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<text class="ax" x="0" y="{row_h - 3}">built</text>',
             f'<text class="ax" x="0" y="{2 * row_h + gap - 3}">new</text>']

    def block(i: int, x: float, y: int) -> str:
        w = layout.sizes[i] * scale
        fill = HEAT[colours[i]] if colours[i] >= 0 else NOT_RUN
        edge = ' class="sep"' if w >= 3 else ""
        return (f'<rect{edge} x="{x:.2f}" y="{y}" width="{max(w, 0.5):.2f}" height="{row_h}" '
                f'fill="{fill}"><title>block {i} at +{layout.offsets[i]:#x}, '
                f'{layout.sizes[i]} bytes, ran {layout.counts[i]:,}×</title></rect>')

    x = float(label_w)
    for i in range(len(layout.sizes)):
        parts.append(block(i, x, 0))
        x += layout.sizes[i] * scale
    x = float(label_w)
    order = [int(i) for i in layout.new_order if not layout.dropped[i]]
    hot = [i for i in order if not layout.cold[i]]
    cold = [i for i in order if layout.cold[i]]
    y = row_h + gap
    for i in hot:
        parts.append(block(i, x, y))
        x += layout.sizes[i] * scale
    if cold:
        x += cold_gap / 2
        parts.append(f'<line class="cold" x1="{x:.1f}" x2="{x:.1f}" y1="{y - 2}" '
                     f'y2="{y + row_h + 1}"><title>cold part: elsewhere in .text</title></line>')
        x += cold_gap / 2
        for i in cold:
            parts.append(block(i, x, y))
            x += layout.sizes[i] * scale
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------


def _timings(timings) -> list[tuple[str, float, float]]:
    longest = max([s for _, s in timings] + [1e-9])
    return [(name, seconds, 100 * seconds / longest) for name, seconds in timings]
