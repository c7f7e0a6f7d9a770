"""Run a command and report its wall time and peak RSS (its whole process tree).

Used by the benchmark scripts; ``os.wait4`` gives the child's resource usage,
whose ``ru_maxrss`` covers the largest process in its tree (forked decode
workers included).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Run:
    command: list[str]
    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str


def measure(command: list[str], env=None) -> Run:
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    return Run(command, round(seconds, 2), round(usage.ru_maxrss / 1024, 1), proc.returncode,
               out.decode(errors="replace"))


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
