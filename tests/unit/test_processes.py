"""ForkedCall: work on the other core, its value or its exception back."""

from __future__ import annotations

import os
import time

import pytest

from kbuild_bolt.dwarf.leb import DwarfError
from kbuild_bolt.processes import ForkedCall


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
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "42", proc.stderr
