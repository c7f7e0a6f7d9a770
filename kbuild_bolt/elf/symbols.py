"""The ELF symbol table as numpy arrays, with names decoded once, in bulk."""

from __future__ import annotations

from functools import cached_property
from operator import itemgetter

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.elf.image import SYM, STT_FUNC


# Names looked up one by one before the whole name index is built.
_LOOKUPS_BEFORE_INDEX = 256


class SymbolTable:
    """Symbols of one SHT_SYMTAB: ``raw`` is the Elf64_Sym record array."""

    def __init__(self, raw: np.ndarray, strtab):
        self.raw = raw
        self._strtab = bytes(strtab)
        self._prefixed: dict[tuple, np.ndarray] = {}
        self._lookups = 0

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
        if not strtab.isascii():
            return [strtab[a:b].decode("utf-8", "replace")
                    for a, b in zip(offsets.tolist(), ends.tolist())]
        # One decode and one split of the whole table (an ASCII string's
        # character offsets are its byte offsets): a name that starts a string
        # is that string, picked by the number of its NUL; one that is the tail
        # of another (the linker shares tails), or has no NUL, is cut out.
        text = strtab.decode("ascii")
        strings = text.split("\0")
        whole = (at < len(nuls)) & (offsets <= len(strtab))
        after_nul = np.ones(len(offsets), bool)
        inner = whole & (offsets > 0)
        after_nul[inner] = np.frombuffer(strtab, np.uint8)[offsets[inner] - 1] == 0
        whole &= after_nul
        picked = np.where(whole, at, 0).tolist()
        names = list(itemgetter(*picked)(strings)) if len(picked) > 1 else [strings[picked[0]]]
        for i in np.flatnonzero(~whole).tolist():
            names[i] = text[int(offsets[i]):int(ends[i])]
        return names

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
        # (dict() keeps the last of equal keys: every name from the last symbol
        # to the first, then the globals' the same way)
        names = self.names
        index = dict(zip(reversed(names), range(len(names) - 1, -1, -1)))
        rows = np.flatnonzero(self.bind != 0)[::-1].tolist()
        if rows:
            index.update(zip(itemgetter(*rows)(names) if len(rows) > 1 else [names[rows[0]]],
                             rows))
        index.pop("", None)
        return index

    def index(self, name: str) -> int | None:
        """The symbol named ``name``: a global before locals of that name, and
        among equals the first (None: none). The first lookups compare hashes
        of every name; many lookups build the name index instead (a dict of
        every name costs as much as a few hundred lookups)."""
        if "_index_by_name" in self.__dict__ or self._lookups >= _LOOKUPS_BEFORE_INDEX:
            return self._index_by_name.get(name)
        self._lookups += 1
        row = int(self.rows_of((name,))[0])
        return None if row < 0 else row

    def rows_of(self, names) -> np.ndarray:
        """:meth:`index` of each name, -1 where there is none (the symbols of
        those names found by their hashes, unless the name index is built)."""
        names = list(names)
        known = self.__dict__.get("_index_by_name")
        if known is not None:
            return np.array([known.get(name, -1) for name in names], np.int64)
        wanted = np.fromiter(map(hash, names), np.int64, len(names))
        rows = np.flatnonzero(isin(self.name_hashes, wanted))
        every = self.names
        best: dict[str, tuple[int, int]] = {}
        for row, bind in zip(rows.tolist(), (self.raw["info"][rows] >> 4).tolist()):
            name = every[row]
            have = best.get(name)
            if have is None or (bind != 0 and have[1] == 0):   # (rows ascending)
                best[name] = (row, bind)
        return np.array([best[name][0] if name and name in best else -1 for name in names],
                        np.int64)

    def address(self, name: str) -> int | None:
        """Value of symbol ``name`` (None when absent; see :meth:`index`)."""
        i = self.index(name)
        return None if i is None else int(self.raw["value"][i])

    def functions_in(self, shndx: int) -> np.ndarray:
        """Indices of STT_FUNC symbols defined in section ``shndx``, by address."""
        mask = (self.type == STT_FUNC) & (self.shndx == shndx)
        idx = np.flatnonzero(mask)
        return idx[np.argsort(self.raw["value"][idx], kind="stable")]
