"""The ELF symbol table as numpy arrays, with names decoded once, in bulk."""

from __future__ import annotations

from functools import cached_property
from operator import itemgetter

import numpy as np

from kbuild_bolt.arrays import concat_ranges, unique
from kbuild_bolt.elf.image import SYM, STT_FUNC


# Names looked up one by one before the whole name index is built.
_LOOKUPS_BEFORE_INDEX = 256
# A name's key: its first bytes, its length mixed in (an odd constant).
_KEY_BYTES = 8
_LENGTH_MIX = 0x9E3779B97F4A7C15


def name_key(name: str) -> int:
    """The 64-bit key of a symbol name: its first _KEY_BYTES bytes (UTF-8, zeros
    past its end) as a little-endian number, xor its length times _LENGTH_MIX.
    Equal names have equal keys; few unequal ones do."""
    data = name.encode("utf-8")
    return int.from_bytes(data[:_KEY_BYTES], "little") ^ (len(data) * _LENGTH_MIX
                                                          & 0xFFFFFFFFFFFFFFFF)


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
    def _name_nuls(self) -> tuple[np.ndarray, np.ndarray]:
        """Per name, the number of the NUL that ends it in the string table (the
        count of NULs where there is none), and where it ends (that NUL, or the
        table's end)."""
        strtab = self._strtab
        nuls = np.flatnonzero(np.frombuffer(strtab, np.uint8) == 0)
        at = np.searchsorted(nuls, self.raw["name"].astype(np.int64))
        return at, np.where(at < len(nuls), nuls[np.minimum(at, len(nuls) - 1)], len(strtab))

    @property
    def _name_ends(self) -> np.ndarray:
        return self._name_nuls[1]

    @cached_property
    def names(self) -> list[str]:
        strtab = self._strtab
        offsets = self.raw["name"].astype(np.int64)
        if not len(offsets):
            return []
        at, ends = self._name_nuls
        if not strtab.isascii():
            return [strtab[a:b].decode("utf-8", "replace")
                    for a, b in zip(offsets.tolist(), ends.tolist())]
        # One decode and one split of the whole table (an ASCII string's
        # character offsets are its byte offsets): a name that starts a string
        # is that string, picked by the number of its NUL; one that is the tail
        # of another (the linker shares tails), or has no NUL, is cut out.
        text = strtab.decode("ascii")
        strings = text.split("\0")
        table = np.frombuffer(strtab, np.uint8)
        whole = (ends < len(strtab)) & (offsets <= len(strtab))
        after_nul = np.ones(len(offsets), bool)
        inner = whole & (offsets > 0)
        after_nul[inner] = table[offsets[inner] - 1] == 0
        whole &= after_nul
        picked = np.where(whole, at, 0).tolist()
        names = list(itemgetter(*picked)(strings)) if len(picked) > 1 else [strings[picked[0]]]
        for i in np.flatnonzero(~whole).tolist():
            names[i] = text[int(offsets[i]):int(ends[i])]
        return names

    @cached_property
    def name_keys(self) -> np.ndarray:
        """Per symbol, a 64-bit key of its name (:func:`name_key`): names looked
        up are compared only with the few symbols of their key, and no name is
        decoded or hashed to find them (70 ms of a lab kernel's symbols)."""
        strtab = self._strtab
        if not strtab.isascii():   # (a name decoded with replacements: by its string)
            return np.fromiter(map(name_key, self.names), np.uint64, len(self.raw))
        table = np.frombuffer(strtab, np.uint8)
        offsets = np.minimum(self.raw["name"].astype(np.int64), len(table))
        lengths = self._name_ends - offsets
        key = np.zeros(len(offsets), np.uint64)
        padded = np.concatenate([table, np.zeros(_KEY_BYTES, np.uint8)])
        for k in range(_KEY_BYTES):
            byte = np.where(lengths > k, padded[offsets + k], 0).astype(np.uint64)
            key |= byte << np.uint64(8 * k)
        return key ^ (lengths.astype(np.uint64) * np.uint64(_LENGTH_MIX))

    @cached_property
    def _keys_in_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(the rows by name key, their keys sorted): a name's candidates are a
        binary search away (a comparison with every key was a few tenths of a
        millisecond per lookup, and a rewrite looks up a few hundred names)."""
        order = np.argsort(self.name_keys, kind="stable")
        return order, self.name_keys[order]

    def _candidates(self, names: list[str]) -> np.ndarray:
        """Rows whose name may be one of ``names`` (by key; to be compared), in
        ascending order."""
        wanted = np.fromiter(map(name_key, names), np.uint64, len(names))
        order, keys = self._keys_in_order
        lo = np.searchsorted(keys, wanted, side="left")
        hi = np.searchsorted(keys, wanted, side="right")
        return unique(order[concat_ranges(lo, hi - lo)])

    def _names_of(self, rows: list[int]) -> list[str]:
        """The names of a few symbols (from the decoded names when they are)."""
        every = self.__dict__.get("names")
        if every is not None:
            return [every[i] for i in rows]
        strtab = self._strtab
        offsets = self.raw["name"][rows].tolist()
        ends = self._name_ends[rows].tolist()
        return [strtab[a:b].decode("utf-8", "replace") if a < len(strtab) else ""
                for a, b in zip(offsets, ends)]

    def named(self, names) -> np.ndarray:
        """Per symbol: its name is one of ``names`` (found by key, then compared)."""
        wanted = set(names)
        out = np.zeros(len(self.raw), bool)
        if not wanted or not len(self.raw):
            return out
        maybe = self._candidates(list(wanted)).tolist()
        out[maybe] = [name in wanted for name in self._names_of(maybe)]
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
            # Byte by byte, among the names that matched so far: the first byte
            # is read for every name, the next ones for fewer and fewer.
            rows = None
            for k, byte in enumerate(prefix.encode("ascii")):
                if rows is None:
                    rows = np.flatnonzero(padded[offsets] == byte)
                else:
                    rows = rows[padded[offsets[rows] + k] == byte]
            out[np.arange(len(offsets)) if rows is None else rows] = True
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
        rows = self._candidates(names)
        best: dict[str, tuple[int, int]] = {}
        for name, row, bind in zip(self._names_of(rows.tolist()), rows.tolist(),
                                   (self.raw["info"][rows] >> 4).tolist()):
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
