""".debug_frame: the call-frame information gdb, drgn and systemtap unwind with.

Each FDE's program is run to a table of rows (address, rule state); code that
moved gets new FDEs, one per run of new code of one FDE (a function's hot part,
its cold part), whose programs set at each new address the state the old address
had. CIEs and the FDEs of code that stayed are kept byte for byte (CIE pointers
renumbered: the section is written again, CIEs first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.dwarf.image import INHERIT, LINEAR, CodeImage
from kbuild_bolt.dwarf.leb import DwarfError, enc_sleb, enc_uleb, sleb, u16, u32, u64, uleb, unit_length

CIE_ID = 0xFFFFFFFF

# call frame instructions
ADVANCE_LOC, OFFSET, RESTORE = 0x40, 0x80, 0xC0
NOP, SET_LOC, ADVANCE_LOC1, ADVANCE_LOC2, ADVANCE_LOC4 = 0x00, 0x01, 0x02, 0x03, 0x04
OFFSET_EXTENDED, RESTORE_EXTENDED, UNDEFINED, SAME_VALUE, REGISTER = 0x05, 0x06, 0x07, 0x08, 0x09
REMEMBER_STATE, RESTORE_STATE, DEF_CFA, DEF_CFA_REGISTER, DEF_CFA_OFFSET = 0x0a, 0x0b, 0x0c, 0x0d, 0x0e
DEF_CFA_EXPRESSION, EXPRESSION, OFFSET_EXTENDED_SF, DEF_CFA_SF, DEF_CFA_OFFSET_SF = 0x0f, 0x10, 0x11, 0x12, 0x13
VAL_OFFSET, VAL_OFFSET_SF, VAL_EXPRESSION, GNU_ARGS_SIZE = 0x14, 0x15, 0x16, 0x2e

# register rules: ("u",) undefined, ("s",) same value, ("o", n) at CFA+n, ("v", n)
# value CFA+n, ("r", reg) in reg, ("e", bytes) at expression, ("ve", bytes) value of
# expression. CFA: ("c", reg, offset) or ("x", bytes).


@dataclass
class Cie:
    offset: int
    end: int
    code_align: int
    data_align: int
    ra: int
    initial: tuple          # (cfa, rules) after the initial instructions


def _parse_cie(b, p: int, end: int, q: int) -> Cie:
    version = b[q]
    q += 1
    aug_end = b.index(0, q)
    aug = bytes(b[q:aug_end])
    q = aug_end + 1
    if aug not in (b"",):
        raise DwarfError(f".debug_frame CIE at {p:#x}: augmentation {aug!r} is not supported")
    if version >= 4:
        if b[q] != 8:
            raise DwarfError(f".debug_frame CIE at {p:#x}: address size {b[q]}, not 8")
        q += 2
    code_align, q = uleb(b, q)
    data_align, q = sleb(b, q)
    if version == 1:
        ra = b[q]
        q += 1
    else:
        ra, q = uleb(b, q)
    cie = Cie(p, end, code_align, data_align, ra, ((("c", 7, 8)), ()))
    rows = run(b, q, end, cie, 0, None)
    cie.initial = rows[-1][1] if rows else (None, ())
    return cie


def run(b, p: int, end: int, cie: Cie, loc: int, initial) -> list[tuple[int, tuple]]:
    """The rows of a CFA program: [(address, (cfa, rules))], a row wherever the
    state may change. ``initial``: the CIE's state (None: running the CIE)."""
    cfa, rules = (initial if initial is not None else (None, ()))
    rules = dict(rules)
    init_rules = dict(initial[1]) if initial is not None else {}
    stack = []
    rows = [(loc, (cfa, tuple(sorted(rules.items()))))]
    ca, da = cie.code_align, cie.data_align

    def row():
        state = (cfa, tuple(sorted(rules.items())))
        if rows and rows[-1][0] == loc:
            rows[-1] = (loc, state)
        else:
            rows.append((loc, state))

    while p < end:
        op = b[p]
        p += 1
        hi, lo = op & 0xC0, op & 0x3F
        if hi == ADVANCE_LOC:
            loc += lo * ca
            continue
        if hi == OFFSET:
            v, p = uleb(b, p)
            rules[lo] = ("o", v * da)
        elif hi == RESTORE:
            _restore(rules, init_rules, lo)
        elif op == NOP:
            continue
        elif op == ADVANCE_LOC1:
            loc += b[p] * ca
            p += 1
            continue
        elif op == ADVANCE_LOC2:
            loc += u16(b, p) * ca
            p += 2
            continue
        elif op == ADVANCE_LOC4:
            loc += u32(b, p) * ca
            p += 4
            continue
        elif op == SET_LOC:
            loc = u64(b, p)
            p += 8
            continue
        elif op in (OFFSET_EXTENDED, VAL_OFFSET):
            r, p = uleb(b, p)
            v, p = uleb(b, p)
            rules[r] = ("o" if op == OFFSET_EXTENDED else "v", v * da)
        elif op in (OFFSET_EXTENDED_SF, VAL_OFFSET_SF):
            r, p = uleb(b, p)
            v, p = sleb(b, p)
            rules[r] = ("o" if op == OFFSET_EXTENDED_SF else "v", v * da)
        elif op == RESTORE_EXTENDED:
            r, p = uleb(b, p)
            _restore(rules, init_rules, r)
        elif op == UNDEFINED:
            r, p = uleb(b, p)
            rules[r] = ("u",)
        elif op == SAME_VALUE:
            r, p = uleb(b, p)
            rules[r] = ("s",)
        elif op == REGISTER:
            r, p = uleb(b, p)
            r2, p = uleb(b, p)
            rules[r] = ("r", r2)
        elif op == REMEMBER_STATE:
            stack.append((cfa, dict(rules)))
        elif op == RESTORE_STATE:
            if not stack:
                raise DwarfError(".debug_frame: DW_CFA_restore_state without a remembered state")
            saved_cfa, saved = stack.pop()
            # (the CFA rule is not part of the remembered state in DWARF, but GCC
            # and every unwinder treat it as if it were)
            cfa, rules = saved_cfa, saved
        elif op in (DEF_CFA, DEF_CFA_SF):
            r, p = uleb(b, p)
            if op == DEF_CFA:
                v, p = uleb(b, p)
            else:
                v, p = sleb(b, p)
                v *= da
            cfa = ("c", r, v)
        elif op == DEF_CFA_REGISTER:
            r, p = uleb(b, p)
            cfa = ("c", r, cfa[2] if cfa and cfa[0] == "c" else 0)
        elif op in (DEF_CFA_OFFSET, DEF_CFA_OFFSET_SF):
            if op == DEF_CFA_OFFSET:
                v, p = uleb(b, p)
            else:
                v, p = sleb(b, p)
                v *= da
            cfa = ("c", cfa[1] if cfa and cfa[0] == "c" else 7, v)
        elif op == DEF_CFA_EXPRESSION:
            n, p = uleb(b, p)
            cfa = ("x", bytes(b[p:p + n]))
            p += n
        elif op in (EXPRESSION, VAL_EXPRESSION):
            r, p = uleb(b, p)
            n, p = uleb(b, p)
            rules[r] = ("e" if op == EXPRESSION else "ve", bytes(b[p:p + n]))
            p += n
        elif op == GNU_ARGS_SIZE:
            _, p = uleb(b, p)
            continue
        else:
            raise DwarfError(f".debug_frame: call frame instruction {op:#x} is not supported")
        row()
    return rows


