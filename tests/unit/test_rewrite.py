"""The rewrite engine on the small assembled kernel: every table follows its code,
the output verifies, and what cannot be rewritten is left byte for byte."""

import subprocess
import sys

import numpy as np
import pytest

from elfkit import tools_available
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.analysis.crosscheck import check_all
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite
from kbuild_bolt.rewrite.verify import verify
from synthetic_kernel import build

pytestmark = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")


def options(**kw):
    kw.setdefault("progress", False)
    return RewriteOptions(**kw)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("rewrite"))


def loadable(path):
    image = ElfImage(path)
    return b"".join(image.read(s.addr, s.size) for s in image.sections
                    if s.is_alloc and s.has_bits and s.size)


def test_none_keeps_every_loadable_byte(kernel, tmp_path):
    out = tmp_path / "none"
    result = rewrite(kernel, out, options(reorder_blocks="none"))
    assert result.rewritten == 0
    assert loadable(out) == loadable(kernel)


def test_reverse_moves_blocks_and_every_table_follows(kernel, tmp_path):
    out = tmp_path / "reverse"
    result = rewrite(kernel, out, options(reorder_blocks="reverse"))
    assert result.rewritten >= 1
    assert result.verify_summary.startswith("verify: ok")
    before, after = BinaryModel.open(kernel, jobs=1), BinaryModel.open(out, jobs=1)
    row = before.functions.by_name("startup_64")
    start, size = int(before.functions.start[row]), int(after.functions.end[row]
                                                         - after.functions.start[row])
    assert before.image.read(start, 16) != after.image.read(start, 16) or \
        before.image.read(start, size) != after.image.read(start, size)
    assert all(c.ok for c in check_all(after).values())
    # The static-key sites keep their state and the jump goes to the moved target.
    jt_before, jt_after = before.tables["__jump_table"], after.tables["__jump_table"]
    for field in ("code", "target"):
        assert not np.array_equal(jt_before.targets(field), jt_after.targets(field)) or \
            field == "code"
    flags = jt_after.flags("key").tolist()
    assert flags == [1, 0]
    site = int(jt_after.targets("code")[1])
    code = after.image.read(site, 5)
    # Still a jmp (2 or 5 bytes: the kernel reads the size from the code) ...
    assert code[0] in (0xEB, 0xE9)
    size, disp = (2, int.from_bytes(code[1:2], "little", signed=True)) if code[0] == 0xEB \
        else (5, int.from_bytes(code[1:5], "little", signed=True))
    assert site + size + disp == int(jt_after.targets("target")[1])  # ... to its moved target
    nop_site = int(jt_after.targets("code")[0])
    assert after.image.read(nop_site, 2) in (b"\x66\x90", b"\x0f\x1f")  # still a nop
    # ORC keeps its size; the exception table stays sorted.
    assert after.tables[".orc_unwind_ip"].count == before.tables[".orc_unwind_ip"].count
    insn = after.tables["__ex_table"].targets("insn")
    assert np.all(insn[1:] >= insn[:-1])


def test_verify_cli_against_input(kernel, tmp_path):
    out = tmp_path / "random"
    rewrite(kernel, out, options(reorder_blocks="random", seed=3))
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "verify", str(out),
                           "--against", str(kernel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "verify: ok" in proc.stdout


def test_verify_catches_a_stale_table(kernel, tmp_path):
    out = tmp_path / "fault"
    rewrite(kernel, out, options(reorder_blocks="reverse", verify=False, plant_fault="bug"))
    report = verify(out, against=kernel)
    assert not report.ok
    assert any("__bug_table" in p for p in report.problems)


def test_output_decoding_reuses_only_unchanged_ranges(kernel, tmp_path):
    out = tmp_path / "reverse-like"
    rewrite(kernel, out, options(reorder_blocks="reverse", verify=False))
    before = BinaryModel.open(kernel, jobs=1)
    fresh = BinaryModel.open(out, jobs=1)
    reusing = BinaryModel.open(out, jobs=1, like=before)
    for name in ("addr", "length", "flow", "ref", "ref_kind", "field_off", "field_size",
                 "invalid"):
        assert np.array_equal(getattr(fresh.insns, name), getattr(reusing.insns, name)), name
    # The rewritten code differs from the input's decoding: it was decoded anew.
    assert not np.array_equal(fresh.insns.addr, before.insns.addr) or \
        not np.array_equal(fresh.insns.ref, before.insns.ref)


def test_verify_catches_code_changed_outside_rewritten_functions(kernel, tmp_path):
    out = tmp_path / "reverse-unexpected"
    result = rewrite(kernel, out, options(reorder_blocks="reverse", verify=False))
    before = BinaryModel.open(kernel, jobs=1)
    rows = {before.functions.by_name(n) for n in result.rewritten_names}
    assert verify(out, against=before, expect_rewritten=rows).ok
    # Claim startup_64 was not rewritten: its changed bytes are now unexplained.
    row = before.functions.by_name("startup_64")
    report = verify(out, against=before, expect_rewritten=rows - {row})
    assert not report.ok
    assert any("startup_64" in p and "changed outside rewritten functions" in p
               for p in report.problems), report.problems


def test_function_that_cannot_move_is_untouched(kernel, tmp_path):
    out = tmp_path / "skip"
    result = rewrite(kernel, out, options(reorder_blocks="reverse", skip_funcs={"startup_64"}))
    before, after = ElfImage(kernel), ElfImage(out)
    sym = before.symbols
    start = sym.address("startup_64")
    size = int(sym.size[sym.index("startup_64")])
    assert before.read(start, size) == after.read(start, size)
    assert result.left_alone["not selected"] == 1


def test_funcs_selects_and_unknown_names_fail(kernel, tmp_path):
    with pytest.raises(KbbError, match="no such function: nope"):
        rewrite(kernel, tmp_path / "x", options(reorder_blocks="reverse", funcs={"nope"}))
    assert not (tmp_path / "x").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kbuild_bolt", *map(str, args)],
                          capture_output=True, text=True)


