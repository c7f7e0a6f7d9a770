"""Write a changed vmlinux without disturbing its ELF structure.

The output starts as a byte copy of the input and is patched in place through
a writable mmap: every section keeps its header, offset, address and size, so
the loadable bytes that did not change are byte-identical and program headers
stay exact (the seed's "stuck kernel" came from a writer that did not). Debug
sections that would be stale are emptied (headers kept, bytes dropped). The file appears under its final
name only after verification, by rename.
"""

from __future__ import annotations

import bisect
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import unique
from kbuild_bolt.elf.image import release_mapping
from kbuild_bolt.errors import KbbError


def _copy_range(src, dst, offset: int, size: int, chunk: int = 1 << 22) -> None:
    """``size`` bytes of file ``src`` from ``offset`` on to the same offset of file
    ``dst``: by the kernel (copy_file_range: no pass through this process), or
    read and written where it cannot (another file system, an old kernel)."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - done, offset + done,
                                   offset + done)
            if n == 0:
                raise KbbError("input file ended early while copying it")
            done += n
        return
    except (AttributeError, OSError):
        pass                    # (the rest read and written)
    src.seek(offset + done)
    dst.seek(offset + done)
    size -= done
    while size > 0:
        block = src.read(min(chunk, size))
        if not block:
            raise KbbError("input file ended early while copying it")
        dst.write(block)
        size -= len(block)


def _move_in_file(fd: int, old: int, new: int, size: int, chunk: int = 1 << 22) -> None:
    """Move ``size`` bytes of the file from offset ``old`` to ``new`` (the two
    ranges may overlap), ``chunk`` bytes at a time."""
    starts = range(0, size, chunk)
    for at in (starts if new < old else reversed(starts)):
        n = min(chunk, size - at)
        data = os.pread(fd, n, old + at)
        if len(data) != n:
            raise KbbError("output file ended early while packing sections")
        _write_in_file(fd, new + at, data)


def _write_in_file(fd: int, at: int, data) -> None:
    view = memoryview(data).cast("B")       # (bytes, whatever the records are)
    while len(view):
        done = os.pwrite(fd, view, at)
        at += done
        view = view[done:]


def put_fields(raw: np.ndarray, offsets: np.ndarray, size: int, values: np.ndarray) -> None:
    """Store the low ``size`` bytes of each 64-bit value (little-endian: two's complement
    for negative ones) at each offset of the byte array ``raw``."""
    low = np.asarray(values).astype("<u8").view(np.uint8).reshape(-1, 8)[:, :size]
    raw[np.asarray(offsets, np.int64)[:, None] + np.arange(size)[None, :]] = low


def debug_sections(sections) -> list:
    """Non-allocated debug sections (and their relocations): they describe the old layout."""
    return [s for s in sections if s.name.startswith((".debug", ".rela.debug"))
            and s.size and not s.is_alloc]


def _copy_without(source_path, dest_path, size: int, holes: list[tuple[int, int]]) -> None:
    """Copy a file except the byte ranges in ``holes``, which stay sparse zeros
    (the debug sections of a distro vmlinux are most of its 600 MB)."""
    keep, pos = [], 0
    for lo, hi in sorted(holes):
        if lo > pos:
            keep.append((pos, lo))
        pos = max(pos, hi)
    if size > pos:
        keep.append((pos, size))
    with open(source_path, "rb") as src, open(dest_path, "r+b") as dst:
        dst.truncate(size)
        for lo, hi in keep:
            _copy_range(src, dst, lo, hi - lo)


class OutputImage:
    def __init__(self, source, dest, drop_debug=False):
        """A copy of ``source`` to patch, renamed to ``dest`` by :meth:`commit`.
        ``drop_debug``: the debug sections will be emptied or replaced, so their
        bytes are not copied: True for all of them, or a set of names (the
        relocations of debug sections are always among them)."""
        self.source = source  # ElfImage of the input
        self.dest = Path(dest)
        directory = self.dest.parent if str(self.dest.parent) else Path(".")
        if not directory.is_dir():
            raise KbbError(f"{directory}: no such directory")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            if drop_debug:
                _copy_without(source.path, self.tmp, os.path.getsize(source.path),
                              [(d.offset, d.offset + d.size)
                               for d in debug_sections(source.sections)
                               if drop_debug is True or d.name in drop_debug
                               or d.name.startswith(".rela.debug")])
            else:
                shutil.copyfile(source.path, self.tmp)
            self._file = open(self.tmp, "r+b")
            self.mem = mmap.mmap(self._file.fileno(), 0)
        except BaseException:
            self.discard()
            raise
        alloc = sorted((s for s in source.sections if s.is_alloc and s.has_bits and s.size),
                       key=lambda s: s.addr)
        self._starts = np.array([s.addr for s in alloc], dtype=np.uint64)
        self._start_list = [s.addr for s in alloc]  # (for one address at a time)
        self._alloc = alloc

    def _offset(self, addr: int, size: int) -> int:
        i = bisect.bisect_right(self._start_list, addr) - 1
        if i < 0:
            raise KbbError(f"write outside every section at {addr:#x}")
        s = self._alloc[i]
        if not (s.addr <= addr and addr + size <= s.end):
            raise KbbError(f"write of {size} bytes at {addr:#x} crosses a section boundary")
        return s.offset + (addr - s.addr)

    def fill(self, addr: int, size: int, byte: int) -> None:
        """``size`` copies of ``byte`` from ``addr`` on."""
        off = self._offset(addr, size)
        np.frombuffer(self.mem, np.uint8, size, off)[:] = byte

    def write_at(self, addr: int, data: bytes) -> None:
        off = self._offset(addr, len(data))
        self.mem[off:off + len(data)] = data

    def read_at(self, addr: int, size: int) -> bytes:
        off = self._offset(addr, size)
        return bytes(self.mem[off:off + size])

    def array(self, addr: int, dtype, count: int) -> np.ndarray:
        """A writable numpy view of ``count`` records at ``addr``."""
        dtype = np.dtype(dtype)
        off = self._offset(addr, dtype.itemsize * count)
        return np.frombuffer(self.mem, dtype, count, off)

    def _offsets(self, addrs: np.ndarray, size: int) -> np.ndarray:
        """File offsets of ``size``-byte fields at ``addrs`` (each inside one section)."""
        i = np.searchsorted(self._starts, addrs, side="right").astype(np.int64) - 1
        if len(i) and i.min() < 0:
            raise KbbError(f"field outside every section at {int(addrs[i < 0][0]):#x}")
        offsets = np.empty(len(addrs), np.int64)
        for k in unique(i).tolist():
            s = self._alloc[k]
            sel = i == k
            inside = addrs[sel] - np.uint64(s.addr)
            if len(inside) and int(inside.max()) + size > s.size:
                raise KbbError(f"field of {size} bytes crosses the end of {s.name}")
            offsets[sel] = s.offset + inside.astype(np.int64)
        return offsets

    def write_fields(self, addrs: np.ndarray, size: int, values: np.ndarray) -> None:
        """Write the low ``size`` bytes of each value (little-endian) at each address."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        put_fields(np.frombuffer(self.mem, np.uint8), self._offsets(addrs, size), size, values)

    def read_fields(self, addrs: np.ndarray, size: int, signed: bool = True) -> np.ndarray:
        """Little-endian ``size``-byte fields at each address, as uint64 (sign-extended
        when ``signed``)."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        offsets = self._offsets(addrs, size)
        raw = np.frombuffer(self.mem, np.uint8)
        cols = raw[offsets[:, None] + np.arange(size)[None, :]].astype(np.uint64)
        value = np.zeros(len(addrs), np.uint64)
        for k in range(size):
            value |= cols[:, k] << np.uint64(8 * k)
        if signed and size < 8:
            top = np.uint64(1) << np.uint64(8 * size - 1)
            value = np.where(value & top, value | ~((top << np.uint64(1)) - np.uint64(1)), value)
        return value

    def finish(self) -> Path:
        """Close the temporary file; returns its path. (No msync: what was written
        through the shared mapping is in the page cache, which every later read
        of the file sees; forcing it to disk would only wait for the device, as
        the linker does not.)"""
        self._close_map()
        self._file.close()
        return self.tmp

    def _close_map(self) -> None:
        import gc

        gc.collect()
        try:
            self.mem.close()
        except BufferError:
            pass  # numpy views still point into it; its pages are the file's all the same

    def strip_debug(self) -> list[str]:
        """Empty the .debug_* sections (stale once code moved) and drop their bytes.

        Section headers, indices and the symbol table stay exactly as they are
        (objcopy --strip-debug would renumber symbols): the debug sections keep
        their headers with size 0. Returns the names of the emptied sections."""
        debug = debug_sections(self.source.sections)
        if debug:
            self.repack(empty={s.index for s in debug})
        return [s.name for s in debug]

    def repack(self, empty=(), replace: dict | None = None, info: dict | None = None) -> None:
        """Lay the non-allocated sections after the loadable part out again: the
        sections in ``empty`` lose their bytes (header kept, size 0), those in
        ``replace`` (index -> bytes) get new contents of any size, ``info``
        (index -> value) sets sh_info. The loadable part, every section index and
        every other section's bytes stay as they are; the section header table
        goes last. (Done in the finished file itself: only what lies after the
        loadable part moves, not the tens of MB before it.)"""
        from kbuild_bolt.elf.image import SHT_NOBITS

        sections = self.source.sections
        replace = replace or {}
        empty = set(empty)
        shdrs = self.source.shdrs.copy()
        for index, value in (info or {}).items():
            shdrs["info"][index] = value
        # Everything up to the end of the last allocated section/segment stays put.
        keep_end = max([s.offset + s.size for s in sections if s.is_alloc and s.type != SHT_NOBITS]
                       + [int(p["offset"] + p["filesz"]) for p in self.source.phdrs] + [64])
        movable = sorted((s for s in sections[1:] if not s.is_alloc and s.offset >= keep_end),
                         key=lambda s: s.offset)
        moving = {s.index for s in movable}
        if not set(replace) <= moving:
            raise KbbError("only sections after the loadable part can change size")
        # Where each section goes: (old offset, new offset, size) of the bytes that
        # move, (new offset, bytes) of what is written, and the zeros between.
        moves, writes, zeros = [], [], []
        pos = keep_end
        for s in movable:
            if s.index in empty:
                shdrs["offset"][s.index] = pos
                shdrs["size"][s.index] = 0
                continue
            pad = (-pos) % max(1, s.addralign)
            zeros.append((pos, pad))
            pos += pad
            shdrs["offset"][s.index] = pos
            if s.index in replace:
                data = replace[s.index]
                writes.append((pos, data))
                shdrs["size"][s.index] = len(data)
                pos += len(data)
            elif s.type != SHT_NOBITS:
                moves.append((s.offset, pos, s.size))
                pos += s.size
        pad = (-pos) % 8
        zeros.append((pos, pad))
        pos += pad
        writes.append((pos, shdrs.tobytes()))
        writes.append((0x28, pos.to_bytes(8, "little")))      # e_shoff
        fd = os.open(self.tmp, os.O_RDWR)
        try:
            # Bytes that move to lower offsets go first, front to back; those that
            # move to higher ones then, back to front: no section's bytes are
            # overwritten before they have moved (the order in the file is kept).
            for old, new, size in moves:
                if new < old:
                    _move_in_file(fd, old, new, size)
            for old, new, size in reversed(moves):
                if new > old:
                    _move_in_file(fd, old, new, size)
            for at, size in zeros:
                if size:
                    os.pwrite(fd, b"\0" * size, at)
            for at, data in writes:
                _write_in_file(fd, at, data)
            os.ftruncate(fd, pos + shdrs.nbytes)
        finally:
            os.close(fd)

    def release_pages(self) -> None:
        """Let go of the pages written so far (they stay in the page cache, dirty
        until written back, and are mapped again when touched)."""
        if hasattr(self, "mem") and not self.mem.closed:
            release_mapping(self.mem)

    def commit(self) -> None:
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        try:
            if hasattr(self, "mem") and not self.mem.closed:
                self._close_map()
            if hasattr(self, "_file"):
                self._file.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
