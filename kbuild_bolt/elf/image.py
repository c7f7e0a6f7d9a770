"""An x86-64 ELF image, read through mmap with numpy views for the bulk tables.

Only the ELF header, section headers and program headers are parsed eagerly
(a few hundred records); symbols and relocations are numpy record arrays made
on first use, so a 600 MB distro vmlinux with 400k relocations opens at once.
Every structural problem becomes a one-line :class:`KbbError`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.errors import KbbError

EM_X86_64 = 62
_MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V", 62: "x86-64", 8: "MIPS",
             20: "PowerPC", 21: "PowerPC64", 22: "s390", 258: "LoongArch"}

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 0, 1, 2, 3, 4
SHT_NOBITS, SHT_REL = 8, 9
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
PT_LOAD, PT_NOTE = 1, 4
ET_REL, ET_EXEC = 1, 2
SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON = 0, 0xFF00, 0xFFF1, 0xFFF2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2

EHDR = np.dtype([
    ("ident", "16u1"), ("type", "<u2"), ("machine", "<u2"), ("version", "<u4"),
    ("entry", "<u8"), ("phoff", "<u8"), ("shoff", "<u8"), ("flags", "<u4"),
    ("ehsize", "<u2"), ("phentsize", "<u2"), ("phnum", "<u2"), ("shentsize", "<u2"),
    ("shnum", "<u2"), ("shstrndx", "<u2"),
])
SHDR = np.dtype([
    ("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
    ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("addralign", "<u8"), ("entsize", "<u8"),
])
PHDR = np.dtype([
    ("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"), ("paddr", "<u8"),
    ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8"),
])
SYM = np.dtype([
    ("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
    ("value", "<u8"), ("size", "<u8"),
])
RELA = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])

# x86-64 relocation types a linked kernel carries (--emit-relocs), and the
# size of the field each one fills. Any other type is refused: code under a
# relocation kbuild-bolt cannot recompute must not move.
R_X86_64_NONE = 0
R_X86_64_64 = 1
R_X86_64_PC32 = 2
R_X86_64_PLT32 = 4
R_X86_64_32 = 10
R_X86_64_32S = 11
R_X86_64_PC64 = 24
PC_RELATIVE = (R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_PC64)
FIELD_SIZE = {R_X86_64_64: 8, R_X86_64_PC32: 4, R_X86_64_PLT32: 4, R_X86_64_32: 4,
              R_X86_64_32S: 4, R_X86_64_PC64: 8}
SIGNED = {R_X86_64_64: False, R_X86_64_PC32: True, R_X86_64_PLT32: True, R_X86_64_32: False,
          R_X86_64_32S: True, R_X86_64_PC64: True}
# Types of the psABI, for naming what is not supported.
_RELOCATION_NAMES = {
    3: "GOT32", 5: "COPY", 6: "GLOB_DAT", 7: "JUMP_SLOT", 8: "RELATIVE", 9: "GOTPCREL",
    12: "16", 13: "PC16", 14: "8", 15: "PC8", 16: "DTPMOD64", 17: "DTPOFF64", 18: "TPOFF64",
    19: "TLSGD", 20: "TLSLD", 21: "DTPOFF32", 22: "GOTTPOFF", 23: "TPOFF32", 25: "GOTOFF64",
    26: "GOTPC32", 27: "GOT64", 28: "GOTPCREL64", 29: "GOTPC64", 30: "GOTPLT64",
    31: "PLTOFF64", 32: "SIZE32", 33: "SIZE64", 34: "GOTPC32_TLSDESC", 35: "TLSDESC_CALL",
    36: "TLSDESC", 37: "IRELATIVE", 38: "RELATIVE64", 41: "GOTPCRELX", 42: "REX_GOTPCRELX",
}


def type_and_symbol(info: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The relocation type and symbol index of each ``r_info`` (both int64)."""
    info = np.asarray(info, np.uint64)
    return ((info & np.uint64(0xFFFFFFFF)).astype(np.int64),
            (info >> np.uint64(32)).astype(np.int64))


