"""ELF notes: the GNU build-id.

A rewritten kernel is a new binary, so it gets a new build-id: perf, debuginfod
and the distros' ``/usr/lib/debug/.build-id/`` paths match a running kernel
(``/sys/kernel/notes``, the loaded copy of ``.notes``) to its debug vmlinux by
it. The kernel's note lives in an allocated SHT_NOTE section, so the ELF note
and the loaded copy are the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, replace

from kbuild_bolt.errors import KbbError
from kbuild_bolt.processes import OnThread

SHT_NOTE = 7
NT_GNU_BUILD_ID = 3


@dataclass(frozen=True)
class BuildId:
    section: str
    offset: int          # file offset of the descriptor
    addr: int            # its address (0: the section is not loaded)
    size: int            # descriptor bytes (20 for ld's sha1)
    value: bytes

    def hex(self) -> str:
        return self.value.hex()


def build_id(image) -> BuildId | None:
    """The NT_GNU_BUILD_ID note of ``image`` (an ElfImage), or None."""
    for s in image.sections:
        if s.type != SHT_NOTE or not s.size:
            continue
        data = image.section_data(s)
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, kind = struct.unpack_from("<III", data, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            end = desc_at + ((descsz + 3) & ~3)
            if end > len(data) or desc_at + descsz > len(data):
                raise KbbError(f"{s.name}: note at +{pos:#x} runs past the section")
            name = bytes(data[name_at:name_at + namesz]).rstrip(b"\0")
            if kind == NT_GNU_BUILD_ID and name == b"GNU":
                return BuildId(s.name, s.offset + desc_at, s.addr + desc_at if s.is_alloc else 0,
                               descsz, bytes(data[desc_at:desc_at + descsz]))
            pos = end
    return None


def read_build_id(path, note: BuildId) -> BuildId:
    """``note`` with the value the file at ``path`` holds now (read from the
    file, not from a map or copy made before it was stamped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        value = os.pread(fd, note.size, note.offset)
    finally:
        os.close(fd)
    return replace(note, value=value)


def compute(path, note: BuildId, chunk: int = 1 << 22) -> bytes:
    """SHA-1 over the whole file with the build-id descriptor read as zeros, cut
    or zero-padded to the descriptor's size: like ld's ``--build-id=sha1`` (which
    hashes the headers and section contents of its output, the id zeroed), an id
    that changes with every byte of the result and is the same for the same
    result."""
    digest = hashlib.sha1()
    hole = range(note.offset, note.offset + note.size)
    with open(path, "rb") as f:
        at = 0
        while True:
            data = f.read(chunk)
            if not data:
                break
            lo, hi = max(hole.start, at), min(hole.stop, at + len(data))
            if lo < hi:
                data = data[:lo - at] + bytes(hi - lo) + data[hi - at:]
            digest.update(data)
            at += len(data)
    value = digest.digest()[:note.size]
    return value + bytes(note.size - len(value))


def stamp(path, note: BuildId) -> bytes:
    """Write the build-id of the file at ``path`` (see :func:`compute`) into its
    note; returns it."""
    value = compute(path, note)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, value, note.offset)
    finally:
        os.close(fd)
    return value


class PendingStamp:
    """:func:`stamp`, with the file hashed on a thread from now on and the id
    written by :meth:`write`. Until then nothing may change the file, and what
    reads it must not read the note: a rewrite's verification starts decoding
    the output meanwhile."""

    def __init__(self, path, note: BuildId):
        self.path, self.note = path, note
        self._hashing = OnThread(compute, path, note)

    def write(self) -> bytes:
        value = self._hashing.result()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, value, self.note.offset)
        finally:
            os.close(fd)
        return value
