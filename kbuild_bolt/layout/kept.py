"""ext-TSP orders kept between runs, one per function, under a digest of all that
the order is computed from.

ext-TSP is the largest cost of a profile layout left in Python, and its result
is a pure function of its input: a function's block sizes, block counts, edge
weights (in the order they are given: ties are broken by it) and which blocks
branch, and of the ext-TSP code itself. So each order is kept in the cache
directory (under Kbuild: the build tree, beside the kept analysis) under a
digest of that input, with the code's hash in the file's name. It comes back
wherever the same input does:
- the same vmlinux rewritten again with the same profile (`make` runs the
  post-link step at every link);
- the unchanged functions of a rebuilt kernel, with the same profile, where
  the block numbers of the whole kernel have shifted (orders are kept in
  positions inside the function, not in block numbers).

A kept order is only trusted as a permutation of the function's blocks with
its entry first; anything else is computed again. The file is written
atomically and holds the orders used or made by the newest run first, then
older ones, at most ``LIMIT`` of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import NotStoredNpz, read_stored_npz
from kbuild_bolt.atomic import atomic_output

LIMIT = 200_000            # orders kept in a directory (a few MB)
_DIGEST = 16
_CODE = Path(__file__).resolve().with_name("exttsp.py")


def _code_hash() -> str:
    return hashlib.sha256(_CODE.read_bytes()).hexdigest()[:12]


def input_digest(sizes: list, counts: list, edges: list, cond: list) -> bytes:
    """The key of one function's order: ``sizes``, ``counts`` and ``cond`` per block
    position, ``edges`` as (source position, target position, weight) in the order
    ext-TSP is given them. (repr keeps ints and floats apart and floats exact.)"""
    text = repr((sizes, counts, edges, cond)).encode()
    return hashlib.blake2b(text, digest_size=_DIGEST).digest()


class KeptOrders:
    """The orders of a cache directory; :meth:`get` finds, :meth:`add` records,
    :meth:`save` writes back (best effort: a directory that cannot be written
    only means the next run computes them again)."""

    def __init__(self, directory=None, digests: bytes = b"", starts=None, positions=None):
        self.directory = directory
        self._digests = digests
        self._starts = starts if starts is not None else np.zeros(1, np.int64)
        self._positions = positions if positions is not None else np.zeros(0, np.int32)
        self._index: dict[bytes, int] | None = None
        self.used: dict[bytes, list[int]] = {}    # found or added by this run
        self.added: dict[bytes, list[int]] = {}   # computed by this run
        self.hits = 0

    @classmethod
    def load(cls, directory) -> "KeptOrders":
        if directory is None:
            return cls()
        path = Path(directory) / f"orders-{_code_hash()}.npz"
        try:
            try:
                arrays = read_stored_npz(path)
            except NotStoredNpz:
                return cls(directory)
            digests = arrays["digests"]
            starts = arrays["starts"].astype(np.int64, copy=False)
            positions = arrays["positions"]
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile):
            return cls(directory)
        n = len(starts) - 1
        if (digests.dtype != np.uint8 or digests.shape != (max(n, 0), _DIGEST) or n < 0
                or starts[0] != 0 or starts[-1] != len(positions)
                or (n and np.any(np.diff(starts) < 0))):
            return cls(directory)
        return cls(directory, digests.tobytes(), starts, positions)

    def get(self, digest: bytes, n: int) -> list[int] | None:
        """The kept order of a function of ``n`` blocks, as block positions, or None."""
        i = self._kept().get(digest)
        if i is None:
            return None
        order = self._positions[self._starts[i]:self._starts[i + 1]].tolist()
        # (a digest collision or a damaged entry must not give a wrong order)
        if len(order) != n or order[0] != 0 or sorted(order) != list(range(n)):
            return None
        self.used[digest] = order
        self.hits += 1
        return order

    def _kept(self) -> dict[bytes, int]:
        """digest -> entry of the file, made when first asked."""
        if self._index is None:
            raw = self._digests
            self._index = {raw[k:k + _DIGEST]: i
                           for i, k in enumerate(range(0, len(raw), _DIGEST))}
        return self._index

    def add(self, digest: bytes, order: list[int]) -> None:
        self.used[digest] = order
        self.added[digest] = order

    def delta(self) -> tuple:
        """What this process found and added, for :meth:`merge` in another."""
        return self.used, self.added, self.hits

    def merge(self, delta: tuple | None) -> None:
        """What another process (a forked share of the functions) found and added."""
        if delta is None:
            return
        used, added, hits = delta
        for digest, order in used.items():
            self.used.setdefault(digest, order)
        self.added.update(added)
        self.hits += hits

    def save(self) -> None:
        if self.directory is None or not self.added:
            return
        entries: list = list(self.used.items())[:LIMIT]   # (an order, or a kept entry)
        for digest, i in self._kept().items():
            if len(entries) >= LIMIT:
                break
            if digest not in self.used:
                entries.append((digest, i))
        digests = np.frombuffer(b"".join(d for d, _ in entries), np.uint8).reshape(-1, _DIGEST)
        parts = [np.asarray(o, np.int32) if isinstance(o, list)
                 else self._positions[self._starts[o]:self._starts[o + 1]]
                 for _, o in entries]
        starts = np.zeros(len(parts) + 1, np.int64)
        starts[1:] = np.cumsum([len(p) for p in parts])
        positions = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        directory = Path(self.directory)
        name = f"orders-{_code_hash()}.npz"
        with contextlib.suppress(OSError):
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_output(directory / name) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, digests=digests, starts=starts, positions=positions)
            for old in directory.glob("orders-*.npz"):   # (made by other versions)
                if old.name != name:
                    old.unlink()
