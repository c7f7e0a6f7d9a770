"""The DWARF layer on small hand-made inputs: LEB128, line programs written and
read back, the code image (where old code is now), lists and expressions."""

from __future__ import annotations

import numpy as np
import pytest

from kbuild_bolt.dwarf import lines, lists
from kbuild_bolt.dwarf.expr import addr_operands
from kbuild_bolt.dwarf.image import INHERIT, LINEAR, POINT, CodeImage
from kbuild_bolt.dwarf.leb import (DwarfError, enc_sleb, enc_uleb, enc_uleb_padded, sleb,
                                   uleb)


@pytest.mark.parametrize("v", [0, 1, 63, 64, 127, 128, 300, 2**20, 2**63])
def test_uleb_round_trip(v):
    assert uleb(enc_uleb(v), 0) == (v, len(enc_uleb(v)))
    padded = enc_uleb_padded(v, 10)
    assert len(padded) == 10 and uleb(padded, 0) == (v, 10)


@pytest.mark.parametrize("v", [0, 1, -1, 63, -64, 64, -65, 1000, -1000, 2**40, -(2**40)])
def test_sleb_round_trip(v):
    assert sleb(enc_sleb(v), 0) == (v, len(enc_sleb(v)))


def test_bulk_leb128_matches_one_at_a_time():
    from kbuild_bolt.dwarf.vec import put_sleb, put_uleb, sleb_size, uleb_size

    u = np.array([0, 1, 127, 128, 300, 2**20, 2**35, 2**63], np.uint64)
    s = np.array([0, 1, -1, 63, -64, 64, -65, 1000, -1000, 2**40, -(2**40), -(2**62)], np.int64)
    assert uleb_size(u).tolist() == [len(enc_uleb(int(v))) for v in u.tolist()]
    assert sleb_size(s).tolist() == [len(enc_sleb(int(v))) for v in s.tolist()]
    for values, size, put, enc in ((u, uleb_size(u), put_uleb, enc_uleb),
                                   (s, sleb_size(s), put_sleb, enc_sleb)):
        pos = np.cumsum(size) - size
        buf = np.zeros(int(size.sum()), np.uint8)
        put(buf, pos, values, size)
        assert buf.tobytes() == b"".join(enc(int(v)) for v in values.tolist())


def test_padded_uleb_refuses_what_does_not_fit():
    assert enc_uleb_padded(128, 1) is None
    assert enc_uleb_padded(127, 1) == b"\x7f"


BASE = 0xFFFFFFFF81000000


def _line_unit(rows, end):
    """A DWARF 4 line unit with one file and one sequence of ``rows``
    (address, line, column, flags)."""
    std = bytes([0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1])
    tables = b"dir\0\0" + b"a.c\0\x01\0\0" + b"\0"
    header = bytes([1, 1, 1, 0xFB, 14, 13]) + std + tables
    prologue = (4).to_bytes(2, "little") + len(header).to_bytes(4, "little") + header
    unit = lines.LineUnit(
        offset=0, end=0, prologue=prologue, default_is_stmt=1, line_base=-5, line_range=14,
        opcode_base=13, addr=np.array([r[0] for r in rows], np.uint64),
        file=np.ones(len(rows), np.uint32), line=np.array([r[1] for r in rows], np.int64),
        column=np.array([r[2] for r in rows], np.uint32),
        flags=np.array([r[3] for r in rows], np.uint8), isa=np.zeros(len(rows), np.uint32),
        disc=np.zeros(len(rows), np.uint32), seq=np.zeros(len(rows), np.int32),
        seq_start=np.array([rows[0][0]], np.uint64), seq_end=np.array([end], np.uint64),
        seq_bytes=[], program=b"")
    enc = lines.Encoder(unit)
    enc.sequence(list(range(len(rows))), [r[0] for r in rows], end)
    return enc.unit()


