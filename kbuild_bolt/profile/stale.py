"""Stale profiles: a profile of one build applied to the next.

A profile records, for each function it saw, a hash of the function's code
and of each of its blocks, with addresses and PC-relative or relocated fields
masked out (so a function that only moved hashes the same). Applied to a
rebuilt kernel:

- a function with the same hash keeps all its counts, moved by how far the
  function moved;
- a changed function keeps the counts of the blocks whose hash still occurs in
  it (the first unused match in order), each moved to its new place;
- everything else is dropped, and the report says how much was used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import Profile
from kbuild_bolt.profile.shapes import FunctionShape


def _masked_code(model, lo_insn: int, hi_insn: int) -> tuple[bytes, np.ndarray]:
    """Bytes of instructions [lo, hi) with PC-relative and relocated fields zeroed,
    and each instruction's offset into them."""
    insns = model.insns
    start = int(insns.addr[lo_insn])
    end = int(insns.end[hi_insn - 1])
    buf = bytearray(model.image.read(start, end - start))
    idx = np.arange(lo_insn, hi_insn)
    with_field = idx[insns.field_size[idx] > 0]
    for i in with_field.tolist():
        off = int(insns.addr[i]) - start + int(insns.field_off[i])
        buf[off:off + int(insns.field_size[i])] = b"\0" * int(insns.field_size[i])
    rel = model.code_relocations
    a = np.searchsorted(rel.offset, np.uint64(start))
    b = np.searchsorted(rel.offset, np.uint64(end))
    for off in rel.offset[a:b].tolist():
        o = off - start
        buf[o:o + 4] = b"\0" * min(4, end - off)
    return bytes(buf), (insns.addr[idx] - np.uint64(start)).astype(np.int64)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def function_shape(model, cfg, row: int) -> FunctionShape:
    functions = model.functions
    start = int(functions.start[row])
    blocks = list(cfg.blocks_of(row))
    if not blocks:
        return FunctionShape(functions.names[row], start, 0, 0)
    lo, hi = int(cfg.block_first[blocks[0]]), int(cfg.block_end[blocks[-1]])
    code, offs = _masked_code(model, lo, hi)
    shape = FunctionShape(functions.names[row], start, len(code), _digest(code))
    for b in blocks:
        i0, i1 = int(cfg.block_first[b]) - lo, int(cfg.block_end[b]) - lo
        o0 = int(offs[i0])
        o1 = int(offs[i1]) if i1 < len(offs) else len(code)
        shape.blocks.append((o0, o1 - o0, _digest(code[o0:o1])))
    return shape


def shapes_for(model, cfg, profile: Profile) -> dict[str, FunctionShape]:
    """Shapes of the functions a profile touches (what it stores for later)."""
    rows = set(model.functions.rows_containing(profile.range_start).tolist())
    rows |= set(model.functions.rows_containing(profile.src).tolist())
    rows.discard(-1)
    shapes = {}
    for r in sorted(rows):
        shape = function_shape(model, cfg, r)
        shapes[f"{shape.name}@{shape.start:x}"] = shape  # static functions share names
    return shapes


@dataclass
class AdaptReport:
    total: int = 0
    exact: int = 0
    fuzzy: int = 0
    functions_same: int = 0
    functions_changed: int = 0
    functions_missing: int = 0

    @property
    def used(self) -> float:
        return (self.exact + self.fuzzy) / self.total if self.total else 1.0

    def summary(self) -> str:
        return (f"profile: {100 * self.used:.1f}% of its counts used "
                f"({self.functions_same} functions unchanged, {self.functions_changed} changed "
                f"and matched by blocks, {self.functions_missing} gone)")


