"""benchmarks/measure.py: what a benchmark says a command's tree held."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from measure import measure  # noqa: E402

# Each process makes ``mb`` megabytes of its own (touched) and waits for the
# other, so both hold theirs at the same time.
TWO_PROCESSES = r"""
import os, sys, time
mb = int(sys.argv[1])
read, write = os.pipe()
pid = os.fork()
own = bytearray(b"\x01") * (mb << 20)     # (written: resident, not shared)
if pid == 0:
    os.write(write, b"x")
    time.sleep(0.5)
    os._exit(0)
os.read(read, 1)
time.sleep(0.5)
os.waitpid(pid, 0)
"""


def test_a_forked_child_s_own_memory_adds_to_the_tree():
    run = measure([sys.executable, "-c", TWO_PROCESSES, "80"])
    assert run.returncode == 0, run.output
    # the largest process holds one 80 MB buffer; the tree held two at once
    assert 80 <= run.peak_rss_mb < 150
    assert run.peak_tree_mb >= 155


def test_one_process_s_tree_is_its_own_memory():
    run = measure([sys.executable, "-c",
                   "import os, time; b = bytearray(b'\\x01') * (60 << 20); time.sleep(0.4)"])
    assert run.returncode == 0, run.output
    assert 60 <= run.peak_tree_mb <= run.peak_rss_mb + 1