ROWS = [(BASE, 10, 1, 1), (BASE, 11, 5, 0), (BASE + 4, 12, 2, 1), (BASE + 9, 300, 0, 5),
        (BASE + 600, 2, 7, 1), (BASE + 600, 3, 7, 9)]


def test_line_program_round_trip_keeps_rows_that_share_an_address():
    data = _line_unit(ROWS, BASE + 610)
    (unit,) = lines.read_units(data)
    got = list(zip(unit.addr.tolist(), unit.line.tolist(), unit.column.tolist(),
                   unit.flags.tolist()))
    assert got == ROWS
    assert unit.seq_end.tolist() == [BASE + 610]


def _swap_image():
    """Old code [BASE, BASE+20): block A = [0, 9), block B = [9, 20). New: B first
    (copied), then A (copied), then a jump added after A."""
    return CodeImage(
        rewritten=np.array([[BASE, BASE + 20]], np.uint64),
        new_lo=np.array([BASE, BASE + 11, BASE + 20], np.uint64),
        size=np.array([11, 9, 2], np.int64),
        old_lo=np.array([BASE + 9, BASE, 0], np.uint64),
        old_len=np.array([11, 9, 0], np.int64),
        kind=np.array([LINEAR, LINEAR, INHERIT], np.int8),
        part=np.array([0, 0, 0], np.int64))


def test_code_image_points_and_ranges():
    img = _swap_image()
    new, ok = img.points(np.array([BASE, BASE + 4, BASE + 9, BASE + 100], np.uint64))
    assert ok.all()
    assert new.tolist() == [BASE + 11, BASE + 15, BASE, BASE + 100]
    # A range over both blocks maps to the whole new code, the added jump included.
    idx, lo, hi = img.ranges(np.array([BASE], np.uint64), np.array([BASE + 20], np.uint64))
    assert list(zip(lo.tolist(), hi.tolist())) == [(BASE, BASE + 22)]
    # Block A alone: its copy and the jump added after it.
    idx, lo, hi = img.ranges(np.array([BASE], np.uint64), np.array([BASE + 9], np.uint64))
    assert list(zip(lo.tolist(), hi.tolist())) == [(BASE + 11, BASE + 22)]
    # A range across the seam becomes two ranges (A's tail keeps its added jump).
    idx, lo, hi = img.ranges(np.array([BASE + 4], np.uint64), np.array([BASE + 12], np.uint64))
    assert list(zip(lo.tolist(), hi.tolist())) == [(BASE, BASE + 3), (BASE + 15, BASE + 22)]
    # Code outside the rewritten interval stays.
    idx, lo, hi = img.ranges(np.array([BASE + 30], np.uint64), np.array([BASE + 40], np.uint64))
    assert list(zip(lo.tolist(), hi.tolist())) == [(BASE + 30, BASE + 40)]
    # Return addresses: just past the same instruction.
    new, ok = img.points(np.array([BASE + 9], np.uint64), end=True)
    assert ok.all() and new.tolist() == [BASE + 20]


def test_code_image_gone_code_and_point_pieces():
    # old: a 2-byte jcc at BASE (re-encoded as 6 bytes), then 3 bytes dropped
    img = CodeImage(np.array([[BASE, BASE + 5]], np.uint64), np.array([BASE + 100], np.uint64),
                    np.array([6], np.int64), np.array([BASE], np.uint64), np.array([2], np.int64),
                    np.array([POINT], np.int8), np.array([0], np.int64))
    new, ok = img.points(np.array([BASE, BASE + 1, BASE + 3], np.uint64))
    assert ok.tolist() == [True, True, False]
    assert new[:2].tolist() == [BASE + 100, BASE + 100]
    new, ok = img.points(np.array([BASE + 2], np.uint64), end=True)
    assert new.tolist() == [BASE + 106]


