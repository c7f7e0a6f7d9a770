"""Line programs (.debug_line, DWARF 4 and 5): decoded to rows, and new programs
for code that moved.

Every row is kept, rows that share an address included, in their order: GCC's
location views count the rows at one address, so the view numbers of
.debug_loclists stay right when the rows at an address move together. Where a
piece of moved code starts without a row of its own (a block that began in the
middle of a row's range), a copy of the row in effect there is added. A jump
added after a block takes that block's last row (no row of its own). A sequence
ends at the end of each part of new code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.dwarf.image import INHERIT, LINEAR, CodeImage
from kbuild_bolt.dwarf.leb import DwarfError, sleb, u16, u32, uleb, unit_length
from kbuild_bolt.dwarf.vec import put_le, put_sleb, put_uleb, sleb_size, uleb_size

IS_STMT, BASIC_BLOCK, PROLOGUE_END, EPILOGUE_BEGIN = 1, 2, 4, 8

# standard opcodes
COPY, ADVANCE_PC, ADVANCE_LINE, SET_FILE, SET_COLUMN, NEGATE_STMT = 1, 2, 3, 4, 5, 6
SET_BASIC_BLOCK, CONST_ADD_PC, FIXED_ADVANCE_PC, SET_PROLOGUE_END = 7, 8, 9, 10
SET_EPILOGUE_BEGIN, SET_ISA = 11, 12
# extended opcodes
END_SEQUENCE, SET_ADDRESS, DEFINE_FILE, SET_DISCRIMINATOR = 1, 2, 3, 4


@dataclass
class LineUnit:
    offset: int              # unit start in the section
    end: int
    prologue: bytes          # everything after unit_length up to the program
    default_is_stmt: int
    line_base: int
    line_range: int
    opcode_base: int
    addr: np.ndarray         # uint64 per row (end_sequence rows not included)
    file: np.ndarray         # uint32
    line: np.ndarray         # int64
    column: np.ndarray       # uint32
    flags: np.ndarray        # uint8
    isa: np.ndarray          # uint32
    disc: np.ndarray         # uint32
    seq: np.ndarray          # int32: sequence of each row
    seq_start: np.ndarray    # uint64 per sequence: address of its first row
    seq_end: np.ndarray      # uint64 per sequence: its end_sequence address
    seq_bytes: list          # (program offset, end offset) of each sequence, for verbatim copies
    program: bytes


def read_units(data) -> list[LineUnit]:
    units = []
    p = 0
    n = len(data)
    while p < n:
        units.append(_read_unit(data, p))
        p = units[-1].end
    return units


def _read_unit(b, start: int) -> LineUnit:
    end, p = unit_length(b, start, ".debug_line unit")
    version = u16(b, p)
    if version not in (2, 3, 4, 5):
        raise DwarfError(f".debug_line unit at {start:#x}: version {version} is not supported")
    q = p + 2
    if version >= 5:
        if b[q] != 8:
            raise DwarfError(f".debug_line unit at {start:#x}: address size {b[q]}, not 8")
        q += 2
    header_length = u32(b, q)
    q += 4
    program_start = q + header_length
    min_inst = b[q]
    q += 1
    if version >= 4:
        if b[q] != 1:
            raise DwarfError(f".debug_line unit at {start:#x}: VLIW line programs are not supported")
        q += 1
    default_is_stmt = b[q]
    line_base = b[q + 1] - 256 if b[q + 1] >= 128 else b[q + 1]
    line_range = b[q + 2]
    opcode_base = b[q + 3]
    std_lengths = bytes(b[q + 4:q + 4 + opcode_base - 1])
    if min_inst != 1 or line_range == 0 or opcode_base < 13:
        raise DwarfError(f".debug_line unit at {start:#x}: unusual header "
                         f"(minimum instruction length {min_inst}, opcode base {opcode_base})")
    if program_start > end:
        raise DwarfError(f".debug_line unit at {start:#x}: header runs past the unit")
    rows = _run(b, program_start, end, default_is_stmt, line_base, line_range, opcode_base,
                std_lengths, start)
    (addr, file, line, column, flags, isa, disc, seq, seq_start, seq_end, seq_bytes) = rows
    return LineUnit(
        offset=start, end=end, prologue=bytes(b[p:program_start]),
        default_is_stmt=default_is_stmt, line_base=line_base, line_range=line_range,
        opcode_base=opcode_base,
        addr=np.array(addr, np.uint64), file=np.array(file, np.uint32),
        line=np.array(line, np.int64), column=np.array(column, np.uint32),
        flags=np.array(flags, np.uint8), isa=np.array(isa, np.uint32),
        disc=np.array(disc, np.uint32), seq=np.array(seq, np.int32),
        seq_start=np.array(seq_start, np.uint64), seq_end=np.array(seq_end, np.uint64),
        seq_bytes=seq_bytes, program=bytes(b[program_start:end]))


def _run(b, p, end, default_is_stmt, line_base, line_range, opcode_base, std_lengths, start):
    """The line-number state machine; rows as lists."""
    A, F, L, C, FL, I, D, S = [], [], [], [], [], [], [], []
    seq_start, seq_end, seq_bytes = [], [], []
    program_start = p
    seq_from = p
    addr, file, line, col, isa, disc = 0, 1, 1, 0, 0, 0
    flags = IS_STMT if default_is_stmt else 0
    nseq = 0
    seq_rows = 0
    adj_base = opcode_base
    while p < end:
        op = b[p]
        p += 1
        if op >= adj_base:
            adj = op - adj_base
            addr += adj // line_range
            line += line_base + adj % line_range
            A.append(addr); F.append(file); L.append(line); C.append(col); FL.append(flags)
            I.append(isa); D.append(disc); S.append(nseq)
            seq_rows += 1
            flags &= IS_STMT
            disc = 0
        elif op == 0:
            n, p = uleb(b, p)
            q = p + n
            if n == 0 or q > end:
                raise DwarfError(f".debug_line unit at {start:#x}: bad extended opcode")
            ext = b[p]
            if ext == END_SEQUENCE:
                if seq_rows:
                    seq_start.append(A[-seq_rows])
                else:
                    seq_start.append(addr)
                seq_end.append(addr)
                seq_bytes.append((seq_from - program_start, q - program_start))
                seq_from = q
                nseq += 1
                seq_rows = 0
                addr, file, line, col, isa, disc = 0, 1, 1, 0, 0, 0
                flags = IS_STMT if default_is_stmt else 0
            elif ext == SET_ADDRESS:
                addr = int.from_bytes(b[p + 1:q], "little")
            elif ext == SET_DISCRIMINATOR:
                disc = uleb(b, p + 1)[0]
            elif ext == DEFINE_FILE:
                raise DwarfError(f".debug_line unit at {start:#x}: DW_LNE_define_file is not supported")
            p = q
        elif op == COPY:
            A.append(addr); F.append(file); L.append(line); C.append(col); FL.append(flags)
            I.append(isa); D.append(disc); S.append(nseq)
            seq_rows += 1
            flags &= IS_STMT
            disc = 0
        elif op == ADVANCE_PC:
            v, p = uleb(b, p)
            addr += v
        elif op == ADVANCE_LINE:
            v, p = sleb(b, p)
            line += v
        elif op == SET_FILE:
            file, p = uleb(b, p)
        elif op == SET_COLUMN:
            col, p = uleb(b, p)
        elif op == NEGATE_STMT:
            flags ^= IS_STMT
        elif op == SET_BASIC_BLOCK:
            flags |= BASIC_BLOCK
        elif op == CONST_ADD_PC:
            addr += (255 - adj_base) // line_range
        elif op == FIXED_ADVANCE_PC:
            addr += u16(b, p)
            p += 2
        elif op == SET_PROLOGUE_END:
            flags |= PROLOGUE_END
        elif op == SET_EPILOGUE_BEGIN:
            flags |= EPILOGUE_BEGIN
        elif op == SET_ISA:
            isa, p = uleb(b, p)
        else:
            for _ in range(std_lengths[op - 1]):
                _, p = uleb(b, p)
    if seq_rows:
        raise DwarfError(f".debug_line unit at {start:#x}: the last sequence has no end")
    return A, F, L, C, FL, I, D, S, seq_start, seq_end, seq_bytes


class Encoder:
    """Writes rows of one unit as line-program sequences: the sequences are
    collected, then written together with numpy (millions of rows)."""

    def __init__(self, unit: LineUnit):
        self.u = unit
        self.verbatim_bytes = bytearray()
        self.rows, self.addrs, self.ends = [], [], []

    def sequence(self, rows, addrs, end: int) -> None:
        if len(rows):
            self.rows.append(np.asarray(rows, np.int64))
            self.addrs.append(np.asarray(addrs, np.uint64))
            self.ends.append(end)

    def verbatim(self, seq: int) -> None:
        a, b = self.u.seq_bytes[seq]
        self.verbatim_bytes += self.u.program[a:b]

    def unit(self) -> bytes:
        body = self.u.prologue + bytes(self.verbatim_bytes)
        if self.rows:
            body += _encode(self.u, np.concatenate(self.rows), np.concatenate(self.addrs),
                            np.array([len(r) for r in self.rows], np.int64),
                            np.array(self.ends, np.uint64))
        return len(body).to_bytes(4, "little") + body


def _encode(u: LineUnit, rows, addrs, seq_len, ends) -> bytes:
    """Sequences of rows (``seq_len`` rows each, in order) as a line program:
    set_address, per row the opcodes for what changed and a special opcode (or
    advance_pc + copy), then advance to the end and end_sequence."""
    n = len(rows)
    first_idx = np.cumsum(seq_len) - seq_len
    first = np.zeros(n, bool)
    first[first_idx] = True
    file = u.file[rows].astype(np.int64)
    line = u.line[rows]
    col = u.column[rows].astype(np.int64)
    flags = u.flags[rows]
    isa = u.isa[rows].astype(np.int64)
    disc = u.disc[rows].astype(np.int64)
    stmt = (flags & IS_STMT).astype(np.int64)

    def prev(x, initial):
        p = np.empty_like(x)
        p[1:] = x[:-1]
        p[first] = initial
        return p

    addr_prev = prev(addrs, 0)
    addr_prev[first] = addrs[first]
    if (addrs < addr_prev).any():
        raise DwarfError("line rows out of address order")
    da = (addrs - addr_prev).astype(np.int64)
    dl = line - prev(line, 1)
    c_file = file != prev(file, 1)
    c_col = col != prev(col, 0)
    c_neg = stmt != prev(stmt, IS_STMT if u.default_is_stmt else 0)
    c_bb = (flags & BASIC_BLOCK) != 0
    c_pe = (flags & PROLOGUE_END) != 0
    c_eb = (flags & EPILOGUE_BEGIN) != 0
    c_isa = isa != prev(isa, 0)
    c_disc = disc != 0
    lo = dl - u.line_base
    in_range = (lo >= 0) & (lo < u.line_range)
    lo = np.where(in_range, lo, -u.line_base)
    special = lo + u.line_range * da
    direct = special <= 255 - u.opcode_base
    s_file = np.where(c_file, 1 + uleb_size(file), 0)
    s_col = np.where(c_col, 1 + uleb_size(col), 0)
    s_isa = np.where(c_isa, 1 + uleb_size(isa), 0)
    disc_len = uleb_size(disc)
    s_disc = np.where(c_disc, 3 + disc_len, 0)
    s_advl = np.where(in_range, 0, 1 + sleb_size(dl))
    s_advpc = np.where(direct, 0, 1 + uleb_size(da))
    sizes = [s_file, s_col, c_neg.astype(np.int64), c_bb.astype(np.int64),
             c_pe.astype(np.int64), c_eb.astype(np.int64), s_isa, s_disc, s_advl, s_advpc]
    row_size = sum(sizes) + 1
    # sequence footers: advance to the end, end_sequence
    last_idx = first_idx + seq_len - 1
    tail = (ends - addrs[last_idx]).astype(np.int64)
    if (tail < 0).any():
        raise DwarfError("line sequence ends before its last row")
    foot = np.where(tail > 0, 1 + uleb_size(tail), 0) + 3
    seq_of = np.repeat(np.arange(len(seq_len)), seq_len)
    # where each row starts: rows before it, plus a header (11 bytes) per sequence
    # so far and the footers of the sequences before
    before_foot = np.cumsum(foot) - foot
    row_start = (np.cumsum(row_size) - row_size) + 11 * (seq_of + 1) + before_foot[seq_of]
    total = int(row_size.sum()) + 11 * len(seq_len) + int(foot.sum())
    buf = np.zeros(total, np.uint8)
    # headers: DW_LNE_set_address
    head = row_start[first_idx] - 11
    buf[head] = 0
    buf[head + 1] = 9
    buf[head + 2] = SET_ADDRESS
    put_le(buf, head + 3, addrs[first_idx], 8)
    pos = row_start.copy()

    def op(mask, opcode):
        buf[pos[mask]] = opcode

    op(c_file, SET_FILE)
    put_uleb(buf, pos[c_file] + 1, file[c_file], s_file[c_file] - 1)
    pos += s_file
    op(c_col, SET_COLUMN)
    put_uleb(buf, pos[c_col] + 1, col[c_col], s_col[c_col] - 1)
    pos += s_col
    op(c_neg, NEGATE_STMT)
    pos += c_neg
    op(c_bb, SET_BASIC_BLOCK)
    pos += c_bb
    op(c_pe, SET_PROLOGUE_END)
    pos += c_pe
    op(c_eb, SET_EPILOGUE_BEGIN)
    pos += c_eb
    op(c_isa, SET_ISA)
    put_uleb(buf, pos[c_isa] + 1, isa[c_isa], s_isa[c_isa] - 1)
    pos += s_isa
    p = pos[c_disc]
    buf[p] = 0
    buf[p + 1] = (1 + disc_len[c_disc]).astype(np.uint8)
    buf[p + 2] = SET_DISCRIMINATOR
    put_uleb(buf, p + 3, disc[c_disc], disc_len[c_disc])
    pos += s_disc
    m = ~in_range
    op(m, ADVANCE_LINE)
    put_sleb(buf, pos[m] + 1, dl[m], s_advl[m] - 1)
    pos += s_advl
    m = ~direct
    op(m, ADVANCE_PC)
    put_uleb(buf, pos[m] + 1, da[m], s_advpc[m] - 1)
    pos += s_advpc
    final = np.where(direct, special + u.opcode_base,
                     np.where(lo + u.opcode_base <= 255, lo + u.opcode_base, COPY))
    buf[pos] = final.astype(np.uint8)
    # footers
    f0 = row_start[last_idx] + row_size[last_idx]
    m = tail > 0
    buf[f0[m]] = ADVANCE_PC
    tl = uleb_size(tail[m])
    put_uleb(buf, f0[m] + 1, tail[m], tl)
    e = f0 + np.where(m, 1 + uleb_size(tail), 0)
    buf[e] = 0
    buf[e + 1] = 1
    buf[e + 2] = END_SEQUENCE
    return buf.tobytes()


def update_lines(data, image: CodeImage, progress=None) -> tuple[bytes, dict[int, int]]:
    """The new .debug_line for code laid out as ``image``, and the new offset of
    every unit (DW_AT_stmt_list moves with it)."""
    units = read_units(data)
    if not image.changed:
        return bytes(data), {u.offset: u.offset for u in units}
    # All rows of all units, by address: the rows of each piece of new code.
    sizes = [len(u.addr) for u in units]
    g_addr = np.concatenate([u.addr for u in units]) if units else np.zeros(0, np.uint64)
    g_unit = np.repeat(np.arange(len(units), dtype=np.int64), sizes)
    g_row = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if units else g_unit
    g_seq_end = np.concatenate([u.seq_end[u.seq] for u in units]) if units else g_addr
    order = np.argsort(g_addr, kind="stable")
    g_addr, g_unit, g_row, g_seq_end = g_addr[order], g_unit[order], g_row[order], g_seq_end[order]

    new_seqs = _new_sequences(image, g_addr, g_unit, g_row, g_seq_end)
    del g_addr, g_unit, g_row, g_seq_end, order

    out = bytearray()
    offsets = {}
    rw_lo, rw_hi = image._rw_lo, image._rw_hi
    for ui, u in enumerate(units):
        enc = Encoder(u)
        touched = False
        for s in range(len(u.seq_start)):
            s_lo, s_hi = int(u.seq_start[s]), int(u.seq_end[s])
            i0 = int(np.searchsorted(rw_hi, s_lo, side="right"))
            i1 = int(np.searchsorted(rw_lo, s_hi, side="left"))
            if i0 >= i1 or s_lo == s_hi:
                enc.verbatim(s)
                continue
            touched = True
            _kept_sequences(enc, u, s, s_lo, s_hi, rw_lo[i0:i1].tolist(), rw_hi[i0:i1].tolist())
        for rows, addrs, end in new_seqs.get(ui, ()):
            touched = True
            enc.sequence(rows, addrs, end)
        offsets[u.offset] = len(out)
        if touched:
            out += enc.unit()
        else:
            out += data[u.offset:u.end]
        if progress:
            progress(ui + 1, len(units))
    return bytes(out), offsets


def _kept_sequences(enc: Encoder, u: LineUnit, s: int, s_lo: int, s_hi: int,
                    cut_lo: list[int], cut_hi: list[int]) -> None:
    """The rows of sequence ``s`` outside the rewritten intervals, one sequence per
    stretch of code that stayed."""
    rows = np.flatnonzero(u.seq == s)
    addr = u.addr[rows]
    x = s_lo
    bounds = []
    for lo, hi in zip(cut_lo, cut_hi):
        if lo > x:
            bounds.append((x, min(lo, s_hi)))
        x = max(x, hi)
    if x < s_hi:
        bounds.append((x, s_hi))
    for x, y in bounds:
        a = int(np.searchsorted(addr, x, side="left"))
        b = int(np.searchsorted(addr, y, side="left"))
        idx = rows[a:b].tolist()
        if (a == b or int(addr[a]) != x) and a > 0:
            idx.insert(0, int(rows[a - 1]))       # the row in effect at x
        if not idx:
            continue
        addrs = [max(int(u.addr[i]), x) for i in idx]
        enc.sequence(idx, addrs, y)


def _new_sequences(image: CodeImage, g_addr, g_unit, g_row, g_seq_end) -> dict:
    """{unit: [(rows, new addresses, end)]}: a sequence per part of new code. The
    pieces are taken a batch of whole parts at a time (bounded memory)."""
    real = np.flatnonzero(image.kind != INHERIT)
    out: dict[int, list] = {}
    if not len(real) or not len(g_addr):
        return out
    # part ends: the end of its last piece (an added jump included)
    ends = image.new_lo + image.size.astype(np.uint64)
    last = np.flatnonzero(np.r_[image.part[1:] != image.part[:-1], True])
    part_end = dict(zip(image.part[last].tolist(), ends[last].tolist()))
    del ends, last
    part = image.part[real]
    cuts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])     # first piece of each part
    bounds = cuts[::PART_BATCH].tolist() + [len(real)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        _sequences_of(image, real[a:b], part[a:b], g_addr, g_unit, g_row, g_seq_end,
                      part_end, out)
    return out


PART_BATCH = 1 << 14


def _sequences_of(image, real, part, g_addr, g_unit, g_row, g_seq_end, part_end, out) -> None:
    o = image.old_lo[real]
    lo = np.searchsorted(g_addr, o, side="left")
    hi = np.searchsorted(g_addr, o + image.old_len[real].astype(np.uint64), side="left")
    exact = (lo < hi) & (g_addr[np.minimum(lo, len(g_addr) - 1)] == o)
    eff = lo - 1
    has_eff = (eff >= 0) & ~exact
    has_eff &= g_seq_end[np.maximum(eff, 0)] > o
    eff = np.where(has_eff, eff, -1)
    current_after = np.where(hi > lo, hi - 1, eff)
    first_of_part = np.r_[True, part[1:] != part[:-1]]
    prev_current = np.r_[-1, current_after[:-1]]
    need_copy = has_eff & (first_of_part | (eff != prev_current))
    del current_after, prev_current, first_of_part, exact, has_eff
    counts = (hi - lo) + need_copy
    total = int(counts.sum())
    if not total:
        return
    piece = np.repeat(np.arange(len(real)), counts)
    k = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    copy_here = need_copy[piece] & (k == 0)
    gi = np.where(copy_here, eff[piece], lo[piece] + k - need_copy[piece])
    del k
    # POINT pieces put all their rows at the piece's start
    new0 = image.new_lo[real][piece]
    linear = image.kind[real][piece] == LINEAR
    new_addr = np.where(copy_here | ~linear, new0, new0 + (g_addr[gi] - o[piece]))
    del new0, linear, copy_here
    unit = g_unit[gi]
    row = g_row[gi]
    prt = part[piece]
    # a sequence per part (split where the unit changes, which GCC's code never does)
    brk = np.flatnonzero(np.r_[True, (prt[1:] != prt[:-1]) | (unit[1:] != unit[:-1]), True])
    starts, stops = brk[:-1], brk[1:]
    nxt = np.minimum(stops, len(prt) - 1)
    same_part_next = (stops < len(prt)) & (prt[nxt] == prt[starts])
    ends = np.where(same_part_next, new_addr[nxt],
                    np.array([part_end[p_] for p_ in prt[starts].tolist()], np.uint64))
    for a, b, u, end in zip(starts.tolist(), stops.tolist(), unit[starts].tolist(), ends.tolist()):
        out.setdefault(u, []).append((row[a:b], new_addr[a:b], end))
