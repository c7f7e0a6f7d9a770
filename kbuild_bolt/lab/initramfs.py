"""The lab initramfs: busybox-static, a generated /init, and the kernel's modules."""

from __future__ import annotations

import gzip
import os
import stat
import struct
from pathlib import Path

import jinja2

from kbuild_bolt.atomic import atomic_write
from kbuild_bolt.errors import KbbError
from kbuild_bolt.initramfs import cpio

BUSYBOX = Path("/bin/busybox")
DEFAULT_ITERATIONS = 20
_TEMPLATE = Path(__file__).resolve().parent / "init.sh.j2"


def render_init(modules: tuple[str, ...] | list[str] = (),
                default_iterations: int = DEFAULT_ITERATIONS) -> str:
    template = jinja2.Template(_TEMPLATE.read_text(), keep_trailing_newline=True,
                               undefined=jinja2.StrictUndefined)
    return template.render(modules=list(modules), default_iterations=default_iterations)


def recipe_hash(modules=(), default_iterations: int = DEFAULT_ITERATIONS) -> str:
    """A short hash of what a lab initramfs holds besides the modules' files: the
    rendered /init and the busybox binary."""
    import hashlib

    digest = hashlib.sha256(render_init(modules, default_iterations).encode())
    digest.update(BUSYBOX.read_bytes() if BUSYBOX.exists() else b"")
    return digest.hexdigest()[:12]


def _static_busybox(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KbbError(f"{path} not found (apt-get install busybox-static)") from None
    if data[:4] != b"\x7fELF":
        raise KbbError(f"{path} is not an ELF executable")
    # A dynamically linked busybox has a PT_INTERP program header (type 3).
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3:
            raise KbbError(f"{path} is dynamically linked (install busybox-static)")
    return data


def _tree_entries(root: Path, prefix: str) -> list[cpio.CpioEntry]:
    """Entries for everything below ``root``, archived under ``prefix``."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = prefix if rel == "." else f"{prefix}/{rel}"
        entries.append(cpio.directory(base))
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                continue  # build/ and source/ point into the build tree
            entries.append(cpio.regular(f"{base}/{name}", Path(full).read_bytes(),
                                        mode=stat.S_IMODE(st.st_mode)))
    return entries


def lab_initramfs_entries(modules_root: Path | None = None, release: str | None = None,
                          modules: tuple[str, ...] | list[str] = (),
                          default_iterations: int = DEFAULT_ITERATIONS) -> list[cpio.CpioEntry]:
    entries = [cpio.directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc",
                                           "usr", "usr/bin", "usr/sbin", "root", "lib")]
    entries.append(cpio.char_device("dev/console", 5, 1))
    entries.append(cpio.char_device("dev/null", 1, 3, mode=0o666))
    entries.append(cpio.regular("bin/busybox", _static_busybox(BUSYBOX), mode=0o755))
    entries.append(cpio.regular("init", render_init(modules, default_iterations).encode(),
                                mode=0o755))
    if modules:
        if modules_root is None or release is None:
            raise KbbError("modules requested without a modules directory")
        tree = Path(modules_root) / "lib/modules" / release
        if not (tree / "modules.dep").exists():
            raise KbbError(f"{tree} has no modules.dep (run depmod)")
        entries.append(cpio.directory("lib/modules"))
        entries.extend(_tree_entries(tree, f"lib/modules/{release}"))
    return entries


def build_lab_initramfs(out: Path, modules_root: Path | None = None, release: str | None = None,
                        modules: tuple[str, ...] | list[str] = (),
                        default_iterations: int = DEFAULT_ITERATIONS) -> Path:
    """Write a gzip-compressed lab initramfs to ``out`` (atomically)."""
    archive = cpio.write_archive(lab_initramfs_entries(modules_root, release, modules,
                                                       default_iterations))
    atomic_write(out, gzip.compress(archive, compresslevel=6, mtime=0))
    return Path(out)
