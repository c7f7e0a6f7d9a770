"""Processes that end when kbuild-bolt ends, however it ends.

- Signals: SIGTERM and SIGHUP (``timeout``, a CI runner, a closed terminal)
  become an :class:`~kbuild_bolt.errors.Interrupted` exception in the main
  thread, as SIGINT becomes ``KeyboardInterrupt``, so every cleanup runs
  (temporary outputs removed, forked children and QEMU stopped).
- Children (forked ones that decode, order or verify, and QEMU) ask for a
  parent-death signal before anything else: if kbuild-bolt is killed outright
  (SIGKILL, the OOM killer), the kernel kills them too, and no child keeps
  hundreds of megabytes or the caller's stdout alive. Forked children are
  plain fork()s, not a multiprocessing pool: a pool worker runs Python code of
  multiprocessing's (and takes its locks) before its initializer can ask, and
  its terminate() waits for workers that SIGTERM may not reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pickle
import signal
import sys
import threading

from kbuild_bolt.errors import Interrupted

_PR_SET_PDEATHSIG = 1
_TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _find_prctl():
    """libc's prctl, looked up once here in the parent (None: not Linux). A child
    must not look it up: dlopen takes the dynamic loader's lock, which another
    thread of the parent may have held at the fork, for good in the child."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _find_prctl()


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux). For
    ``preexec_fn`` and forked children, first thing; ``parent_pid`` closes the
    race where the parent died before the request was made."""
    if _PRCTL is None:
        return  # not Linux: nothing to ask
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
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


# Blocked across a fork until the child has its own handlers: a signal in
# between would raise the parent's exception in the child, which would then
# run the parent's cleanup (and print its message) as a copy of the parent.
_FORK_BLOCKED = {signal.SIGINT, *_TERMINATING}


def _child_start(parent_pid: int, mask) -> None:
    die_with_parent(parent_pid)
    _fresh_cached_property_locks()
    # The parent handles Ctrl-C for the whole group and stops its children;
    # TERM ends a child at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in _TERMINATING:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def in_shares(fn, shares: list, jobs: int) -> list:
    """``[fn(share) for share in shares]``, the shares dealt out to ``jobs``
    processes: this one and forked children (:class:`ForkedCall`), each taking a
    run of consecutive shares. The children see the parent's memory, so ``fn``
    may read what the parent has mapped; whatever ends the parent (an error,
    Ctrl-C, SIGTERM, SIGKILL) ends them too."""
    jobs = max(1, min(jobs, len(shares)))
    bounds = [len(shares) * k // jobs for k in range(jobs + 1)]
    runs = [shares[bounds[k]:bounds[k + 1]] for k in range(jobs)]
    children = []
    try:
        for run in runs[1:]:
            children.append(ForkedCall(_each, fn, run))
        results = _each(fn, runs[0])
        for child in children:
            results.extend(child.result())
    except BaseException:
        for child in children:
            child.cancel()
        raise
    return results


def _each(fn, shares: list) -> list:
    return [fn(share) for share in shares]


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
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        try:
            self.pid = os.fork()
        except OSError:
            # (no process to spare, e.g. a process limit: the work is done here, now;
            # an error raised by it waits for result(), as the child's would)
            os.close(read_end)
            os.close(write_end)
            self.pid = None
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            try:
                self._here = (True, fn(*args))
            except Exception as e:
                self._here = (False, e)
            return
        if self.pid == 0:                       # the child
            status = 1
            try:
                os.close(read_end)
                _child_start(parent, mask)
                payload = self._run(fn, args)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
                status = 0
            finally:
                os._exit(status)
        # (signals are still blocked here, but one taken by another thread is
        # raised at any line: whatever is raised before the caller has this
        # object stops the child first, as the caller could not)
        try:
            self._done = False
            os.close(write_end)
            reader = threading.Thread(target=self._read, args=(read_end,), daemon=True)
            reader.start()
            self._reader = reader
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # (raises what came)
        except BaseException:
            self.cancel()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise

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


class OnThread:
    """``fn(*args)`` on a thread while the caller goes on, for work that lets go
    of the interpreter (reading a file, hashing it, CRCs of large buffers: the
    other CPU does it); :meth:`result` returns its value or raises its error."""

    def __init__(self, fn, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:      # (raised by result)
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def child_dies_with_us():
    """A ``preexec_fn`` for subprocesses (QEMU) that must not outlive kbuild-bolt."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)
