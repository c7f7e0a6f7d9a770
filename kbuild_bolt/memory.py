"""Give freed heap memory back to the system between phases.

Large numpy temporaries come from glibc's heap once its mmap threshold has
grown (it grows each time a big block is freed), and freed heap memory is
kept by the process: after reading the distro kernel ~350 MB of it would stay
resident for the rest of the rewrite. ``malloc_trim`` returns it, so each
phase's temporaries start from what is really in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None


# Arrays of this size or more get pages of their own from the system, given back
# when they are freed (glibc's M_MMAP_THRESHOLD).
OWN_PAGES_FROM = 1 << 20
_M_MMAP_THRESHOLD = -3
# Free memory kept at the top of the heap when it shrinks (glibc's M_TOP_PAD).
HEAP_TOP_KEPT = 8 << 20
_M_TOP_PAD = -2
_M_ARENA_MAX = -8


def _c_library():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def tune_heap() -> None:
    """glibc's heap, set for a rewrite (once per process; glibc only).

    The mmap threshold is fixed at OWN_PAGES_FROM. Left to itself, glibc raises
    it to the size of each big block freed (up to 32 MB), so the whole-kernel
    temporaries of one phase (columns of millions of entries) come from the
    heap afterwards and stay resident after they are freed, scattered between
    live blocks where malloc_trim cannot give them back: 10-20 MB at each later
    peak of a rewrite.

    HEAP_TOP_KEPT stays at the top of the heap when it shrinks. With glibc's
    128 KB, the temporaries below the threshold (a function's columns, a
    table's) are given back as they are freed and faulted in again page by page
    by the next: 6.1-regular's rewrite took 225 k page faults, 0.6 s of system
    time, against llvm-bolt-22's 36 k; with 8 MB kept, 150 k and 0.45 s, for
    a few MB more at the peak. (trim() between phases still gives back
    everything free.)

    One heap for every thread: each thread's own heap would keep its top as
    well (11 MB more at the peak of Debian's kernel with its DWARF), and the
    threads here take turns at the interpreter anyway."""
    libc = _c_library()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, OWN_PAGES_FROM)
        libc.mallopt(_M_TOP_PAD, HEAP_TOP_KEPT)
        libc.mallopt(_M_ARENA_MAX, 1)


def trim() -> None:
    """Collect garbage and return free heap pages to the system (glibc only)."""
    gc.collect()
    libc = _c_library()
    if libc:
        libc.malloc_trim(0)


def freeze_survivors() -> bool:
    """Take every object alive now out of the cyclic collector's sight (after a
    :func:`trim`), when nothing else has: True if this call froze them, and
    :func:`thaw` must follow. The model of the input lives for the whole
    rewrite; each later collection would walk its containers again (20-45 ms
    at each trim of a 6.12-regular rewrite)."""
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def thaw() -> None:
    """Give the frozen objects back to the collector (their cycles are collected
    again: a process that rewrites many times does not keep them)."""
    gc.unfreeze()
