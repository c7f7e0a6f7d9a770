"""A loadable module placed at addresses, as if linked: what reads a vmlinux reads it.

A .ko is a relocatable object (ET_REL): its sections have no addresses (what
``ld -r`` leaves in sh_addr means nothing; relocations count from each
section's start), and
every reference that crosses a section (a call to another function, each
entry of ``__jump_table``, ``.orc_unwind_ip``, ``__ex_table``...) is a
relocation whose field holds zero until the loader applies it. A vmlinux
linked with ``--emit-relocs`` is the same thing after linking: sections at
their addresses, fields holding S + A (- P), and the relocations kept beside
them. Placing a module makes the first into the second, so the kernel tables,
the decoder, the CFGs and the cross-checks written for vmlinux read it as they
are:

- every allocated section gets an address (in section header order, each
  aligned, from ``base``, the start of the kernel's module area);
- symbols the module does not define (the kernel's exports, other modules')
  are defined in a section of their own (``.kbb.external``, allocated, no
  bytes) below it, far enough apart: what reads a vmlinux takes only symbols
  of a section for defined ones;
- every relocation whose field lies in an allocated section is applied; the
  relocations' offsets and the symbols' values become addresses (ET_EXEC's way);
- with ``room``, ``.text`` gets free room at its end (int3, where a rewrite
  puts cold code: a module has no other free room), and the ORC tables room
  for the entries that code needs (repeats of the last entry, each with its
  relocation).

:func:`unplace` turns a placed image (a rewrite of it, with the same sections)
back into a relocatable object: offsets and values made section-relative
again, the undefined symbols undefined, every relocated field zero again (the
loader refuses a field that is not: "Invalid relocation target, existing value
is nonzero"), and the room the code did not use cut off (fill at the end of
``.text``, repeats of the last entry at the end of the ORC tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.elf.image import (
    EHDR, ET_EXEC, FIELD_SIZE, PC_RELATIVE, R_X86_64_NONE, RELA, SHDR, SHF_ALLOC,
    SHN_LORESERVE, SHN_UNDEF, SHT_NOBITS, SHT_NULL, SHT_RELA, SHT_SYMTAB, SIGNED,
    STT_SECTION, SYM, ElfImage, type_and_symbol,
)
from kbuild_bolt.errors import KbbError

MODULE_BASE = 0xFFFFFFFFC0000000      # x86-64's MODULES_VADDR with KASLR
EXTERNAL_BASE = 0xFFFFFFFFA0000000    # where symbols the module does not define go
EXTERNAL_STEP = 64
EXTERNAL_SECTION = ".kbb.external"     # (the placed image's only section of its own)
TEXT_ROOM = 0.5                        # free room added to .text, of its size
# ... and at least this (int3 after the ud2): a hole the rewrite uses is 4 KiB
# after a margin at each end (rewrite.holes).
MIN_ROOM = 4096 + 256
ORC_ROOM = 0.5                         # ORC entries added, of their number
UD2 = b"\x0f\x0b"


@dataclass
class Placement:
    """Where each section of a placed module is (0: not allocated), and where
    the room given to its .text starts."""

    section_addr: np.ndarray          # per section index
    text_separator: int = -1          # where in .text the room's ud2 is (-1: no room)


def carries_code_state(image: ElfImage, section) -> bool:
    """What a rewrite changes and unplacing takes back: allocated sections, the
    symbol table and its names, and every relocation section (a rewrite that
    adds symbols renumbers the symbols every relocation names)."""
    symtab = image.symtab
    return bool(section.is_alloc or section.type in (SHT_SYMTAB, SHT_RELA)
                or (symtab is not None and section.index == symtab.link))


# Sections that index the symbol table other than through relocations: a
# rewrite that adds symbols (cold parts) would leave them pointing at others.
SYMBOL_INDEXING = (17, 18)            # SHT_GROUP, SHT_SYMTAB_SHNDX
SYMBOL_INDEXING_NAMES = (".llvm_addrsig",)


def _contents(image: ElfImage) -> dict[int, bytearray]:
    return {s.index: bytearray(image.buf[s.offset:s.offset + s.size])
            for s in image.sections if s.type not in (SHT_NOBITS, SHT_NULL)}


def _add_room(image: ElfImage, contents: dict, sizes: np.ndarray) -> int:
    """Free room at the end of .text, and ORC entries to describe code put there;
    the offset of the ud2 that starts the room (-1: no room)."""
    text = image.section(".text")
    separator = -1
    if text is not None and text.size:
        # (a ud2 first: the fill after the last function ends there, so its
        # slot does not take the room for its own growth)
        pad = -text.size % 16
        run = max(MIN_ROOM, int(text.size * TEXT_ROOM)) // 16 * 16
        separator = text.size + pad
        contents[text.index] += b"\xcc" * pad + UD2 + b"\xcc" * run
        sizes[text.index] += pad + len(UD2) + run
    ip, unwind = image.section(".orc_unwind_ip"), image.section(".orc_unwind")
    relas = [r for r in image.rela_sections if ip is not None and r.info == ip.index]
    if ip is None or unwind is None or len(relas) != 1 or not ip.size:
        return separator
    count = ip.size // 4
    r = image.relocations(relas[0])
    last = r[np.argmax(r["offset"])] if len(r) else None
    if last is None or int(last["offset"]) != 4 * (count - 1) or unwind.size != 6 * count:
        return separator            # (not one relocation per entry: leave it as it is)
    extra = max(16, int(count * ORC_ROOM))
    contents[ip.index] += bytes(4 * extra)
    contents[unwind.index] += bytes(contents[unwind.index][-6:]) * extra
    added = np.repeat(np.array([last], RELA), extra)
    added["offset"] = 4 * (count + np.arange(extra, dtype=np.uint64))
    contents[relas[0].index] += added.tobytes()
    sizes[ip.index] += 4 * extra
    sizes[unwind.index] += 6 * extra
    sizes[relas[0].index] += added.nbytes
    return separator


MODULE_END = 0xFFFFFFFFFF000000       # where the module area ends


def laid_out(sections, start: int, sizes=None) -> tuple[dict[int, int], int]:
    """Sections one after the other from ``start``, in the order given (section
    header order: the module loader's), each aligned to its sh_addralign: each
    one's start by section index, and the end of the last (``sizes``: by
    section index, instead of the sections' own)."""
    at, starts = start, {}
    for s in sections:
        align = max(int(s.addralign), 1)
        at = (at + align - 1) // align * align
        starts[s.index] = at
        at += int(sizes[s.index] if sizes is not None else s.size)
    return starts, at


def place(data: bytes, name: str = "<module>", base: int = MODULE_BASE, room: bool = False,
          addresses: np.ndarray | None = None) -> tuple[bytes, Placement]:
    """The placed image of a module's bytes (see the module docstring).
    ``addresses``: each section's address (another placement's), instead of
    laying them out from ``base``."""
    image = ElfImage.from_bytes(data, name)
    with image:
        if not image.is_relocatable:
            raise KbbError(f"{name}: not a relocatable object (a .ko is ET_REL)")
        _check_object(image, name)
        try:
            return _place(image, name, base, room, addresses)
        except (IndexError, OverflowError, MemoryError) as err:   # (a last safety net)
            raise KbbError(f"{name}: malformed module ({type(err).__name__})") from None


def _check_object(image: ElfImage, name: str) -> None:
    """What placing relies on: a symbol table, symbols of sections that exist,
    sane alignments, relocations of known types naming existing symbols inside
    their sections, a module that fits the module area."""
    symtab = image.symtab
    if symtab is None:
        raise KbbError(f"{name}: no symbol table")
    n = len(image.sections)
    for s in image.sections:
        align = int(s.addralign)
        if align & (align - 1) or align > 1 << 20:
            raise KbbError(f"{name}: {s.label}: alignment {align:#x} is not a power of two "
                           "up to 1 MiB")
    if laid_out((s for s in image.sections if s.is_alloc), MODULE_BASE)[1] > MODULE_END:
        raise KbbError(f"{name}: its sections do not fit the module area")
    shndx = image.symbols.shndx.astype(np.int64)
    bad = np.flatnonzero((shndx >= n) & (shndx < SHN_LORESERVE))
    if len(bad):
        raise KbbError(f"{name}: symbol {int(bad[0])}: section {int(shndx[bad[0]])} does not "
                       "exist")
    for rela in image.rela_sections:
        target = image.sections[rela.info]
        if target.is_alloc and target.type != SHT_NOBITS:
            image.relocations(rela)          # (checked there: symbols, types, bounds)


def _place(image: ElfImage, name: str, base: int, room: bool,
           addresses: np.ndarray | None) -> tuple[bytes, Placement]:
    symtab = image.symtab
    shdrs = image.shdrs.copy()
    contents = _contents(image)
    sizes = shdrs["size"].copy()
    separator = _add_room(image, contents, sizes) if room else -1
    if addresses is None:
        addr = np.zeros(len(shdrs), np.uint64)
        starts, _ = laid_out((s for s in image.sections if s.is_alloc), base, sizes)
        addr[list(starts)] = list(starts.values())
    else:
        addr = np.asarray(addresses, np.uint64)
    placement = Placement(addr, separator)
    shdrs["addr"] = np.where((shdrs["flags"] & SHF_ALLOC) != 0, addr, shdrs["addr"])
    shdrs["size"] = sizes
    external = len(shdrs)
    syms = np.frombuffer(contents[symtab.index], SYM).copy()
    shndx = syms["shndx"].astype(np.int64)
    defined = (shndx > SHN_UNDEF) & (shndx < SHN_LORESERVE)
    syms["value"][defined] += addr[shndx[defined]]
    undefined = np.flatnonzero(shndx == SHN_UNDEF)
    undefined = undefined[undefined > 0]              # (not the null symbol)
    if EXTERNAL_BASE + EXTERNAL_STEP * (len(undefined) + 1) >= MODULE_BASE:
        raise KbbError(f"{name}: too many undefined symbols to place")
    syms["value"][undefined] = np.uint64(EXTERNAL_BASE) + np.uint64(EXTERNAL_STEP) \
        * np.arange(1, len(undefined) + 1, dtype=np.uint64)
    syms["shndx"][undefined] = external
    contents[symtab.index][:] = syms.tobytes()
    for rela in image.rela_sections:
        target = image.sections[rela.info]
        if not target.is_alloc or target.type == SHT_NOBITS:
            continue
        r = np.frombuffer(contents[rela.index], RELA).copy()
        _apply(name, rela.name, r, syms["value"], addr[target.index],
               contents[target.index])
        r["offset"] += addr[target.index]
        contents[rela.index][:] = r.tobytes()
    # The section of the undefined symbols, named in a longer copy of the
    # section names.
    names_index = int(image.header["shstrndx"])
    names = contents[names_index]
    extra = np.zeros(1, SHDR)
    extra[0]["name"] = len(names)
    extra[0]["type"] = SHT_NOBITS
    extra[0]["flags"] = SHF_ALLOC
    extra[0]["addr"] = EXTERNAL_BASE
    extra[0]["size"] = EXTERNAL_STEP * (len(undefined) + 1)
    extra[0]["addralign"] = EXTERNAL_STEP
    contents[names_index] = names + EXTERNAL_SECTION.encode() + b"\0"
    shdrs["size"][names_index] = len(contents[names_index])
    shdrs = np.concatenate([shdrs, extra])
    header = image.header.copy()
    header["type"] = ET_EXEC
    return write_elf(header, shdrs, contents), placement


def _apply(name, where, r, values, section_addr, blob: bytearray) -> None:
    """Write S + A (- P) into the fields of relocations ``r`` (section offsets)."""
    rtype, rsym = type_and_symbol(r["info"])
    keep = rtype != R_X86_64_NONE
    unknown = sorted(set(rtype[keep].tolist()) - set(FIELD_SIZE))
    if unknown:
        raise KbbError(f"{name}: {where}: relocation type {unknown[0]} is not supported")
    place_at = (r["offset"] + np.uint64(section_addr)).view(np.int64)
    # (two's complement: kernel addresses as int64, wrapping as the CPU does)
    value = values[rsym].view(np.int64) + r["addend"]
    value = np.where(isin(rtype, PC_RELATIVE), value - place_at, value)
    view = np.frombuffer(blob, np.uint8)
    for t, size in FIELD_SIZE.items():
        mine = keep & (rtype == t)
        if not mine.any():
            continue
        v = value[mine]
        if size == 4:
            lo, hi = (-(1 << 31), 1 << 31) if SIGNED[t] else (0, 1 << 32)
            bad = (v < lo) | (v >= hi)
            if bad.any():
                i = int(np.flatnonzero(mine)[np.flatnonzero(bad)[0]])
                raise KbbError(f"{name}: {where}[{i}]: value does not fit its 32-bit field")
            field = (v & 0xFFFFFFFF).astype("<u4")
        else:
            field = v.astype("<i8").view("<u8")
        offsets = r["offset"][mine].astype(np.int64)
        if len(offsets) and int(offsets.max()) + size > len(blob):
            raise KbbError(f"{name}: {where}: a relocated field ends past its section")
        view[(offsets[:, None] + np.arange(size)).ravel()] = \
            field.view(np.uint8).reshape(-1, size).ravel()


def write_elf(header, shdrs: np.ndarray, contents: dict) -> bytes:
    """An ELF file of ``header``, the sections ``shdrs`` describe (their sizes
    as given) and their ``contents``: the sections in the order of their old
    file offsets, each aligned, the section headers last."""
    out = bytearray(EHDR.itemsize)
    shdrs = shdrs.copy()
    order = sorted(range(len(shdrs)), key=lambda i: (int(shdrs[i]["offset"]), i))
    for i in order:
        if shdrs[i]["type"] in (SHT_NOBITS, SHT_NULL):
            if shdrs[i]["type"] == SHT_NOBITS:
                shdrs[i]["offset"] = len(out)
            continue
        blob = contents[i]
        if len(blob) != int(shdrs[i]["size"]):
            raise KbbError(f"section {i}: {len(blob)} bytes for a size of "
                           f"{int(shdrs[i]['size'])}")
        align = max(int(shdrs[i]["addralign"]), 1)
        out += bytes(-len(out) % align)
        shdrs[i]["offset"] = len(out)
        out += blob
    out += bytes(-len(out) % 8)
    header = header.copy()
    header["shoff"] = len(out)
    header["shnum"] = len(shdrs)
    header["phoff"], header["phnum"] = 0, 0
    out += shdrs.tobytes()
    out[:EHDR.itemsize] = header.tobytes()
    return bytes(out)


def unplace(placed: bytes, original: bytes, placement: Placement,
            name: str = "<module>") -> bytes:
    """A relocatable object again: ``original`` (the module as built) with the
    code state of a placed image (the one :func:`place` made, or a rewrite of
    it: the same sections), see the module docstring."""
    with ElfImage.from_bytes(original, name) as before, \
            ElfImage.from_bytes(placed, name) as after:
        contents = _contents(before)
        shdrs = before.shdrs.copy()
        addr = placement.section_addr
        for s in before.sections:
            if s.type in (SHT_NOBITS, SHT_NULL) or not carries_code_state(before, s):
                continue
            mine = after.sections[s.index] if s.index < len(after.sections) else None
            if mine is None or mine.name != s.name:
                raise KbbError(f"{name}: section {s.name} is missing in the rewritten module")
            contents[s.index] = bytearray(after.buf[mine.offset:mine.offset + mine.size])
        text = before.section(".text")
        if text is not None and len(contents[text.index]) > text.size:
            at = placement.text_separator
            if at >= 0 and contents[text.index][at:at + len(UD2)] == UD2:
                contents[text.index][at:at + len(UD2)] = b"\xcc" * len(UD2)
            contents[text.index] = contents[text.index][:_text_used(
                after, text.index, addr, text.size, skip=at)]
        _trim_orc(before, after, contents)
        _orc_end_of_text(before, after, contents)
        for rela in before.rela_sections:
            target = before.sections[rela.info]
            if not target.is_alloc or target.type == SHT_NOBITS:
                continue
            r = np.frombuffer(contents[rela.index], RELA).copy()
            r["offset"] -= addr[target.index]
            rtype, _ = type_and_symbol(r["info"])
            view = np.frombuffer(contents[target.index], np.uint8)
            for t, size in FIELD_SIZE.items():
                mine = rtype == t
                if mine.any():
                    offsets = r["offset"][mine].astype(np.int64)
                    view[(offsets[:, None] + np.arange(size)).ravel()] = 0
            del view
            contents[rela.index][:] = r.tobytes()
        symtab = before.symtab
        out_symtab = after.symtab
        if out_symtab.size != symtab.size:
            indexing = [t.name for t in before.sections if t.type in SYMBOL_INDEXING
                        or t.name in SYMBOL_INDEXING_NAMES]
            if indexing:
                raise KbbError(f"{name}: {indexing[0]} names symbols by index, and the "
                               "rewrite added symbols: not supported")
        syms = np.frombuffer(contents[symtab.index], SYM).copy()
        external = after.section(EXTERNAL_SECTION)
        if external is not None:
            undefined = syms["shndx"] == external.index
            syms["shndx"][undefined] = SHN_UNDEF
            syms["value"][undefined] = 0
        shndx = syms["shndx"].astype(np.int64)
        defined = (shndx > SHN_UNDEF) & (shndx < SHN_LORESERVE)
        syms["value"][defined] -= addr[shndx[defined]]
        contents[symtab.index][:] = syms.tobytes()
        shdrs["info"][symtab.index] = out_symtab.info
        shdrs["size"] = [len(contents[i]) if i in contents else shdrs["size"][i]
                         for i in range(len(shdrs))]
        return write_elf(before.header.copy(), shdrs, contents)


# How far before its section's start, or after its end, a PC-relative record
# against a code section's symbol may point (the field-to-next-instruction bias).
PC_BIAS = 16


def records_outside_their_section(image: ElfImage) -> int:
    """The relocation records of a relocatable object that name a code section
    (by its section symbol) and point outside it. The loader puts a module's
    sections apart (init code far from the rest), so such a record is wrong
    wherever it lands, although a placed image with the sections packed
    together resolves it to the right bytes."""
    symbols = image.symbols
    if not len(symbols.value):
        return 0
    sections = image.sections
    code = np.array([s.is_exec and s.type != SHT_NOBITS for s in sections] + [False])
    size = np.array([s.size for s in sections] + [0], np.int64)
    shndx = symbols.shndx.astype(np.int64)
    k = np.where((shndx > SHN_UNDEF) & (shndx < len(sections)), shndx, len(sections))
    named = (symbols.type == STT_SECTION) & code[k]
    total = 0
    for rela in image.rela_sections:
        r = image.relocations(rela)
        if not len(r):
            continue
        rtype, sym = type_and_symbol(r["info"])
        sym = sym.astype(np.int64)
        mine = named[sym]
        if not mine.any():
            continue
        at = symbols.value[sym[mine]].astype(np.int64) + r["addend"][mine]
        end = size[k[sym[mine]]]
        bias = np.where(isin(rtype[mine], list(PC_RELATIVE)), PC_BIAS, 0)
        total += int(((at < -bias) | (at > end + bias)).sum())
    return total


def _trim_orc(before: ElfImage, after: ElfImage, contents: dict) -> None:
    """The ORC tables without the repeats of their last entry that pad them
    (the room :func:`place` gave them, and what the rewrite left unused of it),
    down to one: the loader sorts the table whatever its length."""
    ip, unwind = before.section(".orc_unwind_ip"), before.section(".orc_unwind")
    relas = [r for r in before.rela_sections if ip is not None and r.info == ip.index]
    if ip is None or unwind is None or len(relas) != 1:
        return
    placed_ip = after.section(".orc_unwind_ip")
    rel = np.frombuffer(contents[ip.index], "<i4").astype(np.int64)
    count = len(rel)
    if count < 2:
        return
    targets = orc_targets(placed_ip.addr, rel)
    states = np.frombuffer(contents[unwind.index], np.uint8)[:6 * count].reshape(-1, 6)
    same = (targets == targets[-1]) & (states == states[-1]).all(axis=1)
    # (the trailing run of entries equal to the last one: all but its first go)
    first = count - 1
    while first > 0 and same[first - 1]:
        first -= 1
    keep = max(first + 1, ip.size // 4)     # (the table as built stays whole)
    if keep == count:
        return
    contents[ip.index] = contents[ip.index][:4 * keep]
    contents[unwind.index] = contents[unwind.index][:6 * keep]
    r = np.frombuffer(contents[relas[0].index], RELA)
    ip_offset = r["offset"] - np.uint64(placed_ip.addr)
    contents[relas[0].index] = bytearray(r[ip_offset < np.uint64(4 * keep)].tobytes())


def _orc_end_of_text(before: ElfImage, after: ElfImage, contents: dict) -> None:
    """The ORC entry that ends .text's code (objtool puts one at every code
    section's end; the rewrite at the placed .text's, room included) moved to
    where the written .text ends: left where the room ended, it would lie in
    whatever code the loader puts after .text."""
    text, ip = before.section(".text"), before.section(".orc_unwind_ip")
    if text is None or ip is None:
        return
    placed_end = after.sections[text.index].size
    end = len(contents[text.index])
    relas = [r for r in before.rela_sections if r.info == ip.index]
    if end == placed_end or len(relas) != 1:
        return
    symbols = before.symbols
    own = np.flatnonzero((symbols.type == STT_SECTION) & (symbols.shndx == text.index))
    r = np.frombuffer(contents[relas[0].index], RELA).copy()
    _, sym = type_and_symbol(r["info"])
    at_end = isin(sym, own) & (r["addend"] == placed_end)
    if at_end.any():
        r["addend"][at_end] = end
        contents[relas[0].index][:] = r.tobytes()


def _text_used(image: ElfImage, index: int, addr: np.ndarray, built: int,
               skip: int = -1) -> int:
    """How much of a placed .text with room the code uses: up to the last byte
    that is not fill, or that a symbol, relocation or ORC entry reaches (at
    least its size as built), 16-byte aligned."""
    section = image.sections[index]
    base = int(addr[index])
    data = np.frombuffer(image.buf[section.offset:section.offset + section.size],
                         np.uint8).copy()
    if skip >= 0 and bytes(data[skip:skip + len(UD2)]) == UD2:
        data[skip:skip + len(UD2)] = 0xCC               # (the room's own ud2)
    used = built
    code = np.flatnonzero(data[built:] != 0xCC)
    if len(code):
        used = max(used, built + int(code[-1]) + 1)
    symbols = image.symbols
    mine = symbols.shndx == index
    if mine.any():
        used = max(used, int((symbols.value[mine] + symbols.size[mine]).max()) - base)
    for rela in image.rela_sections:
        if rela.info == index:
            r = image.relocations(rela)
            if len(r):
                rtype, _ = type_and_symbol(r["info"])
                size = np.zeros(len(r), np.uint64)
                for t, n in FIELD_SIZE.items():
                    size[rtype == t] = n
                used = max(used, int((r["offset"] + size).max()) - base)
    ip = image.section(".orc_unwind_ip")
    if ip is not None and ip.size:
        rel = np.frombuffer(image.buf[ip.offset:ip.offset + ip.size], "<i4")
        ips = orc_targets(ip.addr, rel)
        inside = (ips >= np.uint64(base)) & (ips < np.uint64(base + section.size))
        if inside.any():
            used = max(used, int(ips[inside].max()) - base)
    return built if used <= built else min(section.size, (used + 15) // 16 * 16)


def orc_targets(table_addr: int, rel) -> np.ndarray:
    """The addresses .orc_unwind_ip's PC-relative entries (at ``table_addr``) name."""
    rel = np.asarray(rel).astype(np.int64).astype(np.uint64)
    return np.uint64(table_addr) + np.arange(len(rel), dtype=np.uint64) * np.uint64(4) + rel
