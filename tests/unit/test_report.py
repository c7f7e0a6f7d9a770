"""The report's numbers (heatmap bins, footprint curves, colour levels, runs
carried through an address map) against plain loops, and the page made from a
rewrite of the small assembled kernel (the browser test is in tests/kernel)."""

import re

import numpy as np
import pytest

from elfkit import tools_available
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.cli import main
from kbuild_bolt.profile.footprint import _covering
from kbuild_bolt.profile.model import Profile, write_profile
from kbuild_bolt.report import data
from kbuild_bolt.rewrite.engine import RewriteOptions, plan, rewrite
from synthetic_kernel import build

TEXT = 0xFFFFFFFF81000000
needs_as = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")


def random_run(seed=1, n=5000, span=3 << 20, functions=40) -> data.Run:
    rng = np.random.default_rng(seed)
    addr = np.unique(TEXT + rng.integers(0, span, n).astype(np.uint64))
    count = rng.integers(1, 10_000, len(addr)).astype(np.int64)
    func = rng.integers(-1, functions, len(addr)).astype(np.int64)
    return data.Run("test", addr, count, func, [f"f{i}" for i in range(functions)])


def test_bucket_size_fits_text_in_the_rows():
    assert data.bucket_size(1000) == data.MIN_BUCKET
    assert data.bucket_size(8 << 20) == 512            # a lab kernel's .text
    assert data.bucket_size(14_700_000) == 1024        # the distro kernel's
    for span in (1, 4095, 123_456, 8 << 20, 14_700_000, 1 << 30):
        b = data.bucket_size(span)
        assert b & (b - 1) == 0 and b >= data.MIN_BUCKET
        assert -(-span // (b * data.COLUMNS)) <= data.MAX_ROWS
        assert b == data.MIN_BUCKET or -(-span // (b // 2 * data.COLUMNS)) > data.MAX_ROWS


def test_heatmap_bins_every_fetch_once():
    run = random_run()
    lo, hi = TEXT + 0x1234, TEXT + (2 << 20) + 77      # a range that cuts the run
    hm = data.heatmap(run, lo, hi, bucket=512)
    assert hm.base == TEXT and hm.base % (512 * data.COLUMNS) == 0
    assert hm.rows * hm.columns * hm.bucket >= hi - hm.base
    expected = np.zeros(hm.rows * hm.columns, np.int64)
    hottest = {}
    outside = 0
    for a, c, f in zip(run.addr.tolist(), run.count.tolist(), run.func.tolist()):
        if not lo <= a < hi:
            outside += c
            continue
        cell = (a - hm.base) // 512
        expected[cell] += c
        if cell not in hottest or c > hottest[cell][0]:
            hottest[cell] = (c, f)
    assert np.array_equal(hm.counts, expected)
    assert hm.outside == outside and hm.total == run.total
    assert set(hm.cells.tolist()) == set(hottest)
    for cell, (_, f) in hottest.items():
        assert hm.hottest[cell] == f
    assert (hm.hottest[hm.counts == 0] == -1).all()


def test_heat_levels_are_a_log_scale():
    thresholds = data.heat_thresholds(1e8)
    assert len(thresholds) == data.LEVELS and thresholds[-1] == pytest.approx(1e8)
    assert np.allclose(np.diff(np.log(thresholds)), np.log(1e8) / data.LEVELS)
    levels = data.heat_levels(np.array([1, 10, 1e4, 1e7, 1e8, 2e8]), thresholds)
    assert levels.tolist() == sorted(levels.tolist())
    assert levels[0] == 0 and levels[-2] == levels[-1] == data.LEVELS - 1
    assert data.heat_levels(np.array([5.0]), data.heat_thresholds(0)).tolist() == [7]


@pytest.mark.parametrize("unit", [64, 4096])
def test_fetch_curve_agrees_with_the_footprint(unit):
    run = random_run(seed=unit)
    curve = data.fetch_curve(run, unit)
    key = run.addr >> np.uint64(unit.bit_length() - 1)
    weights = run.count.astype(np.float64)
    for share in (0.5, 0.9, 0.99, 1.0):
        assert curve.covering(share) == _covering(key, weights, share)
    assert curve.touched == len(np.unique(key))
    x, y = curve.points()
    assert x[0] == 1 and x[-1] == curve.touched and len(x) <= 260
    assert (np.diff(x) > 0).all() and (np.diff(y) >= 0).all() and y[-1] == pytest.approx(1)
    assert curve.covering(0.9) in x.tolist() and curve.covering(0.99) in x.tolist()


def test_empty_run_draws_nothing():
    run = data.Run("empty", np.zeros(0, np.uint64), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), [])
    curve = data.fetch_curve(run, 64)
    assert curve.covering(0.9) == 0 and len(curve.points()[0]) == 0
    assert not len(data.heatmap(run, TEXT, TEXT + 4096, 64).cells)


def test_carried_run_loses_what_no_longer_exists():
    run = random_run(n=200)
    dropped = np.zeros(len(run.addr), bool)
    dropped[::7] = True

    def translate(addrs):     # everything moves 1 MiB up, every 7th instruction is gone
        return addrs + np.uint64(1 << 20), ~dropped

    after = data.carried("after", run, translate)
    assert after.lost == int(run.count[dropped].sum())
    assert after.total + after.lost == run.total
    assert (np.diff(after.addr.astype(np.int64)) >= 0).all()
    assert set(after.addr.tolist()) == {a + (1 << 20) for a in run.addr[~dropped].tolist()}
    assert np.array_equal(after.per_function(), run.per_function()
                          - np.bincount(run.func[dropped & (run.func >= 0)],
                                        weights=run.count[dropped & (run.func >= 0)],
                                        minlength=len(run.names)).astype(np.int64))


# ---------------------------------------------------------------------------
# The page, from the small assembled kernel.


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    path = build(d)
    model = BinaryModel.open(path, jobs=1)
    start = int(model.image.symbols.address("startup_64"))
    site = int(model.tables["__jump_table"].targets("code")[1])
    target = int(model.tables["__jump_table"].targets("target")[1])
    profile = Profile(np.array([start, target], np.uint64), np.array([site, target + 2], np.uint64),
                      np.array([100, 60], np.int64), np.array([site], np.uint64),
                      np.array([target], np.uint64), np.array([60], np.int64),
                      kernel="6.12.0-elfkit", source="test", stats={"l1i_misses": 3})
    write_profile(profile, d / "p.kbb")
    return path, d / "p.kbb"


def cells_in(page: str) -> list[tuple[int, int]]:
    """(data-cells, rects drawn) of each heatmap in the page."""
    out = []
    for svg in re.findall(r'<svg class="heatmap".*?</svg>', page, re.S):
        declared = int(re.search(r'data-cells="(\d+)"', svg).group(1))
        out.append((declared, len(re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="\d+" '
                                             r'height="\d+" class="h\d"/>', svg))))
    return out


