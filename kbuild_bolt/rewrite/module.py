"""Rewriting a loadable module: placed, rewritten as a vmlinux is, unplaced.

A .ko is a relocatable object; placed at addresses (elf.place) it reads as a
vmlinux linked with --emit-relocs does, so the whole pipeline applies to it
unchanged: its own tables (``__jump_table``, ``.altinstructions``,
``.smp_locks``, ``__bug_table``, ``__ex_table``, ``.orc_unwind*``,
``__mcount_loc``, ``.static_call_sites``, ``.return_sites``...) are read,
cross-checked against its code, updated and verified, its relocations follow
the code. The verified result is made a relocatable object again, and that is
checked too: placed once more it must give the verified image's contents.

What differs from vmlinux:
- the profile's records of this module, kept as (module, section, offset),
  are moved to the placed addresses (placed_profile);
- functions move inside their own section (.text, .init.text, .exit.text:
  the loader puts each where it wants), the cold parts split off them go to
  the room place() gave .text, named name.cold in the symbol table (the
  module's kallsyms); indirect calls are not promoted (calls promoted across
  modules are not done yet): an option asking for it is noted and left out;
- the loader and ftrace sort a module's ORC, exception and mcount tables when
  it loads, so their entries keep their places (and each its relocation
  record, against the section of the code it names).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.elf.image import SHT_NOBITS, ElfImage
from kbuild_bolt.elf.place import (
    EXTERNAL_SECTION, UD2, orc_targets, place, records_outside_their_section, unplace,
)
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel.version import modinfo
from kbuild_bolt.profile.model import (
    MODULE_SEPARATOR, Profile, in_modules, module_address, module_section_index,
)
from kbuild_bolt.profile.shapes import FunctionShape
from kbuild_bolt.rewrite.context import RewriteOptions, RewriteResult


SIGNATURE_MAGIC = b"~Module signature appended~\n"


class ModuleLeftAsIs(KbbError):
    """A module this rewrite has nothing to do with, or cannot rewrite yet, for
    a reason that is about the module, not an error in it: the profile holds
    none of its code, or it carries debug info. ``rewrite --leave-as-is`` (the
    Kbuild module pass) leaves such a module as it is and says why."""

    def __init__(self, name: str, reason: str, advice: str = ""):
        super().__init__(f"{reason}{advice}")
        self.module = name
        self.reason = reason


def is_module(path) -> bool:
    """A relocatable object (what a .ko is); False for anything else, or no file."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError:
        return False
    return len(head) == 18 and head[:4] == b"\x7fELF" and head[16:18] == b"\x01\x00"


def module_name(image: ElfImage, path) -> str:
    """The module's name as the kernel knows it (.modinfo ``name=``, else the
    file's, dashes as underscores)."""
    name = (modinfo(image) or {}).get("name")
    return name or Path(path).name.split(".ko")[0].replace("-", "_")


def placed_profile(profile: Profile, name: str, image: ElfImage) -> Profile:
    """The records of module ``name`` in ``profile`` at the placed module's
    addresses (``image``: the placed module). Records of a section the module
    no longer has are left out."""
    part = profile.module_part(name)
    found = [image.section(section) for _, section in profile.module_sections]
    addr_of = np.array([s.addr if s is not None else 0 for s in found] + [0], np.uint64)
    size_of = np.array([s.size if s is not None else 0 for s in found] + [0], np.uint64)

    def placed(a):
        inside = in_modules(a)
        index = np.where(inside, module_section_index(a), len(addr_of) - 1)
        offset = a & np.uint64(0xFFFFFFFF)
        ok = inside & (offset < size_of[index])
        return addr_of[index] + offset, ok

    rs, ok_s = placed(part.range_start)
    rl, ok_l = placed(part.range_last)
    src, ok_src = placed(part.src)
    dst, ok_dst = placed(part.dst)
    keep_r, keep_b = ok_s & ok_l, ok_src & ok_dst
    shapes = {}
    for shape in part.shapes.values():
        start, ok = placed(np.array([shape.start], np.uint64))
        if ok[0]:
            moved = FunctionShape(shape.name.split(MODULE_SEPARATOR, 1)[1], int(start[0]),
                                  shape.size, shape.hash, shape.blocks)
            shapes[f"{moved.name}@{moved.start:x}"] = moved
    out = Profile(rs[keep_r], rl[keep_r], part.range_count[keep_r], src[keep_b], dst[keep_b],
                  part.count[keep_b], kernel=profile.kernel, source=profile.source,
                  sampled=profile.sampled, stats=dict(profile.stats)).merged()
    out.shapes = shapes
    return out