def one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # Progress lines ("  BOLT    ...") may come first; the error is one line.
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith("  BOLT ")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_bad_inputs(kernel, tmp_path):
    plain = build(tmp_path, replace=None)  # same source, linked below without relocations
    import elfkit
    from synthetic_kernel import CODE, TABLES
    norel = elfkit.assemble(tmp_path, CODE + "".join(TABLES.values()), name="norel",
                            ld_args=("-m", "elf_x86_64", "-z", "noexecstack"))
    one_line_error(run_cli("rewrite", norel, "-o", tmp_path / "o", "--reorder-blocks=reverse"),
                   "no relocations")
    one_line_error(run_cli("rewrite", plain, "-o", tmp_path / "o"), "needs --profile")
    one_line_error(run_cli("rewrite", plain, "-o", tmp_path / "nodir/o",
                           "--reorder-blocks=reverse"), "no such directory")
    one_line_error(run_cli("rewrite", plain, "-o", tmp_path / "o", "--reorder-blocks=reverse",
                           "--plant-fault", "bug"), "--no-verify")
    assert not (tmp_path / "o").exists()


LOOPER = r"""
    .text
    .globl looper
    .type looper, @function
looper:
    test %edi, %edi
    je .Lfault
.Lbody:
    mov %esi, %eax
    jmp __x86_return_thunk
.Lfault:
    xor %eax, %eax
.Lfaulting:
    mov %eax, %fs
.Lresume:
    jmp .Lbody
    .size looper, . - looper
    .p2align 6, 0xcc
    .section __ex_table, "a"
    .long .Lfaulting - ., .Lresume - ., 5
"""


def test_fixup_on_a_jump_that_falls_away(tmp_path):
    """Debian's xen_load_tls: the exception fixup is a lone "jmp back". When the
    layout puts that block right before the jump's target the jump disappears; the
    fixup must then point where the target now starts (found on the distro kernel)."""
    kernel = build(tmp_path, extra=LOOPER)
    before = BinaryModel.open(kernel, jobs=1)
    row = before.functions.by_name("looper")
    start = int(before.functions.start[row])
    elided = 0
    for seed in range(12):
        out = tmp_path / f"random{seed}"
        result = rewrite(kernel, out, options(reorder_blocks="random", seed=seed,
                                              funcs={"looper"}))
        assert result.verify_summary.startswith("verify: ok"), result.verify_summary
        after = BinaryModel.open(out, jobs=1)
        fixups = after.tables["__ex_table"].targets("fixup").tolist()
        fixup = [f for f in fixups if start <= f < start + 64][0]
        code = after.image.read(start, int(after.functions.end[row]) - start)
        new_body = start + code.index(b"\x89\xf0")   # mov %esi,%eax starts .Lbody
        if after.image.read(fixup, 1)[0] in (0xEB, 0xE9):
            assert fixup != new_body   # the jump is still there and is the fixup
        else:
            elided += 1
            assert fixup == new_body, (seed, hex(fixup), hex(new_body))
    assert elided, "no seed put the fixup block right before its target"


def test_verify_tells_functions_that_moved_from_symbols_renumbered():
    # A block layout that put a cold part in free room gains a local symbol
    # (name.cold) in front of the globals: every later symbol is renumbered, but
    # no function moved (verify then checks the code function by function).
    from types import SimpleNamespace

    from kbuild_bolt.rewrite.verify import _functions_moved

    class Symbols(SimpleNamespace):
        def __len__(self):
            return len(self.names)

    def image(entries, first_global):
        names = [n for n, _t, _v in entries]
        return SimpleNamespace(symtab=SimpleNamespace(info=first_global), symbols=Symbols(
            names=names, type=np.array([t for _n, t, _v in entries]),
            value=np.array([v for _n, _t, v in entries], np.uint64)))

    before = image([("x", 2, 0x50), ("a", 2, 0x100), ("b", 2, 0x200), ("c", 0, 0x300)], 1)
    renumbered = image([("x", 2, 0x50), ("a.cold", 2, 0x900), ("a", 2, 0x100), ("b", 2, 0x200),
                        ("c", 0, 0x300)], 2)
    moved = image([("x", 2, 0x50), ("a.cold", 2, 0x900), ("a", 2, 0x100), ("b", 2, 0x240),
                   ("c", 0, 0x300)], 2)
    assert not _functions_moved(before, renumbered)
    assert _functions_moved(before, moved)
    # Symbols not where the index says (added at the end; two swapped): looked
    # for by name and address.
    appended = image([("x", 2, 0x50), ("a", 2, 0x100), ("b", 2, 0x200), ("c", 0, 0x300),
                      ("a.cold", 2, 0x900)], 1)
    swapped = image([("x", 2, 0x50), ("b", 2, 0x200), ("a", 2, 0x100), ("c", 0, 0x300)], 1)
    renamed = image([("x", 2, 0x50), ("b", 2, 0x100), ("a", 2, 0x200), ("c", 0, 0x300)], 1)
    assert not _functions_moved(before, appended)
    assert not _functions_moved(before, swapped)
    assert _functions_moved(before, renamed)