@needs_as
def test_no_record_unless_asked(kernel, tmp_path):
    vmlinux, profile = kernel
    result = rewrite(vmlinux, tmp_path / "out", RewriteOptions(profile=str(profile),
                                                                progress=False))
    assert result.record is None
    result = plan(vmlinux, RewriteOptions(profile=str(profile), progress=False))
    assert result.record is not None and result.record.orders
    assert not (tmp_path / "out2").exists()


@needs_as
def test_rewrite_writes_a_self_contained_page(kernel, tmp_path, capsys):
    vmlinux, profile = kernel
    page = tmp_path / "report.html"
    assert main(["rewrite", str(vmlinux), "-o", str(tmp_path / "out"), "--profile",
                 str(profile), "--report", str(page), "-q"]) == 0
    assert f"REPORT  {page}" in capsys.readouterr().out
    text = page.read_text()
    for heading in ("Heatmap of .text", "Hot footprint", "Dyno-stats", "Hot functions",
                    "Left alone, and why", "Verification", "Timings"):
        assert heading in text
    assert "verify: ok" in text and "startup_64" in text
    maps = cells_in(text)
    assert len(maps) == 2 and all(declared == drawn > 0 for declared, drawn in maps)
    # Nothing from the network: no URL anywhere but the SVG namespace, if any.
    assert not re.search(r'(?:src|href)="(?!#)', text)
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert not list(tmp_path.glob(".report.html.*"))        # (written atomically)


@needs_as
def test_report_command_measures_a_reprofile(kernel, tmp_path):
    """A re-profile that is the profile carried through the address map measures
    what the prediction says."""
    vmlinux, profile = kernel
    out = tmp_path / "out"
    options = RewriteOptions(profile=str(profile), progress=False, keep_record=True)
    result = rewrite(vmlinux, out, options)
    record = result.record
    cp = record.code_profile
    after = data.carried("after", data.executed("before", record.model, cp),
                         record.address_map.translate)
    write_profile(Profile(after.addr, after.addr, after.count, kernel="6.12.0-elfkit",
                          stats={"l1i_misses": 2}), tmp_path / "p2.kbb")
    page = tmp_path / "page.html"
    assert main(["report", str(vmlinux), "--profile", str(profile), "--optimized", str(out),
                 "--reprofile", str(tmp_path / "p2.kbb"), "-o", str(page), "-q"]) == 0
    text = page.read_text()
    assert "after (measured)" in text and "verify: ok" in text
    assert len(cells_in(text)) == 3
    rows = re.findall(r'<tr><td><span class="swatch"[^>]*></span>([^<]+)</td>(.*?)</tr>',
                      text, re.S)
    numbers = {label: re.findall(r'<td class="n">([^<]*)</td>', cells) for label, cells in rows}
    assert numbers["after (measured)"][:8] == numbers["after (predicted)"][:8]


@needs_as
@pytest.mark.parametrize("args, message", [
    (["report", "{vmlinux}", "-o", "{tmp}/r.html"], "report needs --profile"),
    (["report", "{vmlinux}", "--profile", "{profile}", "--reprofile", "{profile}",
      "-o", "{tmp}/r.html"], "--reprofile needs --optimized"),
    (["report", "{vmlinux}", "--profile", "{profile}", "-o", "{tmp}/nowhere/r.html"],
     "no such directory"),
    (["report", "{tmp}/missing", "--profile", "{profile}", "-o", "{tmp}/r.html"],
     "missing: no such file"),
    (["rewrite", "{vmlinux}", "-o", "{tmp}/out", "--reorder-blocks", "random",
      "--report", "{tmp}/r.html"], "--report needs --profile"),
    (["rewrite", "{vmlinux}", "-o", "{tmp}/out", "--profile", "{profile}",
      "--report", "{tmp}"], "is a directory"),
])
def test_bad_input_is_one_line(kernel, tmp_path, capsys, args, message):
    vmlinux, profile = kernel
    argv = [a.format(vmlinux=vmlinux, profile=profile, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.html").exists()
