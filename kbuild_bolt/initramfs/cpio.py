"""The cpio "newc" format the kernel unpacks into its initramfs.

Entries keep every header field, so an archive read and written again is byte
for byte the same (what repacking a distro initramfs needs), and new archives
are built from the same :class:`CpioEntry`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from kbuild_bolt.errors import KbbError

MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
           "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    ino: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    devmajor: int = 0
    devminor: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    check: int = 0
    magic: bytes = field(default=MAGIC_NEWC)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def encode(self) -> bytes:
        name = self.name.encode() + b"\0"
        values = dict(
            ino=self.ino, mode=self.mode, uid=self.uid, gid=self.gid, nlink=self.nlink,
            mtime=self.mtime, filesize=len(self.data), devmajor=self.devmajor,
            devminor=self.devminor, rdevmajor=self.rdevmajor, rdevminor=self.rdevminor,
            namesize=len(name), check=self.check,
        )
        header = self.magic + b"".join(b"%08X" % values[f] for f in _FIELDS)
        out = header + name + b"\0" * _pad4(HEADER_SIZE + len(name))
        return out + self.data + b"\0" * _pad4(len(self.data))


def directory(name: str, mode: int = 0o755, **kw) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | mode, nlink=2, **kw)


def regular(name: str, data: bytes, mode: int = 0o644, **kw) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | mode, data=data, **kw)


def symlink(name: str, target: str, **kw) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, data=target.encode(), **kw)


def char_device(name: str, major: int, minor: int, mode: int = 0o600, **kw) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | mode, rdevmajor=major, rdevminor=minor, **kw)


def write_archive(entries: list[CpioEntry], *, number_inodes: bool = True) -> bytes:
    """One cpio archive, trailer included; inode numbers assigned when asked."""
    parts = []
    for index, entry in enumerate(entries):
        if number_inodes:
            entry.ino = 721 + index
        parts.append(entry.encode())
    trailer = CpioEntry(TRAILER, 0, nlink=1)
    parts.append(trailer.encode())
    return b"".join(parts)


def read_archive(blob: bytes, offset: int = 0) -> tuple[list[CpioEntry], int]:
    """Entries of the archive starting at ``offset`` (without the trailer) and
    the offset just past its trailer."""
    entries = []
    pos = offset
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise KbbError(f"cpio archive truncated at offset {pos}")
        magic = blob[pos:pos + 6]
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            raise KbbError(f"not a newc cpio header at offset {pos}")
        try:
            values = {
                name: int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16)
                for i, name in enumerate(_FIELDS)
            }
        except ValueError:
            raise KbbError(f"corrupt cpio header at offset {pos}") from None
        name_start = pos + HEADER_SIZE
        name_end = name_start + values["namesize"]
        data_start = name_end + _pad4(HEADER_SIZE + values["namesize"])
        data_end = data_start + values["filesize"]
        if data_end > len(blob):
            raise KbbError(f"cpio archive truncated in entry at offset {pos}")
        name = blob[name_start:name_end].rstrip(b"\0").decode("utf-8", "surrogateescape")
        pos = data_end + _pad4(values["filesize"])
        if name == TRAILER:
            return entries, pos
        entries.append(CpioEntry(
            name=name, mode=values["mode"], data=bytes(blob[data_start:data_end]),
            ino=values["ino"], uid=values["uid"], gid=values["gid"], nlink=values["nlink"],
            mtime=values["mtime"], devmajor=values["devmajor"], devminor=values["devminor"],
            rdevmajor=values["rdevmajor"], rdevminor=values["rdevminor"],
            check=values["check"], magic=magic,
        ))
