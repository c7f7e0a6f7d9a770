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


PAYLOADS = ("gz", "bz2", "lzma", "xz", "lzo", "lz4", "zst")


def _payload_target(build_dir: Path) -> str:
    """The compressed payload the decompressor wraps: the one piggy.S was made from
    (a tree built before with another compression keeps that one's file too)."""
    piggy = saved_command(build_dir, f"{BOOT}/compressed/piggy.S") or ""
    m = re.search(f"({re.escape(BOOT)}/compressed/vmlinux\\.bin\\.(\\w+))", piggy)
    if m and m.group(2) in PAYLOADS:
        return m.group(1)
    present = [f"{BOOT}/compressed/vmlinux.bin.{s}" for s in PAYLOADS
               if (build_dir / f"{BOOT}/compressed/vmlinux.bin.{s}").exists()]
    if len(present) == 1:
        return present[0]
    raise KbbError(f"{build_dir}: cannot tell the compressed kernel payload in "
                   f"{BOOT}/compressed (piggy.S has no saved command)")


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
            if not (scratch / target).exists() or not (scratch / target).stat().st_size:
                raise KbbError(f"rebuilding {target} failed: the step wrote nothing "
                               f"({command[:120]})")
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


# What the kernel's top Makefile exports to every command (the compressors the
# saved commands name as $(KGZIP) and the like are expanded in them; scripts such
# as xz_wrap.sh read $XZ and $SRCARCH themselves). Outside make nobody sets them.
MAKE_ENVIRONMENT = {
    "ARCH": "x86", "SRCARCH": "x86", "CONFIG_SHELL": "sh", "KGZIP": "gzip",
    "KBZIP2": "bzip2", "KLZOP": "lzop", "LZMA": "lzma", "LZ4": "lz4", "XZ": "xz",
    "ZSTD": "zstd",
}


def _run(command: str, cwd: Path, what: str) -> None:
    """One saved Kbuild command, in make's environment. It fails when any part of
    it fails (``{ cat | xz_wrap.sh; size_append; } > out`` would otherwise succeed
    with a payload of four bytes); the step's own error is shown."""
    env = dict(MAKE_ENVIRONMENT)
    env.update(os.environ)
    env["LC_ALL"] = "C"
    shell = ["bash", "-e", "-o", "pipefail", "-c"] if shutil.which("bash") else ["sh", "-e", "-c"]
    proc = subprocess.run(shell + [command], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        detail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line]
        raise KbbError(f"rebuilding {what} failed: "
                       f"{' / '.join(detail[-3:]) if detail else f'exit status {proc.returncode}'}")


# ---------------------------------------------------------------------------
# What a bzImage carries

SETUP_SECTS = 0x1F1
PAYLOAD_OFFSET = 0x248   # boot protocol 2.08+: compressed payload, from the protected-mode code
PAYLOAD_LENGTH = 0x24C


def _decompress_payload(data: bytes) -> bytes:
    """The payload's first stream (what follows it, such as the 4-byte size the
    kernel appends to bzip2/lzma/xz/zstd payloads, is not compressed data)."""
    import bz2
    import lzma
    import zlib

    try:
        if data[:2] == b"\x1f\x8b":
            return zlib.decompressobj(wbits=31).decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if data[:3] == b"\x5d\x00\x00":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if data[:3] == b"BZh":
            return bz2.BZ2Decompressor().decompress(data)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
        raise KbbError(f"the bzImage payload does not decompress: {err}") from None
    tools = {b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"], b"\x02\x21\x4c\x18": ["lz4", "-dcq"],
             b"\x89LZO": ["lzop", "-dcq"]}
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
