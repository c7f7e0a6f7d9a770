"""Where the lab keeps what is expensive to make: kernel sources, builds, downloads.

Everything lives outside the repository, under ``$KBUILD_BOLT_CACHE`` or
``$XDG_CACHE_HOME/kbuild-bolt`` (``~/.cache/kbuild-bolt``), so only the first
run on a machine pays for a kernel build.  Work that must not run twice at
once (two pytest-xdist workers asking for the same kernel) takes a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("KBUILD_BOLT_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = Path(base) / "kbuild-bolt"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def locked(name: str):
    """Hold the cache-wide lock ``name`` (blocking) for the duration of the block."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
