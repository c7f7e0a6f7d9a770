"""Stale profiles: a profile of one build applied to the next.

A profile records, for each function it saw, a hash of the function's code
and of each of its blocks, with addresses and PC-relative or relocated fields
masked out (so a function that only moved hashes the same). Applied to a
rebuilt kernel:

- a function with the same hash keeps all its counts, moved by how far the
  function moved;
- a changed function is matched block by block: the longest run-preserving
  match of the old and new block hash sequences (so a block whose code occurs
  several times matches the one in the same place). Its counts are applied
  only when the match is confident: the matched blocks held at least
  ``MIN_MATCHED_SHARE`` of the function's executed bytes, its entry matched,
  and no block the profile saw run leads, in the new code, to a block that did
  not match (code added on a hot path, whose count nobody knows: laid out as
  cold it costs a taken jump each time; applying whatever matched made a
  kernel run 14% more taken jumps than with no profile at all). Otherwise the
  function keeps the compiler's layout: its counts are dropped;
- everything else is dropped, and the report says how much was used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np

from kbuild_bolt.arrays import concat_ranges, isin
from kbuild_bolt.elf.notes import build_id
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import Profile
from kbuild_bolt.profile.shapes import FunctionShape

# A changed function's counts are applied when its matched blocks held at least
# this share of the bytes the profile executed in it (measured with
# benchmarks/bench_stale.py: see benchmarks/RESULTS.md).
MIN_MATCHED_SHARE = 0.95


def _masked(model, start: int, end: int, lo_insn: int, hi_insn: int) -> np.ndarray:
    """Bytes [start, end) with the PC-relative fields of instructions [lo, hi)
    and the 4 bytes from each relocation in the range (fewer at its end) zeroed."""
    buf = np.frombuffer(model.image.read(start, end - start), np.uint8).copy()
    insns = model.insns
    has = np.flatnonzero(insns.field_size[lo_insn:hi_insn] > 0) + lo_insn
    spots = concat_ranges((insns.addr[has] - np.uint64(start)).astype(np.int64)
                          + insns.field_off[has], insns.field_size[has])
    buf[spots[spots < len(buf)]] = 0
    rel = model.code_relocations
    a, b = np.searchsorted(rel.offset, np.array([start, end], np.uint64))
    spots = concat_ranges((rel.offset[a:b] - np.uint64(start)).astype(np.int64),
                          np.full(b - a, 4))
    buf[spots[spots < len(buf)]] = 0
    return buf


def _masked_section(model, section) -> np.ndarray:
    """A code section, masked (made once per model, in one pass: shapes are
    asked for thousands of functions; :func:`_drop_masked` frees them after)."""
    cache = model.__dict__.setdefault("_masked_sections", {})
    if section.index not in cache:
        lo, hi = np.searchsorted(model.insns.addr,
                                 np.array([section.addr, section.end], np.uint64)).tolist()
        cache[section.index] = _masked(model, section.addr, section.end, lo, hi)
    return cache[section.index]


def _drop_masked(model) -> None:
    model.__dict__.pop("_masked_sections", None)


def _masked_code(model, lo_insn: int, hi_insn: int) -> tuple[bytes, np.ndarray]:
    """Bytes of instructions [lo, hi) with PC-relative and relocated fields zeroed,
    and each instruction's offset into them."""
    insns = model.insns
    start = int(insns.addr[lo_insn])
    end = int(insns.end_of(hi_insn - 1))
    offs = (insns.addr[lo_insn:hi_insn] - np.uint64(start)).astype(np.int64)
    section = model.image.section_at(start)
    rel = model.code_relocations
    near = np.searchsorted(rel.offset, np.array([max(start - 3, 0), start], np.uint64))
    if (section is None or not section.has_bits or end > section.end
            or near[1] > near[0]                  # a field before it reaching into it
            or (lo_insn > 0 and int(insns.end_of(lo_insn - 1)) > start)
            or (hi_insn < len(insns) and int(insns.addr[hi_insn]) < end)):  # overlaps
        # (masked from its own instructions and relocations alone)
        return _masked(model, start, end, lo_insn, hi_insn).tobytes(), offs
    at = start - section.addr
    return _masked_section(model, section)[at:at + end - start].tobytes(), offs


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def function_shape(model, cfg, row: int, blocks: bool = True) -> FunctionShape:
    """The shape of function ``row``; ``blocks=False``: its whole hash alone
    (the blocks' hashes are only needed for a function whose code changed)."""
    functions = model.functions
    start = int(functions.start[row])
    block_range = cfg.blocks_of(row)
    if not len(block_range):
        return FunctionShape(functions.names[row], start, 0, 0)
    lo, hi = int(cfg.block_first[block_range.start]), int(cfg.block_end[block_range.stop - 1])
    code, offs = _masked_code(model, lo, hi)
    shape = FunctionShape(functions.names[row], start, len(code), _digest(code))
    if not blocks:
        return shape
    # Each block's bytes: from its first instruction's offset to the next's
    # (the code's end after the last instruction).
    offs = np.append(offs, len(code))
    o0 = offs[cfg.block_first[block_range] - lo].tolist()
    o1 = offs[cfg.block_end[block_range] - lo].tolist()
    shape.blocks.extend((a, b - a, _digest(code[a:b])) for a, b in zip(o0, o1))
    return shape