def module_shapes(profile: Profile, tree) -> dict:
    """The shapes of the module functions ``profile`` saw (named "module:function",
    at their profile addresses), from the .ko files under ``tree``: what lets the
    profile apply to a rebuilt module (stale matching, as for vmlinux)."""
    from kbuild_bolt.binary.cfg import build_cfg
    from kbuild_bolt.profile.modules import module_files, module_tree
    from kbuild_bolt.profile.stale import shapes_for

    files = module_files(module_tree(tree))
    index = {key: i for i, key in enumerate(profile.module_sections)}
    out = {}
    for name in profile.modules:
        if name not in files:
            continue
        try:
            model, _ = open_placed(files[name])
        except KbbError:
            continue            # (not a module this tool reads: its counts still apply)
        for shape in shapes_for(model, build_cfg(model),
                                placed_profile(profile, name, model.image)).values():
            section = model.image.section_at(shape.start)
            i = index.get((name, section.name)) if section is not None else None
            if i is None:
                continue
            at = int(module_address(i, shape.start - section.addr))
            named = FunctionShape(f"{name}{MODULE_SEPARATOR}{shape.name}", at, shape.size,
                                  shape.hash, shape.blocks)
            out[f"{named.name}@{at:x}"] = named
    return out


def module_options(options: RewriteOptions) -> tuple[RewriteOptions, list[str]]:
    """``options`` as they apply to a module, and notes on what was left out."""
    notes = []
    if options.indirect_call_promotion != "none" and options.profile is not None:
        notes.append("indirect calls are not promoted in a module")
    return replace(options, indirect_call_promotion="none", icp_every_site=False,
                   cache_dir=None, strip_debug=True), notes


