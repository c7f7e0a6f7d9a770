"""The ELF symbol table as numpy arrays, with names decoded once, in bulk."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.elf.image import SYM, STT_FUNC


class SymbolTable:
    """Symbols of one SHT_SYMTAB: ``raw`` is the Elf64_Sym record array."""

    def __init__(self, raw: np.ndarray, strtab):
        self.raw = raw
        self._strtab = bytes(strtab)
        self._prefixed: dict[tuple, np.ndarray] = {}

    @classmethod
    def empty(cls) -> "SymbolTable":
        return cls(np.zeros(0, SYM), b"\0")

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def value(self) -> np.ndarray:
        return self.raw["value"]

    @property
    def size(self) -> np.ndarray:
        return self.raw["size"]

    @property
    def shndx(self) -> np.ndarray:
        return self.raw["shndx"]

    @property
    def type(self) -> np.ndarray:
        return self.raw["info"] & 0xF

    @property
    def bind(self) -> np.ndarray:
        return self.raw["info"] >> 4

    @cached_property
    def names(self) -> list[str]:
        strtab = self._strtab
        offsets = self.raw["name"].astype(np.int64)
        if not len(offsets):
            return []
        nuls = np.flatnonzero(np.frombuffer(strtab, np.uint8) == 0)
        at = np.searchsorted(nuls, offsets)
        ends = np.where(at < len(nuls), nuls[np.minimum(at, len(nuls) - 1)], len(strtab))
        starts, ends = offsets.tolist(), ends.tolist()
        if strtab.isascii():
            # (one decode for the whole table: an ASCII string's character
            # offsets are its byte offsets)
            text = strtab.decode("ascii")
            return [text[a:b] for a, b in zip(starts, ends)]
        return [strtab[a:b].decode("utf-8", "replace") for a, b in zip(starts, ends)]

    @cached_property
    def name_hashes(self) -> np.ndarray:
        """Python's hash of every symbol's name (int64): names compared in bulk."""
        return np.fromiter(map(hash, self.names), np.int64, len(self.raw))

    def named(self, names) -> np.ndarray:
        """Per symbol: its name is one of ``names`` (found by hash, then compared)."""
        wanted = set(names)
        out = np.zeros(len(self.raw), bool)
        if not wanted or not len(self.raw):
            return out
        maybe = np.flatnonzero(isin(self.name_hashes, np.array([hash(n) for n in wanted],
                                                                  np.int64)))
        all_names = self.names
        out[maybe] = [all_names[i] in wanted for i in maybe.tolist()]
        return out

    def names_start_with(self, prefixes: tuple[str, ...]) -> np.ndarray:
        """Whether each symbol's name starts with one of ``prefixes`` (ASCII),
        compared in the string table: no name is decoded. (Kept: functions and
        regions both ask for the call padding's prefixes.)"""
        known = self._prefixed.get(prefixes)
        if known is not None:
            return known
        strtab = np.frombuffer(self._strtab, np.uint8)
        offsets = self.raw["name"].astype(np.int64)
        out = np.zeros(len(offsets), bool)
        longest = max((len(p) for p in prefixes), default=0)
        # (zeros past the end: a name near it simply does not match)
        padded = np.concatenate([strtab, np.zeros(longest, np.uint8)])
        offsets = np.minimum(offsets, len(strtab))
        for prefix in prefixes:
            want = np.frombuffer(prefix.encode("ascii"), np.uint8)
            got = padded[offsets[:, None] + np.arange(len(want))]
            out |= (got == want).all(axis=1)
        self._prefixed[prefixes] = out
        return out

    @cached_property
    def _index_by_name(self) -> dict[str, int]:
        # Globals win over locals of the same name; among equals, the first.
        # (dict() keeps the last of equal keys: so locals go first, and each
        # group from its last symbol to its first)
        names = self.names
        rows = np.arange(len(names))
        local = self.bind == 0
        order = np.concatenate([rows[local][::-1], rows[~local][::-1]]).tolist()
        index = dict(zip([names[i] for i in order], order))
        index.pop("", None)
        return index

    def index(self, name: str) -> int | None:
        return self._index_by_name.get(name)

    def rows_of(self, names) -> np.ndarray:
        """:meth:`index` of each name, -1 where there is none."""
        get = self._index_by_name.get
        return np.array([get(name, -1) for name in names], np.int64)

    def address(self, name: str) -> int | None:
        """Value of symbol ``name`` (None when absent)."""
        i = self._index_by_name.get(name)
        return None if i is None else int(self.raw["value"][i])

    def functions_in(self, shndx: int) -> np.ndarray:
        """Indices of STT_FUNC symbols defined in section ``shndx``, by address."""
        mask = (self.type == STT_FUNC) & (self.shndx == shndx)
        idx = np.flatnonzero(mask)
        return idx[np.argsort(self.raw["value"][idx], kind="stable")]
