"""The analysis of a vmlinux kept between runs: its decoded instructions, CFGs,
fill bytes, and whether its tables and relocations were found to agree with its code.

Decoding millions of instructions and building every CFG is the largest fixed
cost of a rewrite, and both are pure functions of the vmlinux's bytes and of
this code. They are kept in a directory (under Kbuild: the build tree, beside
vmlinux), named by a key made of

- the vmlinux's build-id, its size and a CRC of its code sections and symbol
  table (a build-id alone would trust any tool that edits a file without
  renewing it),
- a hash of kbuild-bolt's own analysis code and the decoder's version,

so a second rewrite of the same vmlinux (another profile, other options, a
`make` that runs the post-link step again) loads them instead. Only the newest
few entries are kept; a damaged or foreign file is ignored (and replaced).

The input's cross-check (its tables and relocations against its code) also
reads data sections and relocations, which the key does not cover: a passed
check is kept beside the analysis with a CRC of the whole file, and counts only
for a file with that CRC.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import NotStoredNpz, SparseColumn, read_stored_npz
from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.binary.cfg import CFG
from kbuild_bolt.elf.notes import build_id
from kbuild_bolt.x86 import decode as x86

KEEP = 2                     # entries kept in a directory (the newest)
_PACKAGE = Path(__file__).resolve().parent.parent


def _code_hash() -> str:
    """What the saved analysis depends on besides the vmlinux: the code that made it."""
    digest = hashlib.sha256()
    for part in ("binary", "x86", "kernel", "elf", "analysis"):
        for path in sorted((_PACKAGE / part).rglob("*.py")):
            digest.update(path.read_bytes())
    digest.update((_PACKAGE / "arrays.py").read_bytes())
    digest.update(_decoder_build().encode())
    return digest.hexdigest()[:12]


def _decoder_build() -> str:
    """Which build of iced-x86 decodes: its installed distributions' directory
    names (they carry the version), else its native module's name and size.
    (Not importlib.metadata: importing it costs more than the rest of the key.)"""
    import iced_x86._iced_x86_py as native

    module = Path(native.__file__)
    package = module.parent
    found = sorted(p.name for p in package.parent.glob("iced_x86-*.dist-info"))
    if found:
        return ",".join(found)
    try:
        return f"{module.name}:{module.stat().st_size}"
    except OSError:
        return module.name


def analysis_key(image) -> str | None:
    """The key of ``image``'s analysis, or None when it has no build-id."""
    note = build_id(image)
    if note is None:
        return None
    crc = 0
    # (code, and the symbols that say where functions are)
    for section in image.sections:
        if (section.is_exec or section.name == ".symtab") and section.has_bits and section.size:
            crc = zlib.crc32(image.section_data(section), crc)
    return f"{note.hex()}-{len(image.bytes):x}-{crc:08x}-{_code_hash()}"


def _path(directory, key: str) -> Path:
    return Path(directory) / f"analysis-{key}.npz"


@dataclass
class KeptAnalysis:
    insns: x86.Decoded
    cfg: CFG
    fill_insn: np.ndarray       # bool: int3 or a nop at each instruction (BinaryModel.fill_insn)


def load(directory, key: str | None) -> KeptAnalysis | None:
    """The saved analysis under ``key``, or None."""
    if directory is None or key is None:
        return None
    path = _path(directory, key)
    try:
        try:
            arrays = read_stored_npz(path)
        except NotStoredNpz:
            with np.load(path, allow_pickle=False) as saved:
                arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile):
        return None
    try:
        length = arrays["insn_length"]
        # Addresses: runs of back-to-back instructions, each from its start.
        run_first, run_addr = arrays["run_first"], arrays["run_addr"]
        step = length.astype(np.uint64)
        addr = np.cumsum(step, dtype=np.uint64) - step
        base = np.repeat(run_addr - addr[run_first],
                         np.diff(np.append(run_first, len(length))))
        addr += base
        ref = SparseColumn(len(length), arrays["ref_index"], arrays["ref_value"])
        insns = x86.Decoded(addr, length, arrays["insn_flow"], ref, arrays["insn_ref_kind"],
                            arrays["insn_field_off"], arrays["insn_field_size"],
                            arrays["insn_invalid"])
        cfg = CFG(**{f.name: arrays[f"cfg_{f.name}"] for f in fields(CFG)})
        fill_insn = np.unpackbits(arrays["fill_insn"], count=len(length)).astype(bool)
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    n = len(length)
    if any(len(column) != n for column in (insns.flow, insns.ref_kind, insns.field_off,
                                           insns.field_size, insns.invalid,
                                           cfg.static_key_insn, cfg.entry_insn, fill_insn)):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)   # (newest first when the directory is pruned)
    return KeptAnalysis(insns, cfg, fill_insn)


def _file_crc(image) -> str:
    """The length and CRC of every byte of the image's file. Read in parts rather
    than through the image's mapping: touching every page of the mapping would
    keep the whole file in this process's resident memory for the rest of the
    rewrite, where most of it (debug info, relocations of other sections) is
    never looked at again."""
    crc = 0
    if not image.file_backed:
        crc = zlib.crc32(image.buf)
    else:
        with open(image.path, "rb") as f:
            while part := f.read(1 << 20):
                crc = zlib.crc32(part, crc)
    return f"{len(image.bytes):x}-{crc:08x}"


def was_checked(directory, key: str | None, image) -> bool:
    """Whether this very file (every byte) passed the input cross-check before."""
    if directory is None or key is None:
        return False
    try:
        said = _path(directory, key).with_suffix(".checked").read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return said.strip() == _file_crc(image)


def mark_checked(directory, key: str | None, image) -> None:
    """Keep that the file passed the input cross-check (best effort)."""
    if directory is None or key is None or not _path(directory, key).exists():
        return
    with contextlib.suppress(OSError):
        with atomic_output(_path(directory, key).with_suffix(".checked")) as tmp:
            Path(tmp).write_text(_file_crc(image) + "\n")


def save(directory, key: str | None, insns: x86.Decoded, cfg: CFG,
         fill_insn: np.ndarray) -> None:
    """Keep the analysis under ``key`` (best effort: a directory that cannot be
    written only means the next run decodes again)."""
    if directory is None or key is None:
        return
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    run_first = np.flatnonzero(~insns.follows_on())
    has_ref = np.flatnonzero(insns.ref_kind != x86.REF_NONE)
    arrays = {
        "insn_length": insns.length, "insn_flow": insns.flow, "insn_ref_kind": insns.ref_kind,
        "insn_field_off": insns.field_off, "insn_field_size": insns.field_size,
        "insn_invalid": insns.invalid, "run_first": run_first,
        "run_addr": insns.addr[run_first], "ref_index": has_ref,
        "ref_value": insns.ref[has_ref], "fill_insn": np.packbits(fill_insn),
    }
    arrays.update((f"cfg_{f.name}", getattr(cfg, f.name)) for f in fields(CFG))
    path = _path(directory, key)
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as out:
            np.savez(out, **arrays)
        entries = sorted(Path(directory).glob("analysis-*.npz"),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".checked").unlink(missing_ok=True)
        # (what a killed run left half-written, once it is surely not being written)
        for tmp in Path(directory).glob(".analysis-*.tmp"):
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink(missing_ok=True)
    except OSError:
        return
