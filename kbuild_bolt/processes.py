"""Processes that end when kbuild-bolt ends, however it ends.

- Signals: SIGTERM and SIGHUP (``timeout``, a CI runner, a closed terminal)
  become an :class:`~kbuild_bolt.errors.Interrupted` exception in the main
  thread, as SIGINT becomes ``KeyboardInterrupt``, so every cleanup runs
  (temporary outputs removed, worker pools and QEMU stopped).
- Children (decode workers, QEMU) get a parent-death signal: if kbuild-bolt is
  killed outright (SIGKILL, the OOM killer), the kernel kills them too, and no
  worker keeps hundreds of megabytes or the caller's stdout alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal

from kbuild_bolt.errors import Interrupted

_PR_SET_PDEATHSIG = 1
_TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux). For
    ``preexec_fn`` and pool initializers; ``parent_pid`` closes the race where
    the parent died before the request was made."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: nothing to ask
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread."""
    for signum in _TERMINATING:
        signal.signal(signum, _raise_interrupted)


def _worker_start(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # The parent handles Ctrl-C for the whole group and terminates the pool;
    # TERM (from the parent's terminate()) ends a worker at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in _TERMINATING:
        signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def worker_pool(jobs: int):
    """A pool of ``jobs`` forked workers (they inherit what the parent has mapped),
    terminated when the block ends, normally or not."""
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(jobs, initializer=_worker_start, initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def child_dies_with_us():
    """A ``preexec_fn`` for subprocesses (QEMU) that must not outlive kbuild-bolt."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)
