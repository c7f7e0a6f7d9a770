"""kallsyms: the compressed symbol table the kernel carries (scripts/kallsyms.c).

Not a run of fixed entries like the other tables, so it has its own reader:
``kallsyms_num_syms`` names, each a length byte (two bytes when the high bit is
set) and that many token indices into ``kallsyms_token_table``/``_index``;
addresses in ``kallsyms_offsets`` relative to ``kallsyms_relative_base``
(with KALLSYMS_ABSOLUTE_PERCPU non-negative offsets are absolute values), or
plain ``kallsyms_addresses`` on kernels without base-relative kallsyms;
``kallsyms_markers`` (the offset into the names of every 256th symbol) and
``kallsyms_seqs_of_names`` (3-byte indices, sorted by name).

:func:`read_full` keeps each entry's compressed record so a new layout can
write the same records in a new order (:func:`encode`), with the ordering
rules of scripts/kallsyms.c (``compare_symbols``, ``compare_names``).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import concat_ranges, unique
from kbuild_bolt.errors import KbbError

# The arrays, in the names scripts/kallsyms.c gives them.
ARRAYS = ("kallsyms_offsets", "kallsyms_relative_base", "kallsyms_num_syms",
          "kallsyms_names", "kallsyms_markers", "kallsyms_seqs_of_names",
          "kallsyms_token_table", "kallsyms_token_index", "kallsyms_addresses")


@dataclass
class Kallsyms:
    count: int
    names_addr: int
    addresses: np.ndarray | None = None   # uint64, decoded
    names: list[str] | None = None        # with the leading type character
    encoding: str = ""
    records: list[bytes] | None = None    # compressed name records (token indices)
    bare_names: list[str] | None = None   # the names without their type (read to check)
    names_size: int = 0                   # bytes of kallsyms_names in use
    absolute: np.ndarray | None = None    # bool: stored as an absolute value (per-cpu)
    tokens: list[str] | None = None
    relative_base: int = 0
    arrays: dict | None = None            # array name -> address


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


def read(image, records: bool = True) -> Kallsyms | None:
    """Decode every kallsyms name and address. ``records``: keep each entry's
    compressed record and its name with the type character (what a new layout
    writes again); without, ``bare_names`` only (what checking it needs)."""
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
    markers_addr = _sym(image, "kallsyms_markers")
    markers = (image.array_at(markers_addr, "<u4", (table.count + 255) // 256)
               .astype(np.int64) if markers_addr is not None and table.count else None)
    bounds = _record_bounds(names_blob, table.count, markers)
    table.names_size = int((bounds[1] + bounds[2])[-1]) if table.count else 0
    if records:
        table.names = _expanded(names_blob, bounds, tokens)
        table.records = [names_blob[a:b] for a, b in zip(bounds[0].tolist(),
                                                         (bounds[1] + bounds[2]).tolist())]
        bare = None
    else:
        table.bare_names = bare = _expanded(names_blob, bounds, tokens, skip=1)
    table.tokens = tokens
    table.arrays = {name: _sym(image, name) for name in ARRAYS
                    if _sym(image, name) is not None}
    table.addresses, table.encoding = _addresses(
        image, table.count, *((bare, 0) if bare is not None else (table.names, 1)))
    if table.encoding != "absolute":
        offsets = image.array_at(table.arrays["kallsyms_offsets"], "<i4", table.count)
        table.absolute = (offsets >= 0) if table.encoding == "absolute-percpu" \
            else np.zeros(table.count, bool)
        table.relative_base = int(image.array_at(table.arrays["kallsyms_relative_base"],
                                                 "<u8", 1)[0])
    return table


read_full = read


def _record_bounds(blob: bytes, count: int,
                   markers: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, payload start, payload length) of each of ``count`` name records.
    A record's place follows from the lengths of all before it; with the
    markers (where every 256th record starts) the 256 records of every group are
    walked at once, one position per group at a time, and the walk must arrive
    at each next marker. Without them, or where it does not, record by record."""
    data = np.frombuffer(blob, np.uint8)
    if markers is not None and count and len(markers) == (count + 255) // 256 \
            and markers[0] == 0 and int(markers.max()) < len(data):
        groups = len(markers)
        pos = markers.copy()
        start = np.zeros(count, np.int64)
        payload = np.zeros(count, np.int64)
        length = np.zeros(count, np.int64)
        first = np.arange(groups, dtype=np.int64) * 256
        ok = True
        for j in range(256):
            at = first + j
            live = at < count
            if not live.any():
                break
            p = pos[live]
            if int(p.max()) >= len(data):
                ok = False
                break
            b0 = data[p].astype(np.int64)
            two = (b0 & 0x80) != 0
            b1 = data[np.minimum(p + 1, len(data) - 1)].astype(np.int64)
            n = np.where(two, (b0 & 0x7F) | (b1 << 7), b0)
            start[at[live]] = p
            payload[at[live]] = p + 1 + two
            length[at[live]] = n
            pos[live] = p + 1 + two + n
        if ok and np.array_equal(pos[:-1], markers[1:]) and int(pos[-1]) <= len(data):
            return start, payload, length
    start, payload, length = [], [], []
    pos = 0
    for _ in range(count):
        start.append(pos)
        n = blob[pos]
        pos += 1
        if n & 0x80:
            n = (n & 0x7F) | (blob[pos] << 7)
            pos += 1
        payload.append(pos)
        length.append(n)
        pos += n
    return (np.array(start, np.int64), np.array(payload, np.int64),
            np.array(length, np.int64))


