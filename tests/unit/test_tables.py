"""Every kernel table type on small assembled kernels: read, counted, cross-checked
against the code, and malformed entries reported."""

import json
import subprocess
import sys

import numpy as np
import pytest

from elfkit import tools_available
from synthetic_kernel import EXPECTED_612, PARAVIRT, build
from kbuild_bolt.binary.cfg import EDGE_NAMES, REASONS, build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.errors import KbbError
from kbuild_bolt.analysis.crosscheck import check_all

pytestmark = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def model(kernel):
    return BinaryModel.open(kernel, jobs=1)


def test_every_table_is_read_with_the_right_count(model):
    counts = {name: data.count for name, data in model.tables.items()}
    for name, count in EXPECTED_612.items():
        assert counts.get(name) == count, name
    assert model.tables[".smp_locks"].padding == 1023
    assert model.tables["__mcount_loc"].padding == 1          # the zero in the middle
    assert model.tables[".altinstructions"].entry_size == 14  # 6.12 layout
    assert model.tables["__bug_table"].entry_size == 8        # no file/line: terse layout


def test_cross_check_is_clean(model):
    checks = check_all(model)
    assert {name: [m.message for m in c.mismatches] for name, c in checks.items()
            if c.mismatches} == {}
    assert checks[".altinstructions"].places["function"] == 1
    assert checks[".altinstructions"].places[".altinstr_replacement"] == 1


def test_static_key_sites_and_targets(model):
    data = model.tables["__jump_table"]
    flags = data.flags("key").tolist()
    assert flags == [1, 0]          # likely, unlikely
    names = [model.symbolize(int(a)) for a in data.targets("code")]
    assert names == ["startup_64+0x9", "startup_64+0xb"]


def test_cfg_has_static_key_pseudo_branches_and_fixup_entries(model):
    cfg = build_cfg(model)
    row = model.functions.by_name("startup_64")
    assert cfg.func_reason[row] == 0
    blocks = list(cfg.blocks_of(row))
    starts = [int(model.insns.addr[cfg.block_first[b]]) for b in blocks]
    key = model.tables["__jump_table"]
    for site, target in zip(key.targets("code").tolist(), key.targets("target").tolist()):
        i = int(model.insn_index([site])[0])
        assert cfg.static_key_insn[i]
        assert target in starts           # the jump side starts a block
        b = int(np.searchsorted(cfg.block_first, i, side="right")) - 1
        kinds = {EDGE_NAMES[k] for _, k in cfg.successors(b)}
        assert kinds == {"fallthrough", "static-key"}
    fixup = int(model.tables["__ex_table"].targets("fixup")[0])
    assert fixup in starts                # control arrives from the exception handler
    # thunks are left alone
    assert REASONS[cfg.func_reason[model.functions.by_name("__x86_return_thunk")]] == "thunk"


ALT_6_1 = r"""
    .section .altinstructions, "a"
    .long .Lalt - ., .Lrepl - .
    .short 0x10
    .byte .Lalt_end - .Lalt, .Lrepl_end - .Lrepl
"""


def test_6_1_layouts_and_paravirt(tmp_path):
    replace = {"alt": ALT_6_1}
    path = build(tmp_path, release="6.1.0-elfkit", replace=replace, extra=PARAVIRT)
    model = BinaryModel.open(path, jobs=1)
    assert model.tables[".altinstructions"].entry_size == 12
    assert model.tables[".parainstructions"].count == 1
    assert ".orc_header" not in model.tables           # 6.1 has none
    assert all(c.ok for c in check_all(model).values())