def _restore(rules, init_rules, r) -> None:
    if r in init_rules:
        rules[r] = init_rules[r]
    else:
        rules.pop(r, None)


def encode_state_change(prev, cur, cie: Cie, out: bytearray) -> None:
    """Instructions that turn state ``prev`` into ``cur``."""
    pcfa, prules = prev
    ccfa, crules = cur
    if ccfa != pcfa:
        if ccfa[0] == "x":
            out.append(DEF_CFA_EXPRESSION)
            out += enc_uleb(len(ccfa[1])) + ccfa[1]
        elif pcfa and pcfa[0] == "c" and pcfa[1] == ccfa[1] and ccfa[2] >= 0:
            out.append(DEF_CFA_OFFSET)
            out += enc_uleb(ccfa[2])
        elif pcfa and pcfa[0] == "c" and pcfa[2] == ccfa[2]:
            out.append(DEF_CFA_REGISTER)
            out += enc_uleb(ccfa[1])
        elif ccfa[2] >= 0:
            out.append(DEF_CFA)
            out += enc_uleb(ccfa[1]) + enc_uleb(ccfa[2])
        else:
            out.append(DEF_CFA_SF)
            out += enc_uleb(ccfa[1]) + enc_sleb(ccfa[2] // cie.data_align)
    pd, cd = dict(prules), dict(crules)
    init = dict(cie.initial[1])
    for r in sorted(set(pd) | set(cd)):
        rule = cd.get(r)
        if rule == pd.get(r):
            continue
        if rule == init.get(r):
            # back to the CIE's rule, or to none (as GCC writes it: DW_CFA_restore
            # of a register the CIE has no rule for)
            if r < 64:
                out.append(RESTORE | r)
            else:
                out.append(RESTORE_EXTENDED)
                out += enc_uleb(r)
            continue
        kind = rule[0]
        if kind in ("o", "v"):
            n, rem = divmod(rule[1], cie.data_align)
            if rem:
                raise DwarfError(".debug_frame: an offset the data alignment factor does not divide")
            if kind == "o" and n >= 0 and r < 64:
                out.append(OFFSET | r)
                out += enc_uleb(n)
            else:
                out.append(OFFSET_EXTENDED_SF if kind == "o" else VAL_OFFSET_SF)
                out += enc_uleb(r) + enc_sleb(n)
        elif kind == "u":
            out.append(UNDEFINED)
            out += enc_uleb(r)
        elif kind == "s":
            out.append(SAME_VALUE)
            out += enc_uleb(r)
        elif kind == "r":
            out.append(REGISTER)
            out += enc_uleb(r) + enc_uleb(rule[1])
        else:
            out.append(EXPRESSION if kind == "e" else VAL_EXPRESSION)
            out += enc_uleb(r) + enc_uleb(len(rule[1])) + rule[1]


def _advance(delta: int, out: bytearray) -> None:
    if delta < 0x40:
        out.append(ADVANCE_LOC | delta)
    elif delta < 0x100:
        out += bytes((ADVANCE_LOC1, delta))
    elif delta < 0x10000:
        out.append(ADVANCE_LOC2)
        out += delta.to_bytes(2, "little")
    else:
        out.append(ADVANCE_LOC4)
        out += delta.to_bytes(4, "little")


def records(b) -> list[tuple[int, int, int, int, int, int]]:
    """(offset, end, CIE pointer (-1: a CIE, -2: padding), initial location, range,
    program start) per record."""
    out = []
    p = 0
    while p < len(b):
        if p + 4 <= len(b) and u32(b, p) == 0:
            out.append((p, p + 4, -2, 0, 0, p + 4))
            p += 4
            continue
        end, q = unit_length(b, p, ".debug_frame record")
        cie = u32(b, q)
        if cie == CIE_ID:
            out.append((p, end, -1, 0, 0, q + 4))
        else:
            if end < q + 20:
                raise DwarfError(f".debug_frame FDE at {p:#x} is too short")
            out.append((p, end, cie, u64(b, q + 4), u64(b, q + 12), q + 20))
        p = end
    return out


def update(b, image: CodeImage) -> tuple[bytes, dict]:
    recs = records(b)
    cies = {}
    for off, end, cie, _, _, prog in recs:
        if cie == -1:
            cies[off] = _parse_cie(b, off, end, prog)
    fde = [r for r in recs if r[2] >= 0]
    for r in fde:
        if r[2] not in cies:
            raise DwarfError(f".debug_frame FDE at {r[0]:#x} points at no CIE")
    lo = np.array([r[3] for r in fde], np.uint64)
    hi = lo + np.array([r[4] for r in fde], np.uint64)
    # (rows are per address: code rewritten in place, over the same range, needs a
    # new FDE too, so "the same" means touching no rewritten code at all)
    same = ~image.overlaps(lo, hi) | (lo == hi)
    moved = np.flatnonzero(~same)
    stats = {"FDEs kept": int(same.sum()), "FDEs written": 0}
    if not len(moved):
        return bytes(b), stats
    new_fdes = _new_fdes(b, [fde[k] for k in moved.tolist()], cies, image)
    stats["FDEs written"] = len(new_fdes)
    # the section again: CIEs, FDEs of code that stayed, new FDEs
    out = bytearray()
    cie_off = {}
    for off, cie in cies.items():
        cie_off[off] = len(out)
        out += b[off:cie.end]
    keep = np.flatnonzero(same).tolist()
    for k in keep:
        off, end, cie, _, _, _ = fde[k]
        rec = bytearray(b[off:end])
        rec[4:8] = cie_off[cie].to_bytes(4, "little")
        out += rec
    for cie, start, length, program in new_fdes:
        body = cie_off[cie].to_bytes(4, "little") + start.to_bytes(8, "little") + \
            length.to_bytes(8, "little") + program
        body += bytes((-(len(body) + 4)) % 8)        # DW_CFA_nop padding
        out += len(body).to_bytes(4, "little") + body
    return bytes(out), stats


def _new_fdes(b, moved_fdes, cies, image: CodeImage) -> list[tuple[int, int, int, bytes]]:
    """(CIE offset, start, length, program) of the FDEs for moved code: each moved
    FDE's rows by old address, the pieces of new code looking them up in bulk, a
    new FDE per run of new code of one FDE, its program the changes of state."""
    moved_fdes = sorted(moved_fdes, key=lambda r: r[3])
    f_lo = np.array([r[3] for r in moved_fdes], np.uint64)
    f_hi = f_lo + np.array([r[4] for r in moved_fdes], np.uint64)
    # every row of every moved FDE, states interned
    state_ids: dict = {}
    states: list = []
    r_addr, r_state = [], []
    for off, end, cie, loc, _, prog in moved_fdes:
        c = cies[cie]
        for a, st in run(b, prog, end, c, loc, c.initial):
            sid = state_ids.get(st)
            if sid is None:
                sid = state_ids[st] = len(states)
                states.append(st)
            r_addr.append(a)
            r_state.append(sid)
    r_addr = np.array(r_addr, np.uint64)
    r_state = np.array(r_state, np.int64)
    # pieces of new code and the FDE their old code is in
    n = len(image.new_lo)
    kk = np.searchsorted(f_hi, image.old_lo, side="right")
    fde = np.where((kk < len(f_lo)) & (f_lo[np.minimum(kk, len(f_lo) - 1)] <= image.old_lo)
                   & (image.kind != INHERIT), kk, -1)
    # an added jump belongs to the piece before it (same part)
    inh = np.flatnonzero(image.kind == INHERIT)
    prev_ok = inh[(inh > 0)]
    prev_ok = prev_ok[image.part[prev_ok - 1] == image.part[prev_ok]]
    fde[prev_ok] = fde[prev_ok - 1]
    ends = image.new_lo + image.size.astype(np.uint64)
    in_fde = fde >= 0
    # a new FDE starts where the FDE, the part or the contiguity changes
    brk = np.ones(n, bool)
    if n > 1:
        brk[1:] = ((fde[1:] != fde[:-1]) | (image.part[1:] != image.part[:-1])
                   | (image.new_lo[1:] != ends[:-1]))
    seg = np.cumsum(brk) - 1
    real = np.flatnonzero(in_fde & (image.kind != INHERIT))
    o = image.old_lo[real]
    lo = np.searchsorted(r_addr, o, side="right") - 1
    hi = np.where(image.kind[real] == LINEAR,
                  np.searchsorted(r_addr, o + image.old_len[real].astype(np.uint64), side="left"),
                  lo + 1)
    per = np.maximum(hi - lo, 1)
    ev_piece = np.repeat(real, per)
    k = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    row = np.repeat(lo, per) + k
    ev_addr = np.where(k == 0, image.new_lo[ev_piece],
                       image.new_lo[ev_piece] + (r_addr[row] - np.repeat(o, per)))
    ev_state = r_state[row]
    ev_seg = seg[ev_piece]
    # segments: start, end, FDE
    seg_first = np.flatnonzero(brk)
    seg_fde = fde[seg_first]
    seg_start = image.new_lo[seg_first]
    seg_end = np.maximum.reduceat(ends, seg_first) if n else ends
    # per event: the state before it (the CIE's at a segment's start); keep the
    # last event at an address, and only changes
    last_at = np.r_[(ev_seg[1:] != ev_seg[:-1]) | (ev_addr[1:] != ev_addr[:-1]), True]
    ev_addr, ev_state, ev_seg = ev_addr[last_at], ev_state[last_at], ev_seg[last_at]
    cie_of_seg = np.array([moved_fdes[f][2] if f >= 0 else -1 for f in seg_fde.tolist()], np.int64)
    init_ids = {}
    for cie in set(cie_of_seg.tolist()) - {-1}:
        st = cies[cie].initial
        sid = state_ids.get(st)
        if sid is None:
            sid = state_ids[st] = len(states)
            states.append(st)
        init_ids[cie] = sid
    first_ev = np.r_[True, ev_seg[1:] != ev_seg[:-1]]
    seg_init = np.array([init_ids.get(c, -1) for c in cie_of_seg.tolist()], np.int64)
    prev_state = np.empty_like(ev_state)
    prev_state[1:] = ev_state[:-1]
    prev_state[first_ev] = seg_init[ev_seg[first_ev]]
    keep = ev_state != prev_state
    prev_addr = np.empty_like(ev_addr)
    prev_addr[1:] = ev_addr[:-1]
    prev_addr[first_ev] = seg_start[ev_seg[first_ev]]
    # (the state before a kept event is the last kept one's: drop the others first)
    ev_addr, ev_state, ev_seg, prev_state = (ev_addr[keep], ev_state[keep], ev_seg[keep],
                                            prev_state[keep])
    first_ev = np.r_[True, ev_seg[1:] != ev_seg[:-1]] if len(ev_seg) else first_ev[:0]
    prev_addr = np.empty_like(ev_addr)
    prev_addr[1:] = ev_addr[:-1]
    prev_addr[first_ev] = seg_start[ev_seg[first_ev]]
    delta = (ev_addr - prev_addr).astype(np.int64)
    # programs: (advance, change) per event, each distinct one encoded once
    pair = prev_state * len(states) + ev_state
    adv_cache: dict[int, bytes] = {}
    change_cache: dict[int, bytes] = {}
    chunks = []
    cie_l = cie_of_seg.tolist()
    for d, pr, cur, sg in zip(delta.tolist(), pair.tolist(), ev_state.tolist(), ev_seg.tolist()):
        a = adv_cache.get(d)
        if a is None:
            buf = bytearray()
            if d:
                _advance(d, buf)
            a = adv_cache[d] = bytes(buf)
        c = change_cache.get(pr)
        if c is None:
            buf = bytearray()
            encode_state_change(states[pr // len(states)], states[cur], cies[cie_l[sg]], buf)
            c = change_cache[pr] = bytes(buf)
        chunks.append(a + c)
    # join per segment
    bounds = np.searchsorted(ev_seg, np.arange(len(seg_first) + 1))
    out = []
    for sgi, (x, y) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if seg_fde[sgi] < 0:
            continue
        out.append((cie_l[sgi], int(seg_start[sgi]), int(seg_end[sgi] - seg_start[sgi]),
                    b"".join(chunks[x:y])))
    return out