def test_progress_bar_on_a_terminal_plain_lines_in_a_log_quiet_with_q(kernel, tmp_path):
    import os
    import pty

    cmd = [sys.executable, "-m", "kbuild_bolt", "rewrite", str(kernel), "-o",
           str(tmp_path / "out"), "--reorder-blocks", "reverse"]

    def on_terminal(argv):
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(sys.executable, argv)
        out = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.waitpid(pid, 0)
        return out.decode(errors="replace")

    shown = on_terminal(cmd)
    from kbuild_bolt.rewrite.engine import PASSES

    assert "\r\x1b[K  BOLT    [" in shown and f"/{len(PASSES)} emit" in shown
    assert "  BOLT    laying out" in shown
    logged = subprocess.run(cmd, capture_output=True, text=True)
    assert logged.returncode == 0 and "\r" not in logged.stderr and "BOLT    laying out" in \
        logged.stderr
    assert "BOLT" not in on_terminal(cmd + ["-q"]).split("functions rewritten")[0]


@pytest.mark.parametrize("cpus", [1, 2])
def test_verify_reports_an_output_that_does_not_read_as_a_kernel(kernel, tmp_path, monkeypatch,
                                                                  cpus):
    """Whether the output is decoded in a forked child (two CPUs) or here: an
    output that cannot be read is a failed check, not an error or a hang."""
    import kbuild_bolt.rewrite.verify as verify_module

    monkeypatch.setattr(verify_module, "default_jobs", lambda: cpus)
    good = tmp_path / "good"
    rewrite(kernel, good, options(reorder_blocks="reverse"))
    assert verify(good, against=kernel).ok
    not_elf = tmp_path / "not-elf"
    not_elf.write_bytes(b"\x7fELF" + bytes(60))
    stripped = tmp_path / "stripped"
    subprocess.run(["objcopy", "--strip-all", str(good), str(stripped)], check=True)
    for bad in (not_elf, stripped):
        report = verify(bad, against=kernel)
        assert not report.ok
        assert report.first_problem().startswith("output reads as a kernel: "), report.problems


def test_a_slot_never_runs_into_a_hole_after_its_function():
    """A function's slot over the fill after it stops where free room for cold
    code begins (no label marks a hole's start on every kernel)."""
    import numpy as np

    from kbuild_bolt.rewrite.holes import slots_short_of_holes

    starts = np.array([0x100, 0x200, 0x5000, 0x9000], np.uint64)
    slots = np.array([0x180, 0x8000, 0x6000, 0x9100], np.uint64)
    holes = [(0x7000, 0x7f00), (0x1000, 0x4000)]
    got = slots_short_of_holes(starts, slots, holes)
    # 0x200's slot ran over both holes: cut at the first; the others end before a hole
    assert got.tolist() == [0x180, 0x1000, 0x6000, 0x9100]
    assert slots_short_of_holes(starts, slots, []).tolist() == slots.tolist()


@pytest.mark.parametrize("limit", [None, 0])
def test_new_code_decoded_beside_only_when_it_is_small(kernel, tmp_path, monkeypatch, limit):
    """The new code is decoded beside the update when verification will take it
    (on the other CPU, when there is one); past NEW_CODE_DECODED_BESIDE bytes (a
    whole-kernel layout) it is not, and verification decodes it itself."""
    from kbuild_bolt.rewrite import engine
    from kbuild_bolt.rewrite.context import RewriteContext

    if limit is not None:
        monkeypatch.setattr(engine, "NEW_CODE_DECODED_BESIDE", limit)
    started = []
    real = RewriteContext.start_beside
    monkeypatch.setattr(RewriteContext, "start_beside", lambda self, name, fn, *args: (
        started.append(name), real(self, name, fn, *args))[1])
    out = tmp_path / "out"
    result = rewrite(kernel, out, options(reorder_blocks="reverse"))
    assert result.verify_summary.startswith("verify: ok")
    assert ("new code" in started) == (limit is None)
    result = rewrite(kernel, out, options(reorder_blocks="reverse", verify=False))
    assert started.count("new code") <= 1
