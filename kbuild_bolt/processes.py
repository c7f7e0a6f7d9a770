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
import functools
import multiprocessing
import os
import pickle
import signal
import sys
import threading

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


def _fresh_cached_property_locks() -> None:
    """functools.cached_property before Python 3.12 takes one RLock per property,
    shared by all instances. A fork while another thread of the parent is inside
    such a property (the debug-info check reads ELF files in threads) leaves that
    lock taken for good in the child: it would hang on its first use. A forked
    child gets new ones."""
    for module in list(sys.modules.values()):
        with contextlib.suppress(Exception):    # (a module of an odd kind: not ours)
            for value in list(vars(module).values()):
                if not isinstance(value, type):
                    continue
                for attr in list(vars(value).values()):
                    if isinstance(attr, functools.cached_property) and hasattr(attr, "lock"):
                        attr.lock = threading.RLock()


def _worker_start(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    _fresh_cached_property_locks()
    # The parent handles Ctrl-C for the whole group and terminates the pool;
    # TERM (from the parent's terminate()) ends a worker at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in _TERMINATING:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_BLOCKED)


# Blocked while workers are forked, until each has its own handlers: a Ctrl-C at
# that moment would otherwise raise KeyboardInterrupt in a half-started worker
# (a traceback on the terminal); the parent gets it once the pool exists.
_STARTUP_BLOCKED = {signal.SIGINT, *_TERMINATING}


@contextlib.contextmanager
def worker_pool(jobs: int):
    """A pool of ``jobs`` forked workers (they inherit what the parent has mapped),
    terminated when the block ends, normally or not."""
    ctx = multiprocessing.get_context("fork")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_BLOCKED)
    try:
        pool = ctx.Pool(jobs, initializer=_worker_start, initargs=(os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


class ForkedCall:
    """``fn(*args)`` running in a forked child, on the other core, while the caller
    goes on; :meth:`result` returns its value (pickled back through a pipe, read
    by a thread as it comes so the child never waits on a full pipe) or raises
    its exception. The child sees the parent's memory as it was at the fork, so
    it needs no arguments copied; it dies with the parent."""

    def __init__(self, fn, *args):
        self._done, self._reader, self._payload, self._here = True, None, bytearray(), None
        read_end, write_end = os.pipe()
        parent = os.getpid()
        try:
            self.pid = os.fork()
        except OSError:
            # (no process to spare, e.g. a process limit: the work is done here, now;
            # an error raised by it waits for result(), as the child's would)
            os.close(read_end)
            os.close(write_end)
            self.pid = None
            try:
                self._here = (True, fn(*args))
            except Exception as e:
                self._here = (False, e)
            return
        if self.pid == 0:                       # the child
            status = 1
            try:
                os.close(read_end)
                _worker_start(parent)
                payload = self._run(fn, args)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        self._done = False
        self._reader = threading.Thread(target=self._read, args=(read_end,), daemon=True)
        self._reader.start()

    @staticmethod
    def _run(fn, args) -> bytes:
        try:
            return pickle.dumps((True, fn(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as e:      # (reported to the parent, which raises it)
            try:
                return pickle.dumps((False, e))
            except Exception:
                return pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            while chunk := pipe.read(1 << 20):
                self._payload += chunk

    def result(self):
        if self._reader is not None:
            self._reader.join()
        self._reap()
        if self._here is not None:
            (ok, value), self._here = self._here, None
            if not ok:
                raise value
            return value
        payload, self._payload = self._payload, bytearray()
        if not payload:
            raise RuntimeError("a forked worker ended without a result")
        ok, value = pickle.loads(payload)
        if not ok:
            raise value
        return value

    def cancel(self) -> None:
        """Stop the child (the caller failed or was interrupted)."""
        if not self._done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap()
        if self._reader is not None:
            self._reader.join()
        self._payload, self._here = bytearray(), None

    def _reap(self) -> None:
        if not self._done:
            os.waitpid(self.pid, 0)
            self._done = True


def child_dies_with_us():
    """A ``preexec_fn`` for subprocesses (QEMU) that must not outlive kbuild-bolt."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)
