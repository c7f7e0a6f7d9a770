"""Run a command and report its wall time and peak RSS (its whole process tree).

Used by the benchmark scripts; ``os.wait4`` gives the child's resource usage,
whose ``ru_maxrss`` covers the largest process in its tree (forked decode
workers included). The command is started by a small helper process: a child
forked (or vforked) straight from a benchmark that has grown (a profile
recorded in it) would count the benchmark's pages in its own peak RSS.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Run:
    command: list[str]
    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str


# The helper: runs the command with its output on the helper's, and writes
# "seconds peak-rss-kb exit-code" to the file named first.
_HELPER = """
import os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_pid, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    out.write(f"{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def measure(command: list[str], env=None) -> Run:
    with tempfile.NamedTemporaryFile("r", suffix=".measure") as result:
        proc = subprocess.run([sys.executable, "-c", _HELPER, result.name, *command],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        seconds, rss_kb, returncode = result.read().split()
    return Run(command, round(float(seconds), 2), round(int(rss_kb) / 1024, 1),
               int(returncode), proc.stdout.decode(errors="replace"))


def best_of(command: list[str], repeat: int, env=None) -> Run:
    """The fastest of ``repeat`` runs (the machine is shared and noisy)."""
    runs = [measure(command, env) for _ in range(repeat)]
    for run in runs:
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({run.returncode}):\n{run.output[-2000:]}")
    return min(runs, key=lambda r: r.seconds)


def time_exttsp(model, cfg, profile) -> tuple[int, float]:
    """ext-TSP for every function the profile saw, on one core: (functions, seconds)."""
    from kbuild_bolt.layout.exttsp import ProfileLayout

    started = time.perf_counter()
    layout = ProfileLayout(model, cfg, profile)
    for row in sorted(layout.hot_rows):
        layout.order(row, list(cfg.blocks_of(row)))
    return len(layout.hot_rows), time.perf_counter() - started
