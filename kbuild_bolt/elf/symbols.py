"""The ELF symbol table as numpy arrays, with names decoded once, in bulk."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from kbuild_bolt.elf.image import SYM, STT_FUNC


class SymbolTable:
    """Symbols of one SHT_SYMTAB: ``raw`` is the Elf64_Sym record array."""

    def __init__(self, raw: np.ndarray, strtab):
        self.raw = raw
        self._strtab = bytes(strtab)

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
        offsets = self.raw["name"].tolist()
        out = []
        cache: dict[int, str] = {}
        for off in offsets:
            name = cache.get(off)
            if name is None:
                end = strtab.find(b"\0", off)
                name = strtab[off:end if end >= 0 else len(strtab)].decode("utf-8", "replace")
                cache[off] = name
            out.append(name)
        return out

    @cached_property
    def _index_by_name(self) -> dict[str, int]:
        index: dict[str, int] = {}
        names = self.names
        # Globals win over locals of the same name; otherwise the first one.
        binds = self.bind.tolist()
        for i, name in enumerate(names):
            if not name:
                continue
            j = index.get(name)
            if j is None or (binds[j] == 0 and binds[i] != 0):
                index[name] = i
        return index

    def index(self, name: str) -> int | None:
        return self._index_by_name.get(name)

    def address(self, name: str) -> int | None:
        """Value of symbol ``name`` (None when absent)."""
        i = self._index_by_name.get(name)
        return None if i is None else int(self.raw["value"][i])

    def functions_in(self, shndx: int) -> np.ndarray:
        """Indices of STT_FUNC symbols defined in section ``shndx``, by address."""
        mask = (self.type == STT_FUNC) & (self.shndx == shndx)
        idx = np.flatnonzero(mask)
        return idx[np.argsort(self.raw["value"][idx], kind="stable")]
