"""``kbuild-bolt repack-initramfs``: put the modules of the optimized kernel into an
existing initramfs, and change nothing else.

An initramfs is a concatenation the kernel unpacks in order: uncompressed cpio
archives first (early microcode, as distros ship it), then a compressed one
(gzip, xz, zstd, lz4, bzip2, lzma). The uncompressed part is kept byte for
byte; in the compressed one every module under ``lib/modules/<release>``
(or ``usr/lib/modules``) is replaced by the file at the same path in the new
modules directory, depmod's files are regenerated for the modules the
initramfs holds (as initramfs-tools and dracut do), every other entry keeps
its header and data, and the result is compressed with the same method.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from kbuild_bolt.atomic import atomic_write
from kbuild_bolt.errors import KbbError
from kbuild_bolt.initramfs import cpio

CPIO_MAGIC = (cpio.MAGIC_NEWC, cpio.MAGIC_CRC)
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
# depmod output (regenerated) and files that describe the kernel (copied).
DEPMOD_FILES = ("modules.dep", "modules.dep.bin", "modules.alias", "modules.alias.bin",
                "modules.symbols", "modules.symbols.bin", "modules.devname", "modules.softdep",
                "modules.builtin.bin", "modules.builtin.alias.bin", "modules.weakdep")
KERNEL_FILES = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


@dataclass
class Compression:
    name: str
    xz_check: int = lzma.CHECK_CRC32


def detect(data: bytes) -> Compression | None:
    if data[:2] == b"\x1f\x8b":
        return Compression("gzip")
    if data[:6] == b"\xfd7zXZ\x00":
        flags = data[7] & 0x0F
        return Compression("xz", {0: lzma.CHECK_NONE, 1: lzma.CHECK_CRC32,
                                  4: lzma.CHECK_CRC64, 10: lzma.CHECK_SHA256}.get(flags,
                                                                                  lzma.CHECK_CRC32))
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return Compression("zstd")
    if data[:4] == b"\x02\x21\x4c\x18":
        return Compression("lz4")
    if data[:3] == b"BZh":
        return Compression("bzip2")
    if data[:3] == b"\x5d\x00\x00":
        return Compression("lzma")
    if data[:4] == b"\x89LZO":
        raise KbbError("lzo-compressed initramfs is not supported (gzip, xz, zstd, lz4, bzip2, "
                       "lzma are)")
    return None


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KbbError(f"{name} not found (apt-get install {name})")
    return path


def decompress(data: bytes, comp: Compression) -> bytes:
    if comp.name == "gzip":
        out = []
        while data:
            d = zlib.decompressobj(wbits=31)
            out.append(d.decompress(data))
            data = d.unused_data.lstrip(b"\0")
            if data and data[:2] != b"\x1f\x8b":
                break
        return b"".join(out)
    if comp.name == "xz":
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    if comp.name == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_ALONE)
    if comp.name == "bzip2":
        return bz2.decompress(data)
    tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}[comp.name]
    proc = subprocess.run([_tool(tool[0]), *tool[1:]], input=data, capture_output=True)
    if proc.returncode != 0:
        raise KbbError(f"{comp.name}: cannot decompress the initramfs: "
                       f"{proc.stderr.decode(errors='replace').strip()[:120]}")
    return proc.stdout


def compress(data: bytes, comp: Compression) -> bytes:
    if comp.name == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if comp.name == "xz":
        # The kernel's xz decoder wants CRC32 (or none) and no filters but LZMA2.
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=comp.xz_check)
    if comp.name == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    if comp.name == "bzip2":
        return bz2.compress(data, 9)
    tool = {"zstd": ["zstd", "-q", "-T0", "-12", "-c"], "lz4": ["lz4", "-l", "-9", "-c", "-q"]}[comp.name]
    proc = subprocess.run([_tool(tool[0]), *tool[1:]], input=data, capture_output=True)
    if proc.returncode != 0:
        raise KbbError(f"{comp.name} failed: {proc.stderr.decode(errors='replace').strip()[:120]}")
    return proc.stdout


@dataclass
class Layout:
    early: bytes                 # uncompressed archives, kept byte for byte
    compression: Compression | None
    archives: list               # (entries, trailer+padding bytes) of the main part


def split(data: bytes) -> Layout:
    pos = 0
    while data[pos:pos + 6] in CPIO_MAGIC:
        _entries, end = cpio.read_archive(data, pos)
        pos = end
        while pos < len(data) and data[pos] == 0:
            pos += 1
    early, rest = data[:pos], data[pos:]
    if not rest:
        raise KbbError("the initramfs has no compressed part to hold modules")
    comp = detect(rest)
    if comp is None:
        raise KbbError("unknown initramfs compression (not gzip, xz, zstd, lz4, bzip2, lzma)")
    return Layout(early, comp, _archives(decompress(rest, comp)))


def _archives(blob: bytes) -> list:
    out = []
    pos = 0
    while pos < len(blob) and blob[pos:pos + 6] in CPIO_MAGIC:
        entries, end = cpio.read_archive(blob, pos)
        start_pad = end
        while end < len(blob) and blob[end] == 0:
            end += 1
        # Keep the trailer record exactly, with the padding after it.
        trailer_len = len(cpio.CpioEntry(cpio.TRAILER, 0, magic=blob[pos:pos + 6]).encode())
        out.append((entries, blob[start_pad - trailer_len:end]))
        pos = end
    if pos != len(blob):
        raise KbbError(f"unexpected data at offset {pos} of the decompressed initramfs")
    return out


_MODULES_DIR = re.compile(r"^(?:\./)?((?:usr/)?lib/modules/([^/]+))/(.+)$")


def repack(source, output, modules_dir) -> dict:
    """Write ``source`` with its modules taken from ``modules_dir`` to ``output``."""
    from kbuild_bolt.kbuild.modules import find_modules

    release_dir, _ = find_modules(Path(modules_dir))
    release = release_dir.name
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        raise KbbError(f"{source}: no such file") from None
    if not data:
        raise KbbError(f"{source}: empty file")
    try:
        layout = split(data)
    except KbbError as err:
        raise KbbError(f"{source}: {err}") from None
    stats = {"modules": 0, "depmod_files": 0, "entries": 0, "compression": layout.compression.name}
    found_release = set()
    module_entries = []
    for entries, _tail in layout.archives:
        for e in entries:
            stats["entries"] += 1
            m = _MODULES_DIR.match(e.name)
            if m and e.is_file:
                found_release.add(m.group(2))
                module_entries.append((e, m.group(1), m.group(2), m.group(3)))
    if not module_entries:
        raise KbbError(f"{source}: holds no kernel modules (lib/modules/<release>)")
    if release not in found_release:
        raise KbbError(f"{source} holds modules for {', '.join(sorted(found_release))}, "
                       f"{modules_dir} for {release}: modules built against another kernel")
    # Replace the modules, then regenerate depmod's files for exactly that set.
    with tempfile.TemporaryDirectory(prefix="kbuild-bolt-initramfs-") as tmp:
        tree = Path(tmp) / "lib/modules" / release
        for e, _prefix, rel_release, rel in module_entries:
            if rel_release != release:
                continue
            if rel.endswith(MODULE_SUFFIXES):
                new = release_dir / rel
                if not new.exists():
                    raise KbbError(f"{modules_dir} has no {rel} (the initramfs needs it)")
                e.data = new.read_bytes()
                stats["modules"] += 1
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                (tree / rel).write_bytes(e.data)
        for name in KERNEL_FILES:
            if (release_dir / name).exists():
                tree.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(release_dir / name, tree / name)
        depmod = shutil.which("depmod") or "/sbin/depmod"
        proc = subprocess.run([depmod, "-b", tmp, release], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KbbError(f"depmod failed: {proc.stderr.strip()[:160]}")
        for e, _prefix, rel_release, rel in module_entries:
            if rel_release != release or "/" in rel:
                continue
            if rel in DEPMOD_FILES and (tree / rel).exists():
                e.data = (tree / rel).read_bytes()
                stats["depmod_files"] += 1
            elif rel in KERNEL_FILES and (release_dir / rel).exists():
                e.data = (release_dir / rel).read_bytes()
                stats["depmod_files"] += 1
    main = b"".join(b"".join(e.encode() for e in entries) + tail
                    for entries, tail in layout.archives)
    atomic_write(output, layout.early + compress(main, layout.compression),
                 mode=os.stat(source).st_mode & 0o777)
    stats["early_bytes"] = len(layout.early)
    return stats


def list_entries(path) -> list[cpio.CpioEntry]:
    """Every entry of every archive in an initramfs (for tests and inspection)."""
    data = Path(path).read_bytes()
    layout = split(data)
    out = []
    pos = 0
    while data[pos:pos + 6] in CPIO_MAGIC:
        entries, pos = cpio.read_archive(data, pos)
        out += entries
        while pos < len(data) and data[pos] == 0:
            pos += 1
    for entries, _ in layout.archives:
        out += entries
    return out
