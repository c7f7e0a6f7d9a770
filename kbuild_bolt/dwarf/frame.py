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
    """(CIE offset, start, length, program) of the FDEs for moved code."""
    # rows of every moved FDE, by old address
    f_lo = np.array([r[3] for r in moved_fdes], np.uint64)
    f_hi = f_lo + np.array([r[4] for r in moved_fdes], np.uint64)
    order = np.argsort(f_lo, kind="stable")
    f_lo, f_hi = f_lo[order], f_hi[order]
    moved_fdes = [moved_fdes[k] for k in order.tolist()]
    tables = [None] * len(moved_fdes)

    def table(k):
        if tables[k] is None:
            off, end, cie, loc, _, prog = moved_fdes[k]
            c = cies[cie]
            rows = run(b, prog, end, c, loc, c.initial)
            tables[k] = ([a for a, _ in rows], [s for _, s in rows])
        return tables[k]

    out = []
    cur = None          # (fde index, cie, start, prev addr, prev state, program)
    n = len(image.new_lo)
    kinds = image.kind.tolist()
    new_lo = image.new_lo.tolist()
    size = image.size.tolist()
    old_lo = image.old_lo.tolist()
    old_len = image.old_len.tolist()
    part = image.part.tolist()
    import bisect

    def close():
        if cur is not None:
            k, cie, start, _, _, prog, end = cur
            out.append((cie, start, end - start, bytes(prog)))

    # the FDE each piece's old code is in (-1: none)
    kk = np.searchsorted(f_hi, image.old_lo, side="right")
    in_fde = (kk < len(f_lo)) & (f_lo[np.minimum(kk, len(f_lo) - 1)] <= image.old_lo)
    fde_of = np.where(in_fde & (image.kind != INHERIT), kk, -1).tolist()
    for i in range(n):
        if kinds[i] == INHERIT:
            if cur is not None and part[i] == part[i - 1]:
                cur[6] = new_lo[i] + size[i]
            continue
        o = old_lo[i]
        k = fde_of[i]
        if k < 0:
            close()
            cur = None
            continue
        starts_new = (cur is None or cur[0] != k or part[i] != part[i - 1]
                      or new_lo[i] != cur[6])
        if starts_new:
            close()
            cie = moved_fdes[k][2]
            c = cies[cie]
            cur = [k, cie, new_lo[i], new_lo[i], c.initial, bytearray(), new_lo[i]]
        addrs, states = table(k)
        c = cies[cur[1]]
        j = bisect.bisect_right(addrs, o) - 1
        events = [(new_lo[i], states[max(j, 0)])]
        if kinds[i] == LINEAR:
            j += 1
            while j < len(addrs) and addrs[j] < o + old_len[i]:
                events.append((new_lo[i] + (addrs[j] - o), states[j]))
                j += 1
        prog = cur[5]
        for at, state in events:
            if state == cur[4]:
                continue
            if at > cur[3]:
                _advance(at - cur[3], prog)
                cur[3] = at
            encode_state_change(cur[4], state, c, prog)
            cur[4] = state
        cur[6] = new_lo[i] + size[i]
    close()
    return out
