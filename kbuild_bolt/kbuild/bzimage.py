"""Rebuild bzImage (and vmlinux.relocs) for a changed vmlinux from a kernel build tree.

Kbuild records the exact command behind every target in ``.<target>.cmd``.
The boot image is a short chain of them: strip vmlinux, derive the KASLR
relocations with x86's ``relocs`` tool, compress, wrap in the decompressor,
add the setup code. Replaying that chain in a scratch copy of
``arch/x86/boot`` gives the bzImage the kernel's own build would make from
the new vmlinux, without touching the build tree (and in seconds, where a
``make`` walks the whole tree). The decompressor's own objects are reused;
``voffset.h`` (what the decompressor knows of vmlinux) must not change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.errors import KbbError

_SAVED = re.compile(r"^(?:saved)?cmd_(\S+) := (.*)$")
BOOT = "arch/x86/boot"
# The chain, in order; the compressed payload's name depends on the config.
CHAIN = [
    f"{BOOT}/compressed/vmlinux.bin",
    "RELOCS",
    "PAYLOAD",
    f"{BOOT}/compressed/piggy.S",
    f"{BOOT}/compressed/piggy.o",
    f"{BOOT}/compressed/vmlinux",
    f"{BOOT}/vmlinux.bin",
    f"{BOOT}/zoffset.h",
    f"{BOOT}/header.o",
    f"{BOOT}/setup.elf",
    f"{BOOT}/setup.bin",
    f"{BOOT}/bzImage",
]


def saved_command(build_dir: Path, target: str) -> str | None:
    cmd_file = build_dir / Path(target).parent / f".{Path(target).name}.cmd"
    if not cmd_file.exists():
        return None
    for line in cmd_file.read_text(errors="replace").splitlines():
        m = _SAVED.match(line)
        if m and m.group(1) == target:
            return _unescape(m.group(2))
    return None


def _unescape(command: str) -> str:
    """Undo make's quoting in a saved command line."""
    return (command.replace("$(pound)", "#").replace("$(comma)", ",").replace("$(space)", " ")
            .replace("$$", "$"))


def _payload_target(build_dir: Path) -> str:
    for suffix in ("gz", "bz2", "lzma", "xz", "lzo", "lz4", "zst"):
        target = f"{BOOT}/compressed/vmlinux.bin.{suffix}"
        if (build_dir / target).exists():
            return target
    raise KbbError(f"{build_dir}: no compressed kernel payload in {BOOT}/compressed")


def _relocs_command(build_dir: Path) -> str:
    command = saved_command(build_dir, f"{BOOT}/compressed/vmlinux.relocs")
    if command:
        return command  # 6.1: a Kbuild target of its own
    # 6.12: the x86 post-link pass (arch/x86/Makefile.postlink) runs it.
    return ("arch/x86/tools/relocs vmlinux > arch/x86/boot/compressed/vmlinux.relocs;"
            "arch/x86/tools/relocs --abs-relocs vmlinux")


def rebuild_bzimage(build_dir, vmlinux, output, keep_dir: bool = False) -> Path:
    """Write the bzImage for ``vmlinux`` (with relocations) to ``output``."""
    build_dir = Path(build_dir).resolve()
    vmlinux = Path(vmlinux).resolve()
    if not (build_dir / BOOT / "bzImage").exists():
        raise KbbError(f"{build_dir}: not an x86 kernel build tree with a bzImage")
    if not (build_dir / "arch/x86/tools/relocs").exists():
        raise KbbError(f"{build_dir}: arch/x86/tools/relocs missing (CONFIG_RELOCATABLE build?)")
    scratch = Path(tempfile.mkdtemp(prefix="kbuild-bolt-bzimage-"))
    try:
        shutil.copytree(build_dir / BOOT, scratch / BOOT, symlinks=True)
        for shared in ("include", "arch/x86/include", "arch/x86/tools", "scripts", ".config"):
            if (build_dir / shared).exists():
                (scratch / shared).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(build_dir / shared, scratch / shared)
        os.symlink(vmlinux, scratch / "vmlinux")
        old_voffset = (build_dir / BOOT / "voffset.h").read_text() \
            if (build_dir / BOOT / "voffset.h").exists() else None
        voffset_cmd = saved_command(build_dir, f"{BOOT}/voffset.h")
        if voffset_cmd and old_voffset is not None:
            _run(voffset_cmd, scratch, "voffset.h")
            if (scratch / BOOT / "voffset.h").read_text() != old_voffset:
                raise KbbError("the new vmlinux changes voffset.h (symbols the decompressor "
                               "uses moved): rebuild the kernel instead")
        for target in CHAIN:
            if target == "RELOCS":
                _run(_relocs_command(build_dir), scratch, "relocs")
                continue
            if target == "PAYLOAD":
                target = _payload_target(build_dir)
            command = saved_command(build_dir, target)
            if command is None:
                raise KbbError(f"{build_dir}: no saved command for {target}")
            (scratch / target).unlink(missing_ok=True)
            _run(command, scratch, target)
        differs = code_differences(scratch / BOOT / "bzImage", vmlinux)
        if differs:
            raise KbbError(f"the rebuilt bzImage does not carry {vmlinux.name}: "
                           f"{', '.join(differs[:4])} differ")
        with atomic_output(output) as tmp:
            shutil.copyfile(scratch / BOOT / "bzImage", tmp)
        return Path(output)
    finally:
        if not keep_dir:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(command: str, cwd: Path, what: str) -> None:
    proc = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, LC_ALL="C"))
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise KbbError(f"rebuilding {what} failed: {detail[-1] if detail else proc.returncode}")


