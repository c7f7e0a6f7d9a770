"""Verification's checks of a rewritten lab kernel that run beside the decoding
of its code (in the parent, while a forked child decodes): a stale entry still
fails the rewrite, and nothing is written."""

from __future__ import annotations

import pytest

from kbuild_bolt.errors import KbbError
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite


def test_a_stale_orc_entry_fails_the_rewrite_by_its_state(lab_regular, tmp_path, capsys):
    """An .orc_unwind_ip entry left at its old address: the ORC states read back
    from the output no longer follow the moved code."""
    out = tmp_path / "out"
    with pytest.raises(KbbError, match="verification failed"):
        rewrite(lab_regular.vmlinux, out, RewriteOptions(
            reorder_blocks="reverse", plant_fault="orc", progress=False))
    summary = capsys.readouterr().err
    orc = [line for line in summary.splitlines() if "ORC states follow moved code" in line]
    assert orc and "bad" in orc[0], summary
    assert any(line.startswith("  ! ORC states follow moved code:") for line in orc), summary
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_changed_data_is_reported_outside_tables_and_relocated_fields(lab_regular, tmp_path):
    """The data check of a copy of the lab kernel with bytes changed in .rodata:
    one inside a relocated field and one inside a table pass, one in neither is
    reported by its address (the relocations of a section are read only for a
    section with a change outside its tables)."""
    import numpy as np

    from kbuild_bolt.binary.model import BinaryModel
    from kbuild_bolt.rewrite.verify import _data_problems

    inp = BinaryModel.open(lab_regular.vmlinux)
    image = inp.image
    rodata = image.section(".rodata")
    fields = np.sort(image.relocations_for(".rodata")["offset"])
    tables = sorted((t.addr, t.addr + t.size) for t in inp.tables.values())

    def in_table(addr):
        return any(lo <= addr < hi for lo, hi in tables)

    # A relocated field outside every table, and a byte in no field and no table.
    field = next(int(a) for a in fields.tolist() if not in_table(a) and not in_table(a + 7))
    def in_field(addr):   # (fields are at most 8 bytes)
        k = int(np.searchsorted(fields, addr, "right")) - 1
        return k >= 0 and addr < int(fields[k]) + 8

    plain = next(a for a in range(rodata.addr + 64, rodata.end, 8)
                 if not in_table(a) and not in_field(a))
    table = next(t for t in inp.tables.values()
                 if t.size and image.section_at(t.addr) is not None
                 and not image.section_at(t.addr).is_exec)
    data = bytearray(open(lab_regular.vmlinux, "rb").read())

    def flip(addr):
        section = image.section_at(addr)
        data[section.offset + addr - section.addr] ^= 0x5A

    flip(field + 1)
    flip(table.addr)
    copy = tmp_path / "copy"
    copy.write_bytes(bytes(data))
    checked, problems = _data_problems(inp, BinaryModel.open(copy))
    assert checked > rodata.size and problems == []
    flip(plain)
    copy.write_bytes(bytes(data))
    checked, problems = _data_problems(inp, BinaryModel.open(copy))
    assert problems == [f".rodata: byte at {plain:#x} changed outside tables and "
                        "relocated fields"]


def test_orc_entries_given_up_for_room_leave_every_code_state(lab_regular, tmp_path,
                                                               monkeypatch):
    """When the new ORC table would not fit, repeated states and then undefined
    entries over fill are given up: at every address of code (functions and the
    new code) the unwinder finds the state it finds in the table that did not
    have to shrink. (A table smaller than the kernel's forces both steps.)"""
    import numpy as np

    from kbuild_bolt.kernel.tables import orc

    taken = {}
    real = orc.regenerate

    def keep_inputs(model, runs, branch_states, moved_ranges, capacity=None):
        taken.update(model=model, args=(runs, branch_states, moved_ranges))
        return real(model, runs, branch_states, moved_ranges, capacity)

    monkeypatch.setattr(orc, "regenerate", keep_inputs)
    rewrite(lab_regular.vmlinux, tmp_path / "out", RewriteOptions(
        reorder_blocks="reverse", split_functions=True, verify=False))
    model, (runs, branch_states, moved_ranges) = taken["model"], taken["args"]
    ips, states = real(model, runs, branch_states, moved_ranges)
    # (the table is padded with its last entry: the entries in use come before)
    used = len(ips) - int(np.argmax((ips[::-1] != ips[-1]))) + 1
    key = lambda s: (s["sp_offset"], s["bp_offset"], s["bits"])  # noqa: E731

    def state(table, addrs):
        at = np.searchsorted(table[0], addrs, side="right") - 1
        return np.stack(key(table[1][at]), axis=1)

    code = np.concatenate([np.asarray(runs, np.uint64).reshape(-1, 3)[:, 0],
                           np.asarray(branch_states[0], np.uint64)])
    in_functions = ips[:used][model.functions.rows_containing(ips[:used]) >= 0]
    addrs = np.unique(np.concatenate([code, in_functions]))
    addrs = addrs[addrs >= ips[0]]
    full = state((ips, states), addrs)
    # Entries that repeat the state before them go first; past those, undefined
    # entries over fill.
    same = np.all(np.diff(np.stack(key(states[:used]), axis=1), axis=0) == 0, axis=1)
    repeats = int(same.sum())
    for smaller in (used - repeats // 2, used - repeats - 10, used - repeats - 100):
        got_ips, got_states = real(model, runs, branch_states, moved_ranges, capacity=smaller)
        assert len(got_ips) == smaller
        assert np.array_equal(state((got_ips, got_states), addrs), full)