def test_new_line_sequences_follow_the_code():
    """Rows of moved blocks land at the blocks' new places; a block that began in
    the middle of a row's range gets a copy of that row; rows sharing an address
    stay together, in order."""
    rows = [(BASE, 10, 1, 1), (BASE + 4, 11, 1, 1), (BASE + 4, 12, 1, 0), (BASE + 12, 13, 1, 1)]
    data = _line_unit(rows, BASE + 20)
    new, offsets = lines.update_lines(data, _swap_image())
    assert offsets == {0: 0}
    (unit,) = lines.read_units(new)
    got = sorted(zip(unit.addr.tolist(), unit.line.tolist()))
    # B = [9, 20) now at 0: the row in effect at 9 (line 12), then line 13 at 12 -> 3.
    # A = [0, 9) now at 11: lines 10, 11, 12 (the last two share an address).
    assert got == [(BASE, 12), (BASE + 3, 13), (BASE + 11, 10), (BASE + 15, 11), (BASE + 15, 12)]
    at15 = [ln for a, ln in zip(unit.addr.tolist(), unit.line.tolist()) if a == BASE + 15]
    assert at15 == [11, 12]
    assert unit.seq_end.tolist() == [BASE + 22]


@pytest.mark.parametrize("version", [4, 5])
def test_lists_round_trip(version):
    """Lists written in bulk (appended to an old section), read back one by one."""
    w = lists.ListWriter(b"\xaa" * 7, version)
    raw, offs = lists.encode_rnglists(version, len(w.out), np.array([0, 0, 2]),
                                      np.array([BASE, BASE + 100, BASE + 7], np.uint64),
                                      np.array([BASE + 8, BASE + 101, BASE + 9], np.uint64), 3)
    w.out += raw
    data = w.finish()
    offs = offs.tolist()
    assert lists.read_rnglist(data, offs[0], version, 0) == [(BASE, BASE + 8), (BASE + 100, BASE + 101)]
    assert lists.read_rnglist(data, offs[1], version, 0) == []
    assert lists.read_rnglist(data, offs[2], version, 0) == [(BASE + 7, BASE + 9)]
    src = np.frombuffer(b"\x55\x50\x9f", np.uint8)
    w = lists.ListWriter(b"", version)
    raw, v_off, l_off = lists.encode_loclists(
        version, len(w.out), src, np.array([0, 0]), np.array([BASE, BASE + 8], np.uint64),
        np.array([BASE + 8, BASE + 9], np.uint64), np.array([0, 1]), np.array([1, 2]),
        np.array([False, False]), np.array([1, 2]), np.array([0, 3]), np.array([True]), 1)
    w.out += raw
    data = w.finish()
    got = lists.read_loclist(data, int(l_off[0]), version, 0)
    assert [(lo, hi, bytes(data[p:p + n])) for lo, hi, p, n, _ in got] == [
        (BASE, BASE + 8, b"\x55"), (BASE + 8, BASE + 9, b"\x50\x9f")]
    vb, ve = lists.read_view_pairs(data, [int(v_off[0])], [2])
    assert list(zip(vb, ve)) == [(1, 0), (2, 3)]
    cols = lists.read_loclists(data, [int(l_off[0])], version, [0])
    assert list(cols[1]) == [BASE, BASE + 8] and list(cols[4]) == [1, 2]


def test_expression_addresses():
    # DW_OP_addr X; DW_OP_stack_value / DW_OP_breg7 -8; DW_OP_plus_uconst 444; DW_OP_addr Y
    e = (b"\x03" + BASE.to_bytes(8, "little") + b"\x9f" + b"\x77\x78" + b"\x23\xbc\x03"
         + b"\x03" + (BASE + 1).to_bytes(8, "little"))
    assert addr_operands(e, 0, len(e)) == [1, 16]
    # an entry value nests an expression
    inner = b"\x03" + BASE.to_bytes(8, "little")
    e = b"\xa3" + bytes([len(inner)]) + inner
    assert addr_operands(e, 0, len(e)) == [3]
    with pytest.raises(DwarfError):
        addr_operands(b"\x03\x01\xff" + bytes(7), 0, 10)