# ---------------------------------------------------------------------------
# What a bzImage carries

SETUP_SECTS = 0x1F1
PAYLOAD_OFFSET = 0x248   # boot protocol 2.08+: compressed payload, from the protected-mode code
PAYLOAD_LENGTH = 0x24C


def _decompress_payload(data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    if data[:3] == b"\x5d\x00\x00":
        return lzma.decompress(data, format=lzma.FORMAT_ALONE)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    tools = {b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"], b"\x02\x21\x4c\x18": ["lz4", "-dcq"]}
    for magic, cmd in tools.items():
        if data.startswith(magic):
            if shutil.which(cmd[0]) is None:
                raise KbbError(f"{cmd[0]} not found (apt-get install {cmd[0]})")
            # The kernel appends the uncompressed size; the tools stop at the frame end.
            proc = subprocess.run(cmd, input=data, capture_output=True)
            if not proc.stdout:
                raise KbbError(f"cannot decompress the bzImage payload with {cmd[0]}")
            return proc.stdout
    raise KbbError("unknown bzImage payload compression")


def vmlinux_from_bzimage(bzimage) -> bytes:
    """The ELF kernel inside a bzImage (stripped vmlinux; the KASLR relocations follow it)."""
    try:
        data = Path(bzimage).read_bytes()
    except FileNotFoundError:
        raise KbbError(f"{bzimage}: no such file") from None
    if len(data) < 0x260 or data[0x202:0x206] != b"HdrS":
        raise KbbError(f"{bzimage}: not a bzImage")
    setup = ((data[SETUP_SECTS] or 4) + 1) * 512
    offset = int.from_bytes(data[PAYLOAD_OFFSET:PAYLOAD_OFFSET + 4], "little")
    length = int.from_bytes(data[PAYLOAD_LENGTH:PAYLOAD_LENGTH + 4], "little")
    payload = data[setup + offset:setup + offset + length]
    if len(payload) != length or not length:
        raise KbbError(f"{bzimage}: truncated payload")
    kernel = _decompress_payload(payload)
    if kernel[:4] != b"\x7fELF":
        raise KbbError(f"{bzimage}: the payload is not an ELF kernel")
    return kernel


def code_differences(bzimage, vmlinux) -> list[str]:
    """Names of the allocated sections whose bytes differ between the kernel inside
    ``bzimage`` and ``vmlinux`` (empty: the bzImage carries that vmlinux)."""
    from kbuild_bolt.elf.image import ElfImage

    inner = vmlinux_from_bzimage(bzimage)
    with tempfile.NamedTemporaryFile(prefix="kbuild-bolt-inner-") as tmp:
        tmp.write(inner)
        tmp.flush()
        with ElfImage(tmp.name) as a, ElfImage(vmlinux) as b:
            theirs = {sec.name: sec for sec in b.sections if sec.is_alloc and sec.has_bits}
            out = []
            for sec in a.sections:
                if not (sec.is_alloc and sec.has_bits):
                    continue
                other = theirs.pop(sec.name, None)
                if other is None or bytes(a.section_data(sec)) != bytes(b.section_data(other)):
                    out.append(sec.name)
            out += sorted(theirs)
            return out