def test_null_namespace_of_an_assembly_export(tmp_path):
    """6.1's EXPORT_SYMBOL in assembly writes ``.long 0`` for "no namespace": a
    null pointer, not a pointer to the field itself."""
    replace = {"ksym": r"""
    .section __ksymtab, "a"
    .long startup_64 - ., .Lname - ., .Lns - .
    .long second - ., .Lname - ., 0
    .section __kcrctab, "a"
    .long 0x12345678, 0x9abcdef0
""", "alt": ALT_6_1}
    path = build(tmp_path, release="6.1.0-elfkit", replace=replace)
    model = BinaryModel.open(path, jobs=1)
    data = model.tables["__ksymtab"]
    assert data.count == 2
    assert data.present("namespace").tolist() == [True, False]
    assert data.present("value").tolist() == [True, True]
    assert all(c.ok for c in check_all(model).values())
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "dump", str(path), "--json",
                           "--table", "__ksymtab"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)["tables"]["__ksymtab"]["list"]
    assert listed[1]["fields"]["namespace"] == {"value": 0, "target": None}
    assert listed[1]["fields"]["value"]["symbol"] == "second"
    assert listed[0]["fields"]["namespace"]["target"] is not None


def mismatches(path):
    model = BinaryModel.open(path, jobs=1)
    return {name: [m.message for m in c.mismatches]
            for name, c in check_all(model).items() if c.mismatches}


@pytest.mark.parametrize("table, body, message", [
    ("smp_locks", "    .section .smp_locks, \"a\"\n    .long .Lex - .\n",
     "expected a lock prefix"),
    ("smp_locks", "    .section .smp_locks, \"a\"\n    .long .Llock + 1 - .\n",
     "not an instruction start"),
    ("bug", "    .section __bug_table, \"a\"\n    .long counter - .\n    .short 0, 0\n",
     "points into .data"),
    ("sites", "    .section .return_sites, \"a\"\n    .long .Lcall - .\n",
     "expected a jmp/jcc to __x86_return_thunk"),
    ("sites", "    .section .retpoline_sites, \"a\"\n    .long .Lcall - .\n",
     "expected a call/jmp/jcc to __x86_indirect_thunk_*"),
    ("sites", "    .section .ibt_endbr_seal, \"a\"\n    .long .Lfentry - .\n",
     "expected endbr64"),
    ("jump", "    .section __jump_table, \"aw\"\n    .balign 8\n"
             "    .long .Lkey_jmp5 - ., .Lfixup - .\n    .quad foo_key - .\n",
     "jump site does not jump to the entry's target"),
    ("jump", "    .section __jump_table, \"aw\"\n    .balign 8\n"
             "    .long .Llock - ., .Lfixup - .\n    .quad foo_key - .\n",
     "expected a 2- or 5-byte jmp/nop"),
    ("jump", "    .section __jump_table, \"aw\"\n    .balign 8\n"
             "    .long .Lkey_jmp5 - ., .Lkey_jmp5_yes - .\n    .quad foo_key + 1 - .\n",
     "site is a jmp but its key is enabled with the branch bit 1"),
    ("jump", "    .section __jump_table, \"aw\"\n    .balign 8\n"
             "    .long .Lkey_nop2 - ., .Lkey_nop2_yes - .\n    .quad sc_key + 1 - .\n",
     "site is a nop but its key is disabled with the branch bit 1"),
    ("mcount", "    .section __mcount_loc, \"a\"\n    .quad .Lcall\n",
     "expected call __fentry__ or a 5-byte nop"),
    ("alt", "    .section .altinstructions, \"a\"\n    .long .Lalt - ., .Lrepl - .\n"
            "    .long 0x10010\n    .byte 2, 3\n",
     "patch range of 2 bytes ends inside an instruction"),
    ("orc", "    .section .orc_unwind_ip, \"a\"\n    .long second - ., startup_64 - .\n"
            "    .section .orc_unwind, \"a\"\n    .short 8, 0, 0x205, 8, 0, 0x205\n",
     "not sorted: ip below the previous entry's"),
    ("ex", "    .section __ex_table, \"a\"\n    .long .Lex + 2 - ., .Lfixup - ., 3\n",
     "not an instruction start"),
    ("pci", "    .section .pci_fixup_header, \"a\"\n    .short 0, 0\n    .long 0, 0\n"
            "    .long .Lfixup - .\n", "not a function start"),
    ("runtime", "    .section runtime_ptr_USER_PTR_MAX, \"a\"\n    .long .Lrtc - .\n",
     "expected the imm64 of a mov $imm64, %reg"),
])
def test_malformed_entries_are_listed(tmp_path, table, body, message):
    found = mismatches(build(tmp_path, replace={table: body}))
    assert any(message in m for ms in found.values() for m in ms), found


