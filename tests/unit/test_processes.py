"""ForkedCall: work on the other core, its value or its exception back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kbuild_bolt.dwarf.leb import DwarfError
from kbuild_bolt.processes import ForkedCall, in_shares


def _pid_and(value):
    return os.getpid(), value


def test_the_value_comes_back_from_a_child():
    big = bytes(range(256)) * 40_000          # (10 MB: more than a pipe holds)
    pid, value = ForkedCall(_pid_and, big).result()
    assert pid != os.getpid()
    assert value == big


def _fail():
    raise DwarfError(".debug_line unit at 0x10: version 9 is not supported")


def test_the_child_s_exception_is_raised_in_the_parent():
    with pytest.raises(DwarfError, match="version 9 is not supported"):
        ForkedCall(_fail).result()


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no")


def _fail_oddly():
    raise _Unpicklable("odd")


def test_an_exception_that_cannot_travel_still_says_what_it_was():
    with pytest.raises(RuntimeError, match="_Unpicklable: odd"):
        ForkedCall(_fail_oddly).result()


def test_a_child_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="without a result"):
        ForkedCall(os._exit, 3).result()


def test_cancel_stops_a_child_at_once():
    call = ForkedCall(time.sleep, 60)
    started = time.monotonic()
    call.cancel()
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(call.pid, 0)                  # reaped: no zombie left


def test_without_a_process_to_spare_the_work_is_done_here(monkeypatch):
    def no_fork():
        raise BlockingIOError("Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    pid, value = ForkedCall(_pid_and, 7).result()
    assert (pid, value) == (os.getpid(), 7)
    with pytest.raises(DwarfError, match="version 9"):
        ForkedCall(_fail).result()


SCENARIO = r"""
import threading
from functools import cached_property
from kbuild_bolt.processes import ForkedCall

inside, release = threading.Event(), threading.Event()

class Image:
    @cached_property
    def symbols(self):
        if not inside.is_set():
            inside.set()
            release.wait()      # a thread of the parent stays inside the property
        return 42

def other_image_symbols():
    return Image().symbols

threading.Thread(target=lambda: Image().symbols, daemon=True).start()
inside.wait()
print(ForkedCall(other_image_symbols).result())
release.set()
"""


def test_a_child_forked_while_a_thread_is_in_a_cached_property_does_not_hang():
    """Python 3.11's cached_property holds one lock for all instances: forked
    while a parent thread holds it, the child would wait for it forever."""
    proc = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "42", proc.stderr


def _share_and_pid(share):
    if share == "bad":
        raise DwarfError("bad share")
    return share * 2, os.getpid()


def test_shares_come_back_in_order_from_this_process_and_children():
    results = in_shares(_share_and_pid, list(range(7)), 3)
    assert [value for value, _ in results] == [0, 2, 4, 6, 8, 10, 12]
    pids = [pid for _, pid in results]
    # consecutive runs, the first one here
    assert pids[:2] == [os.getpid()] * 2
    assert len(set(pids)) == 3 and pids == sorted(pids, key=pids.index)


def test_a_failing_share_is_raised_and_no_child_is_left():
    before = set(_children())
    with pytest.raises(DwarfError, match="bad share"):
        in_shares(_share_and_pid, [1, 2, "bad", 4], 2)
    with pytest.raises(DwarfError, match="bad share"):
        in_shares(_share_and_pid, ["bad", 2, 3, 4], 2)
    assert set(_children()) <= before


def _children():
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def test_one_process_runs_every_share_here():
    results = in_shares(_share_and_pid, [1, 2, 3], 1)
    assert results == [(2, os.getpid()), (4, os.getpid()), (6, os.getpid())]


FORK_WINDOW = r"""
import os, signal, sys
from kbuild_bolt import processes
from kbuild_bolt.errors import Interrupted

processes.install_signal_handlers()
parent, real_fork = os.getpid(), os.fork

def fork():
    pid = real_fork()
    if pid == 0:
        os.kill(os.getpid(), int(sys.argv[1]))     # the moment right after the fork
    return pid

os.fork = fork
try:
    print("value", processes.ForkedCall(abs, -1).result(), flush=True)
except RuntimeError as e:
    print("parent:", e, flush=True)
except (Interrupted, KeyboardInterrupt):
    print("interrupted in the", "parent" if os.getpid() == parent else "child", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_the_fork_never_runs_the_parent_s_code_in_the_child(signum):
    """Delivered between fork() and the child's own handlers, the parent's
    handler would raise in the child, which would go on as a copy of the
    parent (its cleanup, its messages)."""
    proc = subprocess.run([sys.executable, "-c", FORK_WINDOW, str(int(signum))],
                          capture_output=True, text=True, timeout=60)
    # TERM ends the child; INT is ignored there and the value comes back
    expected = ("parent: a forked worker ended without a result" if signum == signal.SIGTERM
                else "value 1")
    assert proc.stdout.strip() == expected, proc.stderr


PARENT_WINDOW = r"""
import os, signal, sys, time
from kbuild_bolt import processes
from kbuild_bolt.errors import Interrupted

processes.install_signal_handlers()
real_fork = os.fork

def fork():
    pid = real_fork()
    if pid != 0:
        os.kill(os.getpid(), signal.SIGTERM)       # the parent's moment after the fork
    return pid

os.fork = fork
try:
    processes.ForkedCall(time.sleep, 60)
    print("no signal", flush=True)
except Interrupted:
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as f:
        print("interrupted; children:", f.read().split(), flush=True)
"""


def test_a_signal_to_the_parent_at_the_fork_stops_the_child_it_cannot_return():
    proc = subprocess.run([sys.executable, "-c", PARENT_WINDOW], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "interrupted; children: []", proc.stderr