def test_code_image_old_of():
    img = _swap_image()
    old, ok = img.old_of(np.array([BASE, BASE + 3, BASE + 11, BASE + 20, BASE + 30], np.uint64))
    assert ok.tolist() == [True, True, True, False, True]      # (BASE+20: the added jump)
    assert (old[ok] - np.uint64(BASE)).tolist() == [9, 12, 0, 30]


def _fde_rows(program: bytes, loc: int):
    from kbuild_bolt.dwarf import frame

    cie = frame.Cie(0, 0, 1, -8, 16, (("c", 7, 8), ()))
    cie.initial = (("c", 7, 8), ((16, ("o", -8)),))
    return cie, frame.run(program, 0, len(program), cie, loc, cie.initial)


def test_frame_rows_and_state_changes_round_trip():
    """GCC's kind of FDE program (push, frame pointer, remember/restore around an
    early return) read to rows, then each row's state written as the change from
    the one before and read back: the same rows."""
    from kbuild_bolt.dwarf import frame

    program = bytes([0x41, 0x0e, 16, 0x86, 2,      # +1: cfa rsp+16, rbp at cfa-16
                     0x44, 0x0d, 6,                # +4: cfa in rbp
                     0x4a, 0x0a, 0xc6, 0x0c, 7, 8,  # +10: remember; restore rbp; cfa rsp+8
                     0x41, 0x0b])                  # +1: restore state
    cie, rows = _fde_rows(program, BASE)
    assert [a - BASE for a, _ in rows] == [0, 1, 5, 15, 16]
    assert rows[2][1][0] == ("c", 6, 16) and rows[3][1][0] == ("c", 7, 8)
    assert rows[4][1] == rows[2][1]
    out = bytearray()
    prev, at = cie.initial, BASE
    for a, state in rows:
        if a > at:
            frame._advance(a - at, out)
            at = a
        frame.encode_state_change(prev, state, cie, out)
        prev = state
    _, again = _fde_rows(bytes(out), BASE)
    assert again == rows


def test_short_udata_scope_becomes_ranges_in_low_and_high_bytes():
    """GNU as writes DW_AT_high_pc as a 1-byte udata: a scope split in two has no
    room for DW_AT_ranges in it, so low_pc and high_pc together hold the offset
    (and a padding block). The unit's scope too (a unit that moved gets ranges;
    with no lists of its own, its low_pc is nobody's base)."""
    from kbuild_bolt.dwarf.info import walk
    from kbuild_bolt.dwarf.update import update_debug

    abbrev = bytes([1, 0x11, 1, 0x11, 0x01, 0x12, 0x0F, 0x03, 0x08, 0, 0,
                    2, 0x2E, 0, 0x11, 0x01, 0x12, 0x0F, 0, 0, 0])
    body = (bytes([1]) + BASE.to_bytes(8, "little") + bytes([20]) + b"a\0"
            + bytes([2]) + (BASE + 4).to_bytes(8, "little") + bytes([8]) + bytes([0]))
    header = (4).to_bytes(2, "little") + (0).to_bytes(4, "little") + bytes([8])
    info = bytearray((len(header) + len(body)).to_bytes(4, "little") + header + body)
    sections = {".debug_info": info, ".debug_abbrev": abbrev}
    res = update_debug(sections.get, _swap_image())
    assert not res.problems, res.problems
    out_info, out_abbrev = res.sections[".debug_info"], res.sections[".debug_abbrev"]
    assert len(out_info) == len(info)
    found = walk(out_info, out_abbrev)
    assert list(found.s_low) == [-1, -1] and list(found.s_high) == [-1, -1]

    def ranges(k):
        p = found.s_ranges[k]
        off = int.from_bytes(out_info[p:p + 4], "little")
        return lists.read_rnglist(res.sections[".debug_ranges"], off, 4, 0)
    assert ranges(0) == [(BASE, BASE + 22)]
    assert ranges(1) == [(BASE, BASE + 3), (BASE + 15, BASE + 22)]