def adapt(profile: Profile, model, cfg, shapes: dict[str, FunctionShape]) -> tuple[Profile, AdaptReport]:
    """Move ``profile`` (with its recorded ``shapes``) onto the kernel in ``model``."""
    report = AdaptReport(total=int(profile.range_count.sum()))
    old_lo, old_hi, deltas_delta = [], [], []
    # Piecewise map: old address interval -> delta.
    rows_by_name: dict[str, list[int]] = {}
    for i, n in enumerate(model.functions.names):
        rows_by_name.setdefault(n, []).append(i)
    new_shapes = {}

    def shape_of(row):
        if row not in new_shapes:
            new_shapes[row] = function_shape(model, cfg, row)
        return new_shapes[row]

    def best_row(old):
        rows = rows_by_name.get(old.name, [])
        if not rows:
            return -1
        if len(rows) == 1:
            return rows[0]
        # Static functions share names: the one with the same code, else the closest.
        same = [r for r in rows if shape_of(r).hash == old.hash]
        if same:
            return min(same, key=lambda r: abs(int(model.functions.start[r]) - old.start))
        return min(rows, key=lambda r: abs(shape_of(r).size - old.size))

    matched_rows = {}
    for name, old in shapes.items():  # (keys: name@address)
        row = best_row(old)
        if row < 0:
            report.functions_missing += 1
            continue
        matched_rows[name] = row
        new = shape_of(row)
        if new.hash == old.hash:
            report.functions_same += 1
            old_lo.append(old.start)
            old_hi.append(old.start + old.size)
            deltas_delta.append(new.start - old.start)
            continue
        report.functions_changed += 1
        used = set()
        by_hash: dict[int, list[int]] = {}
        for k, (_off, _size, h) in enumerate(new.blocks):
            by_hash.setdefault(h, []).append(k)
        for off, size, h in old.blocks:
            for k in by_hash.get(h, ()):
                if k not in used:
                    used.add(k)
                    old_lo.append(old.start + off)
                    old_hi.append(old.start + off + size)
                    deltas_delta.append(new.start + new.blocks[k][0] - (old.start + off))
                    break
    if not old_lo:
        raise KbbError("the profile does not match this kernel: none of its functions are here "
                       "with recognizable code")
    # Kernel addresses as int64 (negative): order and differences are preserved.
    lo = np.array(old_lo, dtype=np.uint64).view(np.int64)
    hi = np.array(old_hi, dtype=np.uint64).view(np.int64)
    order = np.argsort(lo)
    lo, hi = lo[order], hi[order]
    delta = np.array(deltas_delta, dtype=np.int64)[order]

    def mapped(addrs):
        a = addrs.view(np.int64)  # kernel addresses as negative int64, like lo/hi
        i = np.searchsorted(lo, a, side="right") - 1
        ok = i >= 0
        ok[ok] &= a[ok] < hi[i[ok]]
        return ok, np.where(ok, i, 0)

    ok_s, i_s = mapped(profile.range_start)
    ok_l, i_l = mapped(profile.range_last)
    keep = ok_s & ok_l & (i_s == i_l)
    shift = delta[i_s].view(np.uint64)
    out = Profile(kernel=profile.kernel, source=profile.source, sampled=profile.sampled)
    out.range_start = profile.range_start[keep] + shift[keep]
    out.range_last = profile.range_last[keep] + shift[keep]
    out.range_count = profile.range_count[keep]
    ok_src, i_src = mapped(profile.src)
    ok_dst, i_dst = mapped(profile.dst)
    keep_t = ok_src & ok_dst
    out.src = profile.src[keep_t] + delta[i_src].view(np.uint64)[keep_t]
    out.dst = profile.dst[keep_t] + delta[i_dst].view(np.uint64)[keep_t]
    out.count = profile.count[keep_t]
    # Which kept counts came from identical functions?
    same_ranges = set()
    for name, old in shapes.items():
        row = matched_rows.get(name, -1)
        if row >= 0 and shape_of(row).hash == old.hash:
            same_ranges.add(old.start)
    from_same = np.isin(lo[i_s], np.array(sorted(same_ranges), dtype=np.uint64).view(np.int64)) \
        if same_ranges else np.zeros(len(keep), bool)
    report.exact = int(profile.range_count[keep & from_same].sum())
    report.fuzzy = int(profile.range_count[keep & ~from_same].sum())
    out = out.merged()
    out.used = report.used
    return out, report
