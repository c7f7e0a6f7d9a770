"""The report page of a real layout (issue 14), looked at in a real browser:
headless Chromium loads it without an error, draws every heatmap cell, the
footprint curves and the block strips, and its hover details work. Then the
optimized kernel is profiled and ``kbuild-bolt report`` measures it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chromium import Chromium
from kbuild_bolt.cache import cache_root
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.report.render import HEAT

pytestmark = pytest.mark.xdist_group("report")

FLAVOR = "6.12-regular"
LAYOUT = ["--reorder-functions", "cdsort", "--split-functions"]


def cli(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"kbuild-bolt {' '.join(map(str, args))}: {proc.stderr}"
    return proc.stdout


def files_profile(flavor: str) -> Path:
    """The files workload's profile of the lab kernel, where benchmarks/same_outputs.py
    keeps it (recorded once per build of the kernel)."""
    kernel = lab_kernel(flavor)
    vmlinux = kernel.vmlinux
    digest = hashlib.sha256(f"{vmlinux}:{vmlinux.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    path = cache_root() / "bench" / f"files-{flavor}-{digest}.kbb"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cli("profile", "record", "--kernel", kernel.bzimage, "--vmlinux", vmlinux,
            "--initrd", kernel.initramfs, "--workload", "files", "-o", path)
    return path


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    """The lab kernel laid out as make CONFIG_BOLT=y does, with --report."""
    kernel = lab_kernel(FLAVOR)
    profile = files_profile(FLAVOR)
    d = tmp_path_factory.mktemp("report")
    out = cli("rewrite", kernel.vmlinux, "-o", d / "vmlinux", "--profile", profile, *LAYOUT,
              "--report", d / "rewrite.html", "-q")
    assert re.search(r"REPORT  .*rewrite\.html \([\d.]+ MB, [\d.]+ s\)", out), out
    return kernel, profile, d


# What the page holds once its script ran, as the browser sees it.
INSPECT = """(() => {
  const maps = Array.from(document.querySelectorAll("svg.heatmap")).map(svg => {
    const cells = svg.querySelectorAll("g.cells rect");
    const fills = new Set(Array.from(cells, c => getComputedStyle(c).fill));
    const box = cells.length ? cells[0].getBoundingClientRect() : {width: 0, height: 0};
    return {declared: Number(svg.dataset.cells), drawn: cells.length, fills: Array.from(fills),
            width: box.width, height: box.height};
  });
  return {
    maps: maps, ready: document.documentElement.dataset.heatmaps,
    curves: Array.from(document.querySelectorAll("svg.curve polyline"),
                       p => p.getAttribute("points").split(" ").length),
    strips: document.querySelectorAll("svg.strip").length,
    blocks: document.querySelectorAll("svg.strip rect").length,
    kpis: Object.fromEntries(Array.from(document.querySelectorAll(".kpis div"),
                             d => [d.querySelector("span").textContent,
                                   d.querySelector("b").textContent])),
    verify: document.querySelector("#verify + pre").textContent,
  };
})()"""


def rgb(colour: str) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def look_at(page: Path, runs: int) -> dict:
    """Load ``page`` in Chromium: no errors, every heatmap cell drawn in a heat
    colour, curves and strips there, the hover details of the hottest cell of
    the first map right. A screenshot is left beside the page."""
    with Chromium() as browser:
        browser.load(page)
        seen = browser.evaluate(INSPECT)
        assert browser.problems() == []
        assert seen["ready"] == str(runs) and len(seen["maps"]) == runs
        heat = {rgb(c) for c in HEAT}
        for m in seen["maps"]:
            assert m["drawn"] == m["declared"] > 200, m
            assert set(m["fills"]) <= heat and len(m["fills"]) >= 4, m["fills"]
            assert m["width"] > 0 and m["height"] > 0
        assert len(seen["curves"]) == 2 * runs and min(seen["curves"]) > 20
        assert seen["strips"] >= 10 and seen["blocks"] > 200
        # Hover the hottest cell of the first map: the details name its function.
        data = json.loads(browser.evaluate("document.getElementById('heat-data').textContent"))
        first = data["maps"][0]
        k = max(range(len(first["cells"])), key=lambda i: first["counts"][i])
        cell = first["cells"][k]
        x = first["left"] + (cell % first["columns"]) * first["cell"] + 2
        y = first["top"] + (cell // first["columns"]) * first["cell"] + 2
        browser.evaluate("document.getElementById('heatmap-0').scrollIntoView()")
        box = browser.evaluate("(() => { const b = document.getElementById('heatmap-0')"
                               ".getBoundingClientRect(); return [b.left, b.top]; })()")
        browser.send("Input.dispatchMouseEvent", session=True, type="mouseMoved",
                     x=box[0] + x, y=box[1] + y)
        tip = browser.evaluate("[document.getElementById('tip').hidden, "
                               "document.getElementById('tip').textContent]")
        assert not tip[0], tip
        assert f"{first['counts'][k]:,} fetches" in tip[1]
        assert data["names"][first["names"][k]] in tip[1]
        assert browser.problems() == []
        browser.screenshot(page.with_suffix(".png"))
    return seen


def test_rewrite_report_in_a_browser(rewritten):
    _kernel, _profile, d = rewritten
    page = d / "rewrite.html"
    assert page.stat().st_size < 3_000_000
    seen = look_at(page, runs=2)
    assert "verify: ok" in seen["verify"]
    assert seen["kpis"]["taken branches (predicted)"].startswith("-")
    # The layout gathers the hot code: fewer pages hold 99% of the fetches.
    before, after = (int(n.replace(",", "")) for n in
                     seen["kpis"]["4-KiB pages holding 99% of fetches"].split(" → "))
    assert after < before / 2


def test_report_command_measures_the_optimized_kernel(rewritten):
    """The optimized kernel profiled under QEMU; `kbuild-bolt report` verifies it
    against the input and measures it: what was predicted is what runs."""
    kernel, profile, d = rewritten
    reprofile = d / "optimized.kbb"
    cli("profile", "record", "--kernel", d / "vmlinux", "--initrd", kernel.initramfs,
        "--workload", "files", "--nokaslr", "-o", reprofile)
    page = d / "measured.html"
    cli("report", kernel.vmlinux, "--profile", profile, *LAYOUT, "--optimized", d / "vmlinux",
        "--reprofile", reprofile, "-o", page, "-q")
    seen = look_at(page, runs=3)
    assert "verify: ok" in seen["verify"]
    predicted = float(seen["kpis"]["taken branches (predicted)"].rstrip("%"))
    measured = float(seen["kpis"]["taken branches (measured)"].rstrip("%"))
    assert measured < -30 and abs(measured - predicted) < 10, (predicted, measured)