def _expanded(blob: bytes, bounds, tokens: list[str], skip: int = 0) -> list[str]:
    """Each record's name: its token indices expanded to their tokens (all
    records at once by a charmap decoding, then cut by the tokens' lengths),
    without its first ``skip`` characters (1: the type)."""
    _, payload, length = bounds
    data = np.frombuffer(blob, np.uint8)
    indices = data[concat_ranges(payload, length)]
    text = codecs.charmap_decode(indices.tobytes(), "strict", dict(enumerate(tokens)))[0]
    token_len = np.array([len(t) for t in tokens], np.int64)
    # (where each record's name starts and ends in ``text``: the tokens' lengths
    # summed up to each record's first and past its last index)
    at = np.concatenate([[0], np.cumsum(token_len[indices])])
    last = np.cumsum(length)
    cut = np.concatenate([at[last - length][:1], at[last]]) if len(length) else at[:1]
    return [text[a:b] for a, b in zip((cut[:-1] + skip).tolist(), cut[1:].tolist())]


def _addresses(image, count: int, names: list[str], skip: int) -> tuple[np.ndarray, str]:
    """(addresses, encoding); ``names[i][skip:]``: entry i's symbol name."""
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
    sample = np.arange(0, count, max(1, count // 400))
    rows = symbols.rows_of([names[i][skip:] for i in sample.tolist()])
    have = rows >= 0
    want = symbols.value[rows[have]]
    agree = {"relative": int((relative[sample[have]] == want).sum()),
             "absolute-percpu": int((percpu[sample[have]] == want).sum())}
    if agree["absolute-percpu"] > agree["relative"]:
        return percpu.astype(np.uint64), "absolute-percpu"
    return relative.astype(np.uint64), "relative"


# ---------------------------------------------------------------------------
# Writing a new layout


def _linker_provided(name: str) -> bool:
    """scripts/kallsyms.c may_be_linker_script_provide_symbol()."""
    if len(name) < 8 or not name.startswith("__"):
        return False
    return (name.startswith(("__start_", "__stop_", "__end_"))
            or name.endswith(("_start", "_end")))


def address_order(names: list[str], addresses: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """The order scripts/kallsyms.c sorts symbols in (``compare_symbols``): by
    address, then non-weak first, then not linker-provided, then fewer leading
    underscores, then ``seq`` (the order they had)."""
    seq = np.asarray(seq)
    order = np.lexsort((seq, addresses))
    # The other keys only order entries at one address: compute them for those.
    at = addresses[order]
    same = np.zeros(len(order), bool)
    same[1:] = at[1:] == at[:-1]
    same[:-1] |= same[1:]
    tied = order[same]
    if len(tied):
        tied_names = [names[i] for i in tied.tolist()]
        weak = np.array([n[:1] in ("w", "W") for n in tied_names], np.int64)
        provided = np.array([_linker_provided(n[1:]) for n in tied_names], np.int64)
        underscores = np.array([len(n[1:]) - len(n[1:].lstrip("_")) for n in tied_names],
                               np.int64)
        # (sorted by address first, the groups keep their places in ``order``)
        order[same] = tied[np.lexsort((seq[tied], underscores, provided, weak,
                                       addresses[tied]))]
    return order


def _clean(name: str) -> str:
    """scripts/kallsyms.c cleanup_symbol_name(): clang LTO suffixes do not count."""
    i = name.find(".llvm.")
    return name if i < 0 else name[:i]


def name_order(names: list[str], addresses: np.ndarray) -> list[int]:
    """``kallsyms_seqs_of_names``: indices (into the address order) sorted by name,
    then address, then index (``compare_names``)."""
    keys = [n[1:] for n in names]
    if any(".llvm." in k for k in keys):
        keys = [_clean(k) for k in keys]
    if len(addresses) < 2 or np.all(addresses[1:] >= addresses[:-1]):
        # Entries in address order (as encode gives them): among equal names,
        # the order of the indices is the order of (address, index); a stable
        # sort by name alone gives it.
        return sorted(range(len(keys)), key=keys.__getitem__)
    ordered = sorted(zip(keys, addresses.tolist(), range(len(keys))))
    return [k[2] for k in ordered]


def token_index(tokens: list[str]) -> tuple[dict[str, int], int]:
    """The token table as a lookup for :func:`compress` (token -> first index, and
    the longest token's length): build it once for many names."""
    index: dict[str, int] = {}
    for k, t in enumerate(tokens):
        if t:
            index.setdefault(t, k)
    return index, max((len(t) for t in tokens), default=1)


def compress(text: str, tokens: list[str], lookup: tuple | None = None) -> bytes | None:
    """A name record ("t" + name) in this kernel's token table: greedy longest
    match, the way the kernel expands it back (None when a character has no
    token of its own). ``lookup``: :func:`token_index` of ``tokens``."""
    index, longest = lookup if lookup is not None else token_index(tokens)
    out = []
    i = 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            k = index.get(text[i:i + n])
            if k is not None:
                out.append(k)
                i += n
                break
        else:
            return None
    n = len(out)
    if n > 0x3FFF:
        return None
    head = bytes([n]) if n <= 0x7F else bytes([(n & 0x7F) | 0x80, n >> 7])
    return head + bytes(out)


def capacities(image, table: Kallsyms) -> dict[str, int]:
    """Bytes each array may take: up to the next symbol (a kernel built with
    kbuild-bolt's kallsyms reserve leaves room there for names it adds)."""
    values = unique(image.symbols.value)
    out = {}
    for name, at in (table.arrays or {}).items():
        section = image.section_at(at)
        i = int(np.searchsorted(values, np.uint64(at), side="right"))
        nxt = int(values[i]) if i < len(values) else section.end
        out[name] = min(nxt, section.end) - at
    return out


def encode(table: Kallsyms, order: np.ndarray, addresses: np.ndarray) -> dict[str, bytes]:
    """The bytes of every array for the entries of ``table`` in ``order`` at
    ``addresses`` (already in that order): names, markers, offsets (or
    addresses), seqs_of_names."""
    records = [table.records[i] for i in order.tolist()]
    names = [table.names[i] for i in order.tolist()]
    out = {"kallsyms_names": b"".join(records),
           "kallsyms_num_syms": np.uint32(len(records)).astype("<u4").tobytes()}
    sizes = np.fromiter((len(r) for r in records), np.int64, len(records))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out["kallsyms_markers"] = starts[::256].astype("<u4").tobytes() if len(starts) else b""
    if table.encoding == "absolute":
        out["kallsyms_addresses"] = addresses.astype("<u8").tobytes()
    else:
        absolute = table.absolute[order]
        base = np.uint64(table.relative_base)
        if table.encoding == "absolute-percpu":
            rel = (base - np.uint64(1) - addresses).view(np.int64)
            value = np.where(absolute, addresses.view(np.int64), rel)
            if (~absolute & ((value >= 0) | (value < -(1 << 31)))).any():
                raise KbbError("kallsyms: a symbol lies out of reach of kallsyms_relative_base")
        else:
            value = (addresses - base).view(np.int64)
            if ((value < 0) | (value >= 1 << 32)).any():
                raise KbbError("kallsyms: a symbol lies out of reach of kallsyms_relative_base")
        out["kallsyms_offsets"] = value.astype("<u8").astype("<u4").tobytes() \
            if table.encoding == "relative" else value.astype("<i4").tobytes()
    if "kallsyms_seqs_of_names" in (table.arrays or {}):
        seqs = np.array(name_order(names, addresses), np.uint32)
        b = np.stack([(seqs >> 16) & 0xFF, (seqs >> 8) & 0xFF, seqs & 0xFF], axis=1)
        out["kallsyms_seqs_of_names"] = b.astype(np.uint8).tobytes()
    return out
