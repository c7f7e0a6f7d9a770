"""Run a command and report its wall time and peak memory (its whole process tree).

Used by the benchmark scripts. Two memory figures:

- ``peak_rss_mb``: ``os.wait4``'s ``ru_maxrss``, the largest single process of
  the tree at its largest. A forked child counts the pages it shares with its
  parent, and the tree's processes are not added up: for a tool that forks,
  this is not what the machine had to hold.
- ``peak_tree_mb``: what the machine held for the whole tree at once, sampled
  every 20 ms: the sum of every live process's PSS (a page shared by n
  processes counts 1/n to each, so shared pages count once in the sum). A
  single-process tool's two figures agree up to the sampling.

The command is started by a small helper process: a child forked (or vforked)
straight from a benchmark that has grown (a profile recorded in it) would
count the benchmark's pages in its own peak RSS.
"""

from __future__ import annotations

import os
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
    peak_tree_mb: float = 0.0


# The helper: runs the command with its output on the helper's, samples its
# tree's PSS, and writes "seconds peak-rss-kb exit-code peak-tree-kb" to the
# file named first.
_HELPER = """
import os, subprocess, sys, threading, time

def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

started = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
peak, done = [0], threading.Event()

def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], sum(pss_kb(p) for p in tree(proc.pid)))

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
_pid, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - started
done.set()
sampler.join()
with open(sys.argv[1], "w") as out:
    out.write(f"{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {peak[0]}")
"""


def measure(command: list[str], env=None) -> Run:
    # (each run starts with what the last one wrote written back: the kernel's
    # writeback of a 34 MB output otherwise runs into the next one's time)
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".measure") as result:
        proc = subprocess.run([sys.executable, "-c", _HELPER, result.name, *command],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        seconds, rss_kb, returncode, tree_kb = result.read().split()
    return Run(command, round(float(seconds), 2), round(int(rss_kb) / 1024, 1),
               int(returncode), proc.stdout.decode(errors="replace"),
               round(int(tree_kb) / 1024, 1))


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