def build_id_of(model) -> str:
    """The GNU build-id of ``model``'s vmlinux, in hex ("" when it has none)."""
    note = build_id(model.image)
    return note.hex() if note is not None else ""


def describe_build(profile: Profile, model, cfg) -> None:
    """Give ``profile`` what applies it to other builds of the kernel in
    ``model``, where it was recorded: its functions' shapes, and the build-id
    that says which build they describe."""
    profile.shapes = shapes_for(model, cfg, profile)
    profile.build_id = build_id_of(model)


def shapes_for(model, cfg, profile: Profile) -> dict[str, FunctionShape]:
    """Shapes of the functions a profile touches (what it stores for later)."""
    rows = set(model.functions.rows_containing(profile.range_start).tolist())
    rows |= set(model.functions.rows_containing(profile.src).tolist())
    rows.discard(-1)
    shapes = {}
    try:
        for r in sorted(rows):
            shape = function_shape(model, cfg, r)
            shapes[f"{shape.name}@{shape.start:x}"] = shape  # static functions share names
    finally:
        _drop_masked(model)
    return shapes


@dataclass
class AdaptReport:
    total: int = 0
    exact: int = 0
    fuzzy: int = 0
    functions_same: int = 0
    functions_changed: int = 0
    functions_missing: int = 0
    # Changed functions left as the compiler laid them out (match not confident):
    # reason -> names.
    functions_unsure: dict = field(default_factory=dict)

    @property
    def used(self) -> float:
        return (self.exact + self.fuzzy) / self.total if self.total else 1.0

    @property
    def unsure(self) -> int:
        return sum(len(names) for names in self.functions_unsure.values())

    def summary(self) -> str:
        return (f"profile: {100 * self.used:.1f}% of its counts used "
                f"({self.functions_same} functions unchanged, {self.functions_changed} changed "
                f"and matched by blocks, {self.unsure} changed and left as compiled, "
                f"{self.functions_missing} gone)")

    def details(self) -> list[str]:
        """The changed functions left as compiled, by reason (a line each)."""
        return [f"left as compiled: {reason}: {len(names):,} e.g. {', '.join(sorted(names)[:3])}"
                for reason, names in sorted(self.functions_unsure.items(),
                                            key=lambda kv: -len(kv[1]))]


def _executed_bytes(profile: Profile):
    """``weights(start, blocks)``: the bytes the profile's ranges executed in each
    block (offset, size, ...) of a function at ``start``, every range spread over
    the blocks it runs through (a block entered by falling into it ran too)."""
    order = np.argsort(profile.range_start, kind="stable")
    starts = profile.range_start[order]
    ends = profile.range_last[order] + np.uint64(1)
    counts = profile.range_count[order]

    def weights(start: int, blocks) -> list[int]:
        if not blocks:
            return []
        lo = np.array([off for off, _size, _h in blocks], np.int64)
        hi = lo + np.array([size for _off, size, _h in blocks], np.int64)
        a, b = np.searchsorted(starts, np.array([start, start + int(hi.max())], np.uint64))
        if a == b:
            return [0] * len(blocks)
        s = (starts[a:b] - np.uint64(start)).astype(np.int64)[:, None]
        e = (ends[a:b] - np.uint64(start)).astype(np.int64)[:, None]
        overlap = np.clip(np.minimum(e, hi[None, :]) - np.maximum(s, lo[None, :]), 0, None)
        return (overlap * counts[a:b, None]).sum(axis=0).tolist()
    return weights


def match_blocks(old: FunctionShape, new: FunctionShape) -> list[tuple[int, int]]:
    """(old block, new block) pairs of equal code, in the order of both."""
    matcher = SequenceMatcher(None, [h for _o, _s, h in old.blocks],
                              [h for _o, _s, h in new.blocks], autojunk=False)
    return [(i + k, j + k) for i, j, n in matcher.get_matching_blocks() for k in range(n)]