# Symbol types and bindings a vmlinux uses (NOTYPE..FILE, TLS; LOCAL, GLOBAL, WEAK).
_SYMBOL_TYPES = (0, 1, 2, 3, 4, 6)
_SYMBOL_BINDS = (0, 1, 2)


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def label(self) -> str:
        """Its name, or its index when it has none (for messages)."""
        return self.name or f"section {self.index}"

    @property
    def is_alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)

    @property
    def is_exec(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def has_bits(self) -> bool:
        return self.type != SHT_NOBITS

    def contains(self, addr: int) -> bool:
        return self.addr <= addr < self.addr + self.size


def _describe_symbol(record) -> str:
    return (f"value {int(record['value']):#x}, type {int(record['info']) & 0xF}, "
            f"binding {int(record['info']) >> 4}, section {int(record['shndx'])}")


def _cstring(blob, offset: int) -> str:
    end = blob.find(b"\0", offset)
    if end < 0:
        end = len(blob)
    return bytes(blob[offset:end]).decode("utf-8", "replace")


# Relocation records checked at once: a vmlinux's .rela.text holds hundreds of
# thousands, and each check makes temporaries of several times a record's size.
RELOCATION_PART = 1 << 16


def release_mapping(mapped, offset: int = 0, size: int | None = None) -> None:
    """Drop a shared file mapping's pages from this process (``madvise(DONTNEED)``):
    the data stays in the page cache, dirty pages of a writable mapping included,
    and is mapped again when next touched. Anything but an mmap is left alone.
    ``offset``, ``size``: only the pages wholly or partly in that part of it."""
    if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            if size is None and not offset:
                mapped.madvise(mmap.MADV_DONTNEED)
                return
            start = offset - offset % mmap.PAGESIZE
            end = len(mapped) if size is None else min(offset + size, len(mapped))
            if end > start:
                mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


class ElfImage:
    """A 64-bit little-endian x86-64 ELF file, opened read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        name = str(path)
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            raise KbbError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise KbbError(f"{name}: is a directory") from None
        except PermissionError:
            raise KbbError(f"{name}: permission denied") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 16 or handle.read(4) != b"\x7fELF":
                raise KbbError(f"{name}: not an ELF file")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.buf = memoryview(self._map)
        self.bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._parse_headers(name)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<memory>") -> "ElfImage":
        """An ELF file's bytes held in memory (a module decompressed from .ko.xz)."""
        self = cls.__new__(cls)
        self.path = Path(name)
        if len(data) < 16 or data[:4] != b"\x7fELF":
            raise KbbError(f"{name}: not an ELF file")
        self._map = data
        self.size = len(data)
        self.buf = memoryview(data)
        self.bytes = np.frombuffer(data, dtype=np.uint8)
        self._parse_headers(name)
        return self

    # -- headers -----------------------------------------------------------

    def _parse_headers(self, name: str) -> None:
        ident = self.bytes[:16]
        if ident[4] != 2:
            raise KbbError(f"{name}: 32-bit ELF, kbuild-bolt needs a 64-bit x86-64 vmlinux")
        if ident[5] != 1:
            raise KbbError(f"{name}: big-endian ELF, kbuild-bolt needs an x86-64 vmlinux")
        if self.size < EHDR.itemsize:
            raise KbbError(f"{name}: truncated ELF header")
        self.header = np.frombuffer(self._map, EHDR, 1)[0]
        machine = int(self.header["machine"])
        if machine != EM_X86_64:
            arch = _MACHINES.get(machine, f"machine {machine}")
            raise KbbError(f"{name}: {arch} ELF, kbuild-bolt needs an x86-64 vmlinux")
        shoff, shnum = int(self.header["shoff"]), int(self.header["shnum"])
        if shnum and int(self.header["shentsize"]) != SHDR.itemsize:
            raise KbbError(f"{name}: unexpected section header size")
        if shoff + shnum * SHDR.itemsize > self.size:
            raise KbbError(f"{name}: truncated (section headers end past the end of the file)")
        phoff, phnum = int(self.header["phoff"]), int(self.header["phnum"])
        if phoff + phnum * PHDR.itemsize > self.size:
            raise KbbError(f"{name}: truncated (program headers end past the end of the file)")
        self.shdrs = np.frombuffer(self._map, SHDR, shnum, shoff).copy()
        self.phdrs = np.frombuffer(self._map, PHDR, phnum, phoff).copy()
        strndx = int(self.header["shstrndx"])
        names = b""
        if 0 < strndx < shnum:
            sh = self.shdrs[strndx]
            self._check_range(name, int(sh["offset"]), int(sh["size"]), "section names")
            names = self._map[int(sh["offset"]):int(sh["offset"]) + int(sh["size"])]
        self.sections: list[Section] = []
        for i, sh in enumerate(self.shdrs):
            section = Section(
                index=i, name=_cstring(names, int(sh["name"])) if names else "",
                type=int(sh["type"]), flags=int(sh["flags"]), addr=int(sh["addr"]),
                offset=int(sh["offset"]), size=int(sh["size"]), link=int(sh["link"]),
                info=int(sh["info"]), addralign=int(sh["addralign"]), entsize=int(sh["entsize"]),
            )
            if section.has_bits and section.type != SHT_NULL:
                self._check_range(name, section.offset, section.size, section.label)
            self.sections.append(section)
        self._by_name = {}
        for section in self.sections:
            self._by_name.setdefault(section.name, section)
        self._check_links(name)
        alloc = [s for s in self.sections if s.is_alloc and s.size]
        alloc.sort(key=lambda s: s.addr)
        self._alloc = alloc
        self._alloc_starts = np.array([s.addr for s in alloc], dtype=np.uint64)

    def _check_range(self, name: str, offset: int, size: int, what: str) -> None:
        if offset + size > self.size:
            raise KbbError(f"{name}: truncated ({what} ends past the end of the file)")

    def _check_links(self, name: str) -> None:
        """Symbol and relocation sections name sections that exist and hold what
        they should; allocated sections do not overlap (lookups by address rely on it)."""
        n = len(self.sections)
        for s in self.sections:
            if s.type == SHT_SYMTAB:
                if not (0 < s.link < n and self.sections[s.link].type == SHT_STRTAB):
                    raise KbbError(f"{name}: {s.label}: link {s.link} is not a string table")
                if s.entsize not in (0, SYM.itemsize) or s.size % SYM.itemsize:
                    raise KbbError(f"{name}: {s.label}: not a whole number of "
                                   f"{SYM.itemsize}-byte symbols")
            elif s.type == SHT_RELA:
                if not 0 < s.info < n:
                    raise KbbError(f"{name}: {s.label}: applies to section {s.info}, which "
                                   "does not exist")
                if s.entsize not in (0, RELA.itemsize) or s.size % RELA.itemsize:
                    raise KbbError(f"{name}: {s.label}: not a whole number of "
                                   f"{RELA.itemsize}-byte relocations")
                if self.sections[s.info].is_alloc and not (
                        0 < s.link < n and self.sections[s.link].type == SHT_SYMTAB):
                    raise KbbError(f"{name}: {s.label}: link {s.link} is not the symbol table")
        if self.is_relocatable:
            return  # (every section of an object file starts at 0)
        alloc = sorted((s for s in self.sections if s.is_alloc and s.size),
                       key=lambda s: s.addr)
        for a, b in zip(alloc, alloc[1:]):
            if b.addr < a.end:
                raise KbbError(f"{name}: sections {a.label} and {b.label} overlap "
                               f"({a.addr:#x}+{a.size:#x}, {b.addr:#x})")

    # -- sections ----------------------------------------------------------

    def section(self, name: str) -> Section | None:
        return self._by_name.get(name)

    def section_at(self, addr: int) -> Section | None:
        """The allocated section holding virtual address ``addr``."""
        i = int(np.searchsorted(self._alloc_starts, np.uint64(addr), side="right")) - 1
        # Allocated sections of a vmlinux do not overlap (per-CPU data sits at 0, far
        # below the kernel's addresses), so the last section starting at or below
        # addr is the only candidate.
        if i >= 0 and self._alloc[i].contains(addr):
            return self._alloc[i]
        return None

    def section_data(self, section: Section) -> memoryview:
        if not section.has_bits:
            return memoryview(bytes(section.size))
        return self.buf[section.offset:section.offset + section.size]

    def read_file_range(self, offset: int, size: int) -> bytearray:
        """A copy of bytes of the file, read (not through the map, whose pages would
        stay resident beside the copy), that the caller may change."""
        self._check_range("read", offset, size, "range")
        data = bytearray(size)
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(data)
        if got != size:
            raise KbbError(f"{self.path}: short read at {offset:#x}")
        return data

    def section_array(self, section: Section, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = section.size // dtype.itemsize
        if not section.has_bits:
            return np.zeros(count, dtype)
        return np.frombuffer(self._map, dtype, count, section.offset)

    def read(self, addr: int, size: int) -> bytes:
        """Bytes at virtual address ``addr`` (zeros for .bss-like sections)."""
        section = self.section_at(addr)
        if section is None or addr + size > section.end:
            raise KbbError(f"{self.path}: address {addr:#x}+{size} is not inside one section")
        if not section.has_bits:
            return bytes(size)
        start = section.offset + (addr - section.addr)
        return bytes(self._map[start:start + size])

    def array_at(self, addr: int, dtype, count: int) -> np.ndarray:
        """``count`` records of ``dtype`` at virtual address ``addr`` (a read-only view)."""
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        section = self.section_at(addr) if size else None
        if size == 0:
            return np.zeros(0, dtype)
        if section is None or addr + size > section.end:
            raise KbbError(f"{self.path}: {size} bytes at {addr:#x} are not inside one section")
        if not section.has_bits:
            return np.zeros(count, dtype)
        return np.frombuffer(self._map, dtype, count, section.offset + (addr - section.addr))

    # -- symbols -----------------------------------------------------------

    @cached_property
    def symtab(self) -> Section | None:
        for section in self.sections:
            if section.type == SHT_SYMTAB:
                return section
        return None

    @property
    def has_symbols(self) -> bool:
        return self.symtab is not None and self.symtab.size > SYM.itemsize

    @cached_property
    def symbols(self):
        from kbuild_bolt.elf.symbols import SymbolTable

        if not self.has_symbols:
            return SymbolTable.empty()
        symtab = self.symtab
        strtab = self.sections[symtab.link]
        raw = self.section_array(symtab, SYM)
        self._check_symbols(raw, strtab)
        return SymbolTable(raw, self.section_data(strtab))

    @property
    def is_relocatable(self) -> bool:
        """An object file (a module): section addresses are all 0, symbol values
        are offsets into their sections."""
        return int(self.header["type"]) == ET_REL

    def _check_symbols(self, raw: np.ndarray, strtab: Section) -> None:
        """Every symbol's name, type, binding and section are valid, and a symbol
        defined in a loaded section lies in it, or between the kernel's sections
        (linker script symbols such as ``__end_rodata`` sit in gaps)."""
        where = f"{self.path}: {self.symtab.name}"
        checks = [
            (raw["name"] >= max(strtab.size, 1), "name offset past the string table"),
            (~isin(raw["info"] & 0xF, _SYMBOL_TYPES), "unknown symbol type"),
            (~isin(raw["info"] >> 4, _SYMBOL_BINDS), "unknown symbol binding"),
            ((raw["shndx"] >= len(self.sections)) & (raw["shndx"] != SHN_ABS)
             & (raw["shndx"] != SHN_COMMON), "no such section"),
        ]
        for bad, what in checks:
            if bad[1:].any():  # (entry 0 is the null symbol)
                i = int(np.flatnonzero(bad[1:])[0]) + 1
                raise KbbError(f"{where}[{i}]: {what} ({_describe_symbol(raw[i])})")
        shndx = raw["shndx"].astype(np.int64)
        value = raw["value"]
        in_alloc = np.zeros(len(raw), bool)
        sec_lo = np.zeros(len(self.sections), np.uint64)
        sec_hi = np.zeros(len(self.sections), np.uint64)
        alloc = np.zeros(len(self.sections) + 1, bool)
        for s in self.sections:
            sec_lo[s.index], sec_hi[s.index] = s.addr, s.addr + s.size
            alloc[s.index] = s.is_alloc
        defined = (shndx > 0) & (shndx < len(self.sections))
        in_alloc[defined] = alloc[shndx[defined]]
        k = np.flatnonzero(in_alloc)
        if self.is_relocatable:
            outside = value[k] > sec_hi[shndx[k]] - sec_lo[shndx[k]]
        else:
            outside = (value[k] < sec_lo[shndx[k]]) | (value[k] > sec_hi[shndx[k]])
            # The span of the image's sections (per-CPU data, linked at 0, aside).
            placed = [s for s in self.sections if s.is_alloc and s.size and s.addr]
            if outside.any() and placed:
                lo = np.uint64(min(s.addr for s in placed))
                hi = np.uint64(max(s.addr + s.size for s in placed))
                outside &= (value[k] < lo) | (value[k] > hi)
        if outside.any():
            i = int(k[outside][0])
            section = self.sections[int(shndx[i])].name
            raise KbbError(f"{where}[{i}]: value {int(value[i]):#x} lies outside its "
                           f"section {section} ({_describe_symbol(raw[i])})")

    # -- relocations -------------------------------------------------------

    @cached_property
    def rela_sections(self) -> list[Section]:
        """The .rela.* sections that apply to allocated sections (--emit-relocs)."""
        return [s for s in self.sections
                if s.type == SHT_RELA and self.sections[s.info].is_alloc]

    @property
    def has_relocations(self) -> bool:
        """True when the code has its relocations (--emit-relocs, not stripped).

        Only code relocations count: 6.12's post-link strip (``.rela.*``) misses
        the ``.relaruntime_*`` sections, so a stripped vmlinux keeps a few.
        """
        return any(s.size and self.sections[s.info].is_exec for s in self.rela_sections)

    def relocations(self, rela: Section) -> np.ndarray:
        """The records of a relocation section, checked once: each names a symbol
        of the symbol table, has a type kbuild-bolt handles, and fills a field
        inside the section it applies to."""
        records = self.section_array(rela, RELA)
        checked = self.__dict__.setdefault("_checked_relocations", set())
        if rela.index not in checked and self.sections[rela.info].is_alloc:
            self._check_relocations(rela, records)
            checked.add(rela.index)
        return records

    def _check_relocations(self, rela: Section, records: np.ndarray) -> None:
        for first in range(0, len(records), RELOCATION_PART):
            self._check_relocation_part(rela, records[first:first + RELOCATION_PART], first)

    def _check_relocation_part(self, rela: Section, r: np.ndarray, first: int) -> None:
        where = f"{self.path}: {rela.name}"
        target = self.sections[rela.info]
        rtype, sym = type_and_symbol(r["info"])
        nsyms = self.sections[rela.link].size // SYM.itemsize
        bad = np.flatnonzero(sym >= nsyms)
        if len(bad):
            i = int(bad[0])
            raise KbbError(f"{where}[{first + i}]: symbol index {int(sym[i])} past the symbol "
                           f"table ({nsyms:,} symbols)")
        known = isin(rtype, (R_X86_64_NONE, *FIELD_SIZE))
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            t = int(rtype[i])
            what = (f"R_X86_64_{_RELOCATION_NAMES[t]} is not supported in a kernel image"
                    if t in _RELOCATION_NAMES else f"unknown relocation type {t}")
            raise KbbError(f"{where}[{first + i}]: {what}")
        size = np.zeros(len(r), np.uint64)
        for t, n in FIELD_SIZE.items():
            size[rtype == t] = n
        fields = rtype != R_X86_64_NONE     # (sorttable zeroes records it made stale)
        # (a relocatable object's offsets count from its section's start)
        base = 0 if self.is_relocatable else target.addr
        lo, hi = np.uint64(base), np.uint64(base + target.size)
        outside = fields & ((r["offset"] < lo) | (r["offset"] > hi - size))
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise KbbError(f"{where}[{first + i}]: offset {int(r['offset'][i]):#x} is outside "
                           f"{target.name} ({base:#x}..{base + target.size:#x})")

    def relocations_for(self, target: str) -> np.ndarray:
        """All relocations that apply to section ``target`` (empty when none)."""
        parts = [self.relocations(r) for r in self.rela_sections
                 if self.sections[r.info].name == target]
        if not parts:
            return np.zeros(0, RELA)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- segments and notes ------------------------------------------------

    def notes(self):
        """(owner, type, desc) of every note in PT_NOTE segments."""
        for ph in self.phdrs:
            if int(ph["type"]) != PT_NOTE:
                continue
            pos, end = int(ph["offset"]), int(ph["offset"]) + int(ph["filesz"])
            while pos + 12 <= end:
                namesz, descsz, ntype = np.frombuffer(self._map, "<u4", 3, pos)
                name_start = pos + 12
                desc_start = name_start + ((int(namesz) + 3) & ~3)
                owner = bytes(self._map[name_start:name_start + int(namesz)]).rstrip(b"\0")
                yield owner.decode(errors="replace"), int(ntype), bytes(
                    self._map[desc_start:desc_start + int(descsz)])
                pos = desc_start + ((int(descsz) + 3) & ~3)

    @property
    def file_backed(self) -> bool:
        """Whether the bytes are the file's pages (mapped), not a copy held in memory."""
        return isinstance(self._map, mmap.mmap)

    def release_pages(self, offset: int = 0, size: int | None = None) -> None:
        """Let go of the file's pages this process has read (they stay in the page
        cache: the next read maps them again at the cost of a minor fault). A
        rewrite reads most of a vmlinux once in one phase or another; without
        this every page read stays in the process's resident memory until the
        end, 34 MB of a lab kernel's file at each later phase's peak.
        ``offset``, ``size``: only those of that part of the file."""
        release_mapping(self._map, offset, size)

    def close(self) -> None:
        self.bytes = None
        self.buf.release()
        try:
            self._map.close()
        except BufferError:
            pass  # numpy views still alive; the map goes with them
        except AttributeError:
            pass  # (bytes in memory: nothing to unmap)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
