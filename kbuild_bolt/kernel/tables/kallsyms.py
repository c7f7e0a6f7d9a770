"""kallsyms: the compressed symbol table the kernel carries (scripts/kallsyms.c).

Not a run of fixed entries like the other tables, so it has its own reader:
``kallsyms_num_syms`` names, each a length byte (two bytes when the high bit is
set) and that many token indices into ``kallsyms_token_table``/``_index``;
addresses in ``kallsyms_offsets`` relative to ``kallsyms_relative_base``
(with KALLSYMS_ABSOLUTE_PERCPU non-negative offsets are absolute values), or
plain ``kallsyms_addresses`` on kernels without base-relative kallsyms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.errors import KbbError


@dataclass
class Kallsyms:
    count: int
    names_addr: int
    addresses: np.ndarray | None = None   # uint64, decoded
    names: list[str] | None = None        # with the leading type character
    encoding: str = ""


def _sym(image, name: str) -> int | None:
    return image.symbols.address(name)


def read_count(image) -> Kallsyms | None:
    """Just the symbol count (cheap): None when the kernel has no kallsyms."""
    num_addr = _sym(image, "kallsyms_num_syms")
    names_addr = _sym(image, "kallsyms_names")
    if num_addr is None or names_addr is None:
        return None
    count = int(image.array_at(num_addr, "<u4", 1)[0])
    return Kallsyms(count=count, names_addr=names_addr)


def read(image) -> Kallsyms | None:
    """Decode every kallsyms name and address."""
    table = read_count(image)
    if table is None:
        return None
    token_table = _sym(image, "kallsyms_token_table")
    token_index = _sym(image, "kallsyms_token_index")
    if token_table is None or token_index is None:
        raise KbbError("kallsyms: token table symbols missing")
    index = image.array_at(token_index, "<u2", 256).astype(np.int64)
    section = image.section_at(token_table)
    blob = image.read(token_table, section.end - token_table)
    tokens = []
    for off in index.tolist():
        end = blob.find(b"\0", off)
        tokens.append(blob[off:end].decode("latin-1"))
    section = image.section_at(table.names_addr)
    names_blob = image.read(table.names_addr, section.end - table.names_addr)
    names = []
    pos = 0
    for _ in range(table.count):
        length = names_blob[pos]
        pos += 1
        if length & 0x80:
            length = (length & 0x7F) | (names_blob[pos] << 7)
            pos += 1
        names.append("".join(tokens[b] for b in names_blob[pos:pos + length]))
        pos += length
    table.names = names
    table.addresses, table.encoding = _addresses(image, table.count, names)
    return table


def _addresses(image, count: int, names: list[str]) -> tuple[np.ndarray, str]:
    absolute = _sym(image, "kallsyms_addresses")
    if absolute is not None:
        return image.array_at(absolute, "<u8", count).astype(np.uint64), "absolute"
    offsets_addr = _sym(image, "kallsyms_offsets")
    base_addr = _sym(image, "kallsyms_relative_base")
    if offsets_addr is None or base_addr is None:
        raise KbbError("kallsyms: neither kallsyms_addresses nor kallsyms_offsets present")
    offsets = image.array_at(offsets_addr, "<i4", count).astype(np.int64)
    base = int(image.array_at(base_addr, "<u8", 1)[0])
    relative = (np.uint64(base) + (offsets & 0xFFFFFFFF).astype(np.uint64))
    percpu = np.where(offsets >= 0, offsets.astype(np.uint64),
                      np.uint64(base) - np.uint64(1) - offsets.astype(np.uint64))
    # Which encoding the kernel used depends on KALLSYMS_ABSOLUTE_PERCPU: take the
    # one that agrees with the ELF symbol table.
    symbols = image.symbols
    agree = {"relative": 0, "absolute-percpu": 0}
    for i in range(0, count, max(1, count // 400)):
        want = symbols.address(names[i][1:])
        if want is None:
            continue
        agree["relative"] += int(relative[i]) == want
        agree["absolute-percpu"] += int(percpu[i]) == want
    if agree["absolute-percpu"] > agree["relative"]:
        return percpu.astype(np.uint64), "absolute-percpu"
    return relative.astype(np.uint64), "relative"