def unsure_reason(old: FunctionShape, new: FunctionShape, pairs, old_weight, successors):
    """Why a changed function's matched counts cannot be trusted, or None.
    ``old_weight[i]``: bytes executed in old block i; ``successors(k)``: the new
    blocks that new block k leads to."""
    total = sum(old_weight)
    if total == 0:
        return None
    matched = sum(old_weight[i] for i, _ in pairs)
    if matched < MIN_MATCHED_SHARE * total:
        return f"under {100 * MIN_MATCHED_SHARE:.0f}% of its executed code matched"
    new_of = dict(pairs)
    matched_new = set(new_of.values())
    if old_weight[0] > 0 and new_of.get(0) != 0:
        return "its entry changed"
    for i, k in pairs:
        if old_weight[i] > 0 and any(s not in matched_new for s in successors(k)):
            return "new code on a path that ran"
    return None


def adapt(profile: Profile, model, cfg, shapes: dict[str, FunctionShape]) -> tuple[Profile, AdaptReport]:
    """Move ``profile`` (with its recorded ``shapes``) onto the kernel in ``model``."""
    try:
        return _adapt(profile, model, cfg, shapes)
    finally:
        _drop_masked(model)


def _adapt(profile: Profile, model, cfg, shapes: dict[str, FunctionShape]) -> tuple[Profile, AdaptReport]:
    report = AdaptReport(total=int(profile.range_count.sum()))
    # Recorded on this very build: each function is where its shape says, with
    # the same code (no hash to work out again: most of the time of adapting).
    same_build = bool(profile.build_id) and profile.build_id == build_id_of(model)
    starts, names = model.functions.start, model.functions.names

    def row_at(old):
        row = int(np.searchsorted(starts, np.uint64(old.start)))
        return row if row < len(starts) and int(starts[row]) == old.start \
            and names[row] == old.name else -1

    old_lo, old_hi, deltas_delta = [], [], []
    # Piecewise map: old address interval -> delta.
    rows_by_name: dict[str, list[int]] = {}
    for i, n in enumerate(model.functions.names):
        rows_by_name.setdefault(n, []).append(i)
    new_shapes = {}

    def shape_of(row, blocks=False):
        # (whole hashes first: most functions of a profile are unchanged)
        shape = new_shapes.get(row)
        if shape is None or (blocks and shape.size and not shape.blocks):
            shape = new_shapes[row] = function_shape(model, cfg, row, blocks)
        return shape

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

    weights = _executed_bytes(profile)
    matched_rows = {}
    identical = set()       # (start addresses of the functions with unchanged code)
    for name, old in shapes.items():  # (keys: name@address)
        row = row_at(old) if same_build else -1
        if row < 0:
            row = best_row(old)
        if row < 0:
            report.functions_missing += 1
            continue
        matched_rows[name] = row
        if same_build and int(starts[row]) == old.start:
            new_start = old.start
        else:
            new = shape_of(row)
            new_start = new.start if new.hash == old.hash else None
        if new_start is not None:
            report.functions_same += 1
            identical.add(old.start)
            old_lo.append(old.start)
            old_hi.append(old.start + old.size)
            deltas_delta.append(new_start - old.start)
            continue
        new = shape_of(row, blocks=True)
        pairs = match_blocks(old, new)
        old_weight = weights(old.start, old.blocks)
        first = int(cfg.func_first_block[row])

        def successors(k, first=first, end=int(cfg.func_end_block[row])):
            return [d - first for d, _kind in cfg.successors(first + k) if first <= d < end]

        reason = unsure_reason(old, new, pairs, old_weight, successors)
        if reason is not None:
            report.functions_unsure.setdefault(reason, []).append(old.name)
            continue
        report.functions_changed += 1
        for i, k in pairs:
            off, size, _h = old.blocks[i]
            old_lo.append(old.start + off)
            old_hi.append(old.start + off + size)
            deltas_delta.append(new.start + new.blocks[k][0] - (old.start + off))
    if not matched_rows and shapes:
        raise KbbError("the profile does not match this kernel: none of its functions are here")
    if not old_lo:
        # Every function changed beyond a confident match: nothing applies, and
        # the kernel keeps the compiler's layout (a correct, unoptimized output).
        out = Profile(kernel=profile.kernel, source=profile.source, sampled=profile.sampled)
        out.used = 0.0
        out.applied = report.summary()
        return out, report
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
    from_same = isin(lo[i_s], np.array(sorted(identical), dtype=np.uint64).view(np.int64)) \
        if identical else np.zeros(len(keep), bool)
    report.exact = int(profile.range_count[keep & from_same].sum())
    report.fuzzy = int(profile.range_count[keep & ~from_same].sum())
    out = out.merged()
    out.used = report.used
    out.applied = report.summary()
    return out, report