def test_out_of_range_pointer(tmp_path):
    body = "    .section .smp_locks, \"a\"\n    .long 0x12345678\n"
    found = mismatches(build(tmp_path, replace={"smp_locks": body}))
    assert found[".smp_locks"] == [
        "points into outside, expected function or region or .altinstr_replacement or .altinstr_aux"]


def test_truncated_table_is_a_clear_error(tmp_path):
    body = ("    .section __ex_table, \"a\"\n    .long .Lex - ., .Lfixup - ., 3\n"
            "    .short 0\n")
    path = build(tmp_path, replace={"ex": body})
    with pytest.raises(KbbError, match="__ex_table .*14 bytes is not a whole number of 12-byte"):
        BinaryModel.open(path, jobs=1)
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "dump", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dump_json_and_text(kernel):
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "dump", str(kernel), "--json",
                           "--table", "__jump_table", "--function", "startup_64"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    table = out["tables"]["__jump_table"]
    assert table["entries"] == 2 and len(table["list"]) == 2
    assert table["list"][0]["fields"]["code"]["symbol"] == "startup_64+0x9"
    assert table["mismatches"] == []
    func = out["functions"][0]
    assert func["name"] == "startup_64" and func["simple"] is True
    texts = [i["text"] for b in func["blocks"] for i in b["instructions"]]
    assert any(t.startswith("jit ") and "Size: 2" in t for t in texts)
    notes = [a for b in func["blocks"] for i in b["instructions"] for a in i["annotations"]]
    assert any(a.startswith("LOCK[0]") for a in notes)
    assert any(a.startswith("EXTABLE[0].insn") for a in notes)
    text = subprocess.run([sys.executable, "-m", "kbuild_bolt", "dump", str(kernel),
                           "--function", "startup_64"], capture_output=True, text=True).stdout
    assert 'Binary Function "startup_64"' in text
    assert "# STATICKEY (nop) # Size: 2" in text


def test_dump_unknown_names(kernel):
    for args in (["--table", "nope"], ["--function", "nope"]):
        proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "dump", str(kernel), *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2
        assert "nope" in proc.stderr


@pytest.mark.parametrize("seed", range(4))
def test_kallsyms_names_read_in_bulk_as_record_by_record(seed):
    """kallsyms names: records of one- and two-byte lengths (and none), walked 256
    at a time from the markers, read as walking them one by one does; markers
    that do not fit the records fall back to that walk."""
    from kbuild_bolt.kernel.tables import kallsyms

    rng = np.random.default_rng(seed)
    tokens = [chr(65 + i % 26) * int(rng.integers(0, 4)) for i in range(256)]
    count = int(rng.integers(1, 1500))
    blob, starts, names = bytearray(), [], []
    for _ in range(count):
        n = int(rng.choice([0, 1, 5, 20, 127, 128, 300], p=[.02, .2, .5, .2, .04, .02, .02]))
        starts.append(len(blob))
        blob += bytes([n]) if n < 128 else bytes([0x80 | (n & 0x7F), n >> 7])
        body = rng.integers(0, 256, n).astype(np.uint8)
        blob += body.tobytes()
        names.append("".join(tokens[b] for b in body.tolist()))
    blob += bytes(5)
    markers = np.array(starts[::256], np.int64)
    for given in (markers, None, markers + 1, markers[:1]):
        bounds = kallsyms._record_bounds(bytes(blob), count, given)
        assert bounds[0].tolist() == starts
        assert kallsyms._expanded(bytes(blob), bounds, tokens) == names