@dataclass(frozen=True)
class Signing:
    """How to sign a rewritten module: as the kernel's modules_install does
    (``scripts/sign-file HASH KEY CERT MODULE``; Kbuild's signing_key.pem holds
    both the key and the certificate)."""

    key: str
    cert: str
    hash: str = "sha256"
    sign_file: str = "sign-file"

    def sign(self, path) -> None:
        tool = shutil.which(self.sign_file) or (self.sign_file if os.access(
            self.sign_file, os.X_OK) else None)
        if tool is None:
            raise KbbError(f"{self.sign_file}: not found (give --sign-file: the kernel "
                           "tree's scripts/sign-file)")
        proc = subprocess.run([tool, self.hash, self.key, self.cert, str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise KbbError(f"sign-file failed: {said[-1] if said else proc.returncode}")


def rewrite_module(input_path, output_path, options: RewriteOptions, log=None,
                   signing: Signing | None = None) -> RewriteResult:
    """Rewrite the module at ``input_path`` into ``output_path`` (atomically,
    after every check passed; signed with ``signing`` when given)."""
    from kbuild_bolt.profile.formats import load_profile
    from kbuild_bolt.rewrite.engine import rewrite

    try:
        data = Path(input_path).read_bytes()
    except OSError as err:
        raise KbbError(f"{input_path}: {err.strerror}") from None
    placed, placement = place(data, str(input_path), room=True)
    options, notes = module_options(options)
    if signing is not None:
        notes.append(f"signed with {signing.key} ({signing.hash})")
    elif data.endswith(SIGNATURE_MAGIC):
        # (a signature covers the bytes it was made for: the new module needs a
        # new one, from the key of the kernel that loads it)
        notes.append("its signature is dropped: sign the new module again (--sign-key, "
                     "or scripts/sign-file HASH KEY CERT MODULE) or let the kernel's "
                     "modules_install sign it")
    with ElfImage.from_bytes(placed, str(input_path)) as image:
        if modinfo(image) is None:
            raise KbbError(f"{input_path}: a relocatable object without .modinfo: not a "
                           "kernel module")
        name = module_name(image, input_path)
        debug = [s.name for s in image.sections if s.name.startswith(".debug_") and s.size]
        if debug:
            # (their code addresses would go stale: modules' DWARF is not updated yet)
            raise ModuleLeftAsIs(name, f"{input_path}: has debug info ({debug[0]})",
                                 ": strip it first (strip --strip-debug; modules_install: "
                                 "INSTALL_MOD_STRIP=1), as distro modules are shipped")
        if options.profile is not None:
            profile = options.profile if isinstance(options.profile, Profile) \
                else load_profile(options.profile)
            mine = placed_profile(profile, name, image)
            if not len(mine.range_start) and not len(mine.src):
                raise ModuleLeftAsIs(name, f"the profile holds no code of module {name}",
                                     " (record it with the module loaded and its sections "
                                     "listed: see docs/modules.md)")
            options = replace(options, profile=mine)
    for note in notes:
        if log:
            log(f"module {name}: {note}")
    with tempfile.TemporaryDirectory(prefix="kbuild-bolt-module-") as tmp:
        src, out = Path(tmp) / "placed", Path(tmp) / "placed.out"
        src.write_bytes(placed)
        result = rewrite(src, out, replace(options, input_name=f"{input_path} (placed)"))
        rewritten = out.read_bytes()
    module = unplace(rewritten, data, placement, str(input_path))
    _check_unplaced(module, rewritten, placement, str(input_path), data)
    with atomic_output(output_path) as tmp_out:
        Path(tmp_out).write_bytes(module)
        if os.path.exists(input_path):
            shutil.copymode(input_path, tmp_out)
        if signing is not None:
            signing.sign(tmp_out)
    result.module = name
    result.module_notes = notes
    return result


def _check_unplaced(module: bytes, verified: bytes, placement, name: str,
                    original: bytes) -> None:
    """The relocatable object written must be the verified image: placed again
    at the same addresses, its sections' contents, relocations and symbols are
    the verified ones (without the room the code did not use: fill at the end
    of .text, repeats of the last entry at the end of the ORC tables and their
    relocations). And no record may name a code section it does not point into
    (more than the module as built did): the loader places sections apart."""
    with ElfImage.from_bytes(module, name) as out, ElfImage.from_bytes(original, name) as inp:
        stray = records_outside_their_section(out) - records_outside_their_section(inp)
    if stray > 0:
        raise KbbError(f"{name}: {stray} relocation records of the module written point "
                       "outside the code section they name: nothing written")
    again, _ = place(module, name, addresses=placement.section_addr)
    with ElfImage.from_bytes(again, name) as a, ElfImage.from_bytes(verified, name) as b:
        names = a.sections[int(a.header["shstrndx"])].name
        for s in a.sections:
            if s.type == SHT_NOBITS or s.name in (names, EXTERNAL_SECTION, ".orc_unwind_ip",
                                                  ".rela.orc_unwind_ip"):
                continue                 # (ORC's targets, what its records give: below)
            t = b.section(s.name)
            mine, theirs = bytes(a.section_data(s)), bytearray(b.section_data(t)) if t else b""
            at = placement.text_separator
            if s.name == ".text" and at >= 0 and theirs[at:at + len(UD2)] == UD2:
                theirs[at:at + len(UD2)] = b"\xcc" * len(UD2)    # (the room's own)
            rest = bytes(theirs[len(mine):])
            unused = {".text": not rest.strip(b"\xcc"),
                      ".orc_unwind": rest == mine[-6:] * (len(rest) // 6)}.get(s.name, not rest)
            if theirs[:len(mine)] != mine or not unused:
                raise KbbError(f"{name}: the module written differs from the one verified "
                               f"in {s.name}: nothing written")
        ip = a.section(".orc_unwind_ip")
        if ip is not None and ip.size:
            mine = _orc_ips(a, ip)
            theirs = _orc_ips(b, b.section(".orc_unwind_ip"))
            # The entry that ends .text moves to where the written .text ends
            # (place.unplace); every other entry names the code it did. The
            # entries cut off all stood where the last one kept stands.
            # (the verified .text's end may also be where the next section starts)
            text_a, text_b = a.section(".text"), b.section(".text")
            if len(theirs) < len(mine):
                raise KbbError(f"{name}: the module written has more ORC entries than the "
                               "one verified: nothing written")
            same = theirs[:len(mine)] == mine
            if text_a is not None and text_b is not None:
                same |= ((theirs[:len(mine)] == np.uint64(text_b.end))
                         & (mine == np.uint64(text_a.end)))
            if not same.all():
                raise KbbError(f"{name}: the module written differs from the one verified "
                               "in .orc_unwind_ip: nothing written")
            cut = theirs[len(mine):]
            if text_a is not None and text_b is not None and mine[-1] == np.uint64(text_a.end):
                cut = np.where(cut == np.uint64(text_b.end), mine[-1], cut)
            if len(cut) and (cut != mine[-1]).any():
                raise KbbError(f"{name}: the module written lost ORC entries of the one "
                               "verified: nothing written")


def _orc_ips(image: ElfImage, section) -> np.ndarray:
    return orc_targets(section.addr, np.frombuffer(
        image.buf[section.offset:section.offset + section.size], "<i4"))


def open_placed(path):
    """(BinaryModel of the module at ``path`` placed, its name): what measuring
    and showing a module's code work on."""
    from kbuild_bolt.binary.model import BinaryModel

    from kbuild_bolt.profile.modules import read_module_bytes

    try:
        data = read_module_bytes(Path(path))
    except OSError as err:
        raise KbbError(f"{path}: {err.strerror}") from None
    placed, _ = place(data, str(path))
    image = ElfImage.from_bytes(placed, str(path))
    return BinaryModel(image, jobs=1), module_name(image, path)


def measured_module_taken(path, profile: Profile) -> dict[str, int]:
    """Taken jmp/jcc the run ``profile`` recorded in the code of the module at
    ``path`` (the measured figures of dyno.measured_taken_branches)."""
    from kbuild_bolt.profile.attach import attach
    from kbuild_bolt.profile.dyno import measured_taken_branches

    model, name = open_placed(path)
    return measured_taken_branches(model, attach(model, placed_profile(profile, name,
                                                                       model.image)))



def measured_module_footprint(path, profile: Profile) -> dict[str, int]:
    """The code footprint (profile.footprint) the run ``profile`` recorded in the
    module at ``path``, at the offsets the loader gives its code: the core code
    sections one after another from a page (profile.modules.text_layout), the
    init ones likewise in an area of their own."""
    from kbuild_bolt.elf.place import laid_out
    from kbuild_bolt.profile.footprint import footprint
    from kbuild_bolt.profile.modules import read_module_bytes, text_layout

    model, name = open_placed(path)
    image = model.image
    at = {section: offset for section, offset, _ in text_layout(read_module_bytes(Path(path)),
                                                                 str(path))}
    init = [s for s in image.sections if s.is_alloc and s.is_exec and s.name.startswith(".init")]
    init_at, _ = laid_out(init, INIT_AREA)
    at.update((s.name, init_at[s.index]) for s in init)
    code = sorted((s.addr, s.end, at[s.name]) for s in image.sections
                  if s.is_exec and s.size and s.name in at)
    starts = np.array([c[0] for c in code], np.uint64)
    offsets = np.array([c[2] for c in code], np.uint64)
    addr = model.insns.addr
    k = np.maximum(np.searchsorted(starts, addr, side="right").astype(np.int64) - 1, 0)
    mine = placed_profile(profile, name, image)
    mine.stats = {}         # (the recorder's cache simulation is the whole kernel's)
    return footprint(model, mine, addresses=addr - starts[k] + offsets[k])


# Where the footprint puts a module's init code: apart from its core text (the
# loader's init area is another allocation).
INIT_AREA = 1 << 40
