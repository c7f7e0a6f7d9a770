"""BOLT's ``.fdata`` profile, in and out.

A branch line names both ends as ``<kind> <name> <offset>`` (kind 1: a symbol
and a hex offset into it; 0: no symbol, the name is ``[unknown]`` and the
offset an address), then the mispredictions and the count:

    1 schedule 2a 1 schedule 4f 0 1234

perf2bolt writes fall-throughs the same way, from the last instruction of a
block to the start of the next one. A file may start with ``no_lbr`` (then the
lines are samples: ``1 <name> <offset> <count>``) or ``boltedcollection``.

Reading needs the vmlinux (names to addresses). A profile read from .fdata
has transfers only, no ranges: block counts come from the edges.
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import Profile


def looks_like(head: bytes) -> bool:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return False
    lines = [line for line in text.splitlines()[:5] if line.strip()]
    if not lines:
        return False
    if lines[0].startswith(("no_lbr", "boltedcollection")):
        return True
    parts = lines[0].split()
    return len(parts) == 8 and parts[0] in ("0", "1", "2") and parts[3] in ("0", "1", "2")


def _name_table(model):
    symbols = model.image.symbols
    names = symbols.names
    table = {}
    defined = (symbols.shndx > 0) & (symbols.shndx < 0xFF00)
    for i in np.flatnonzero(defined & isin(symbols.type, (0, 2))).tolist():
        table.setdefault(names[i], int(symbols.value[i]))
    for i in np.flatnonzero(defined & (symbols.type == 2)).tolist():
        table[names[i]] = int(symbols.value[i])  # functions win
    return table


def _normalize(name: str) -> str:
    """perf2bolt writes local symbols as ``name/N`` (N: which file's): drop it."""
    base, slash, index = name.rpartition("/")
    return base if slash and index.isdigit() else name


def read_fdata(path, model) -> Profile:
    names = _name_table(model)
    src, dst, count = [], [], []
    sample_addr, sample_count = [], []
    no_lbr = False
    unknown = 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if n == 1 and parts[0] in ("no_lbr", "boltedcollection"):
                no_lbr = parts[0] == "no_lbr"
                continue
            try:
                if no_lbr:
                    kind, name, off, hits = parts[:4]
                    base = names.get(_normalize(name)) if kind == "1" else 0
                    if base is None:
                        unknown += 1
                        continue
                    sample_addr.append(base + int(off, 16))
                    sample_count.append(int(hits))
                    continue
                if len(parts) != 8:
                    raise ValueError
                fk, fname, foff, tk, tname, toff, _mispred, c = parts
                fbase = names.get(_normalize(fname)) if fk == "1" else 0
                tbase = names.get(_normalize(tname)) if tk == "1" else 0
                if fbase is None or tbase is None:
                    unknown += 1
                    continue
                src.append(fbase + int(foff, 16))
                dst.append(tbase + int(toff, 16))
                count.append(int(c))
            except ValueError:
                raise KbbError(f"{path}:{n}: malformed .fdata line: {line.strip()[:60]}") from None
    if no_lbr:
        addr = np.array(sample_addr, dtype=np.uint64)
        return Profile(addr, addr.copy(), np.array(sample_count, dtype=np.int64),
                       source="fdata-no-lbr", sampled=True).merged()
    if not count and unknown:
        raise KbbError(f"{path}: none of its functions are in this vmlinux (a profile for "
                       "another kernel?)")
    return Profile(src=np.array(src, dtype=np.uint64), dst=np.array(dst, dtype=np.uint64),
                   count=np.array(count, dtype=np.int64), source="fdata").merged()


def write_fdata(profile: Profile, model, path) -> int:
    """Write ``profile`` as .fdata for this vmlinux (taken branches and the
    fall-throughs between blocks); returns the number of lines."""
    from kbuild_bolt.binary.cfg import FALLTHROUGH, build_cfg
    from kbuild_bolt.profile.attach import attach

    cfg = build_cfg(model)
    cp = attach(model, profile)
    functions = model.functions
    insns = model.insns
    lines = []

    def loc(addr: int) -> str | None:
        row = functions.find(addr)
        if row < 0:
            return None
        return f"1 {functions.names[row]} {addr - int(functions.start[row]):x}"

    # Taken transfers between (or into) functions, as the profile saw them.
    taken = {}
    for s, d, c in zip(cp.taken_src.tolist(), cp.taken_dst.tolist(), cp.taken_count.tolist()):
        key = (int(insns.addr[s]), int(d))
        taken[key] = taken.get(key, 0) + c
    # Calls and returns are transfers too (entry counts, call graph).
    src = model.insn_index(profile.src)
    ok = src >= 0
    for s, d, c in zip(src[ok].tolist(), profile.dst[ok].tolist(), profile.count[ok].tolist()):
        if int(insns.flow[s]) in (5, 6, 4):  # call, indirect call, ret
            key = (int(insns.addr[s]), int(d))
            taken[key] = taken.get(key, 0) + c
    for (s, d), c in sorted(taken.items()):
        a, b = loc(s), loc(d)
        if a and b and c > 0:
            lines.append(f"{a} {b} 0 {c}")
    # Fall-throughs between consecutive blocks: last instruction -> next block.
    ft = np.flatnonzero(cfg.edge_kind == FALLTHROUGH)
    for k in ft.tolist():
        b_src, b_dst = int(cfg.edge_src[k]), int(cfg.edge_dst[k])
        last = int(cfg.block_end[b_src]) - 1
        ran = int(cp.insn_count[last])
        if ran <= 0:
            continue
        out_taken = taken.get((int(insns.addr[last]),
                               int(insns.ref[last])), 0) if insns.ref_kind[last] == 1 else 0
        w = ran - out_taken
        if w <= 0:
            continue
        a, b = loc(int(insns.addr[last])), loc(int(insns.addr[cfg.block_first[b_dst]]))
        if a and b:
            lines.append(f"{a} {b} 0 {w}")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return len(lines)
