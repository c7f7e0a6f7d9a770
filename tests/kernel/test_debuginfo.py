"""DWARF kept true (issue 12) on real kernels: the 6.1 lab kernel built with
DWARF 4, and Debian's distro kernel (DWARF 5), after random functions, random
blocks and random splits. Judged by real clients: LLVM's symbolizer (every
moved instruction's inline chain and LLVM's reading of .debug_frame, through
``verify --debug``) and gdb."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kbuild_bolt.dwarf import UPDATED
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.debuginfo import load_code_image
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite
from kbuild_bolt.rewrite.verify_debug import moved_instructions, verify_debug

WHOLE = dict(reorder_blocks="random", reorder_functions="random", split_functions=True,
             progress=False)


def _rewrite(vmlinux, tmp_path_factory, name, seed):
    d = tmp_path_factory.mktemp(name)
    out, amap = d / "vmlinux", d / "vmlinux.map"
    result = rewrite(vmlinux, out, RewriteOptions(seed=seed, address_map=str(amap), **WHOLE))
    return out, amap, result


@pytest.fixture(scope="module")
def dwarf4(tmp_path_factory):
    kernel = lab_kernel("6.1-debug")
    return (kernel.vmlinux,) + _rewrite(kernel.vmlinux, tmp_path_factory, "dwarf4", 21)


def _dump_section(vmlinux, name, path) -> None:
    # (not objcopy --dump-section: given no output file, objcopy rewrites its input,
    # here the cached lab kernel other tests have mapped)
    with ElfImage(vmlinux) as image:
        s = image.section(name)
        path.write_bytes(image.read_file_range(s.offset, s.size))


def _kept(result):
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert not result.stripped and "debug info removed" not in result.brief()
    stats = result.debug_stats
    assert stats["scopes made ranges"] > 1000 and stats["location lists"] > 1000, stats
    assert stats["range lists"] > 1000 and stats["addresses"] > 1000, stats
    # every scope that moved could be described (GNU as units' short udata
    # lengths included: their low_pc and high_pc bytes hold DW_AT_ranges)
    assert not any("no room" in p for p in result.debug_problems), result.debug_problems
    # rewrite's own cheap check ran
    assert result.debug_check.startswith("inline chains equal at 2,000"), result.debug_check


def test_dwarf4_inline_chains_equal_at_new_addresses(dwarf4):
    vmlinux, out, amap, result = dwarf4
    _kept(result)
    with ElfImage(out) as image:
        names = {s.name for s in image.sections}
        assert not any(n.startswith(".rela.debug") and image.section(n).size for n in names)
    report = verify_debug(str(out), str(vmlinux), str(amap), sample=60000, seed=1)
    assert report.ok and report.checked > 50000, report.summary()
    # .debug_frame: LLVM's rules at every new address are the old address's, and
    # agree with ORC wherever they did
    assert report.cfi_checked > 0.95 * report.checked, report.summary()
    assert report.orc_checked > 0.9 * report.cfi_checked, report.summary()
    assert result.debug_stats["FDEs written"] > 10000, result.debug_stats


def test_debug_update_is_the_same_in_any_number_of_pieces(dwarf4, monkeypatch):
    """The update runs on two cores (line programs in one child, location lists
    in another) and writes location lists a group at a time: the sections are
    the rewrite's, byte for byte, with tiny groups and batches, and with every
    part run in this process."""
    import kbuild_bolt.dwarf.update as update

    vmlinux, out, amap, _ = dwarf4
    with ElfImage(vmlinux) as image, ElfImage(out) as written:
        def read(name):
            s = image.section(name)
            return image.read_file_range(s.offset, s.size) if s is not None and s.size else None

        expected = {}
        for name in UPDATED:
            s = written.section(name)
            if s is not None and s.size:
                expected[name] = written.read_file_range(s.offset, s.size)

        class InProcess:                     # ForkedCall's interface, run here and now
            def __init__(self, fn, *args):
                self.value = fn(*args)

            def result(self):
                return self.value

            def cancel(self):
                pass

        monkeypatch.setattr(update, "LIST_GROUP", 1000)
        monkeypatch.setattr(update, "LIST_BATCH", 77)
        pieces = update.update_debug(read, load_code_image(amap)).sections
        monkeypatch.setattr(update, "ForkedCall", InProcess)
        here = update.update_debug(read, load_code_image(amap)).sections
    for name, data in expected.items():
        assert bytes(pieces[name]) == bytes(data), name
        assert bytes(here[name]) == bytes(data), name
    assert len(expected) >= 7, sorted(expected)


def test_dwarf4_block_layout_in_place(tmp_path_factory):
    """Blocks reordered inside functions that keep their places (code growing
    into the fill after a function, cold parts in free room of .text)."""
    kernel = lab_kernel("6.1-debug")
    d = tmp_path_factory.mktemp("dwarf4-blocks")
    out, amap = d / "vmlinux", d / "vmlinux.map"
    result = rewrite(kernel.vmlinux, out, RewriteOptions(
        reorder_blocks="random", seed=23, progress=False, address_map=str(amap)))
    _kept(result)
    report = verify_debug(str(out), str(kernel.vmlinux), str(amap), sample=60000, seed=6)
    assert report.ok and report.checked > 50000, report.summary()
    assert report.cfi_checked > 0.95 * report.checked, report.summary()


def test_verify_debug_catches_a_wrong_line_table(dwarf4, tmp_path):
    """The input's own DWARF describes the old layout: verify --debug must say so."""
    vmlinux, out, amap, _ = dwarf4
    stale = tmp_path / "stale"
    _dump_section(vmlinux, ".debug_line", tmp_path / "line")
    subprocess.run(["objcopy", "--update-section", f".debug_line={tmp_path / 'line'}",
                    str(out), str(stale)], check=True, capture_output=True)
    report = verify_debug(str(stale), str(vmlinux), str(amap), sample=2000, seed=2)
    assert not report.ok and len(report.problems) > 500


def test_verify_debug_catches_stale_scopes_and_locations(dwarf4, tmp_path):
    """The input's .debug_info (old scopes, old list offsets) in the output: the
    scopes and location lists found at new addresses are not the old ones."""
    vmlinux, out, amap, _ = dwarf4
    stale = tmp_path / "stale"
    args = []
    for name in (".debug_info", ".debug_abbrev"):
        _dump_section(vmlinux, name, tmp_path / name)
        args += ["--update-section", f"{name}={tmp_path / name}"]
    subprocess.run(["objcopy", *args, str(out), str(stale)], check=True, capture_output=True)
    report = verify_debug(str(stale), str(vmlinux), str(amap), sample=3000, seed=3)
    assert report.scope_mismatches > 300 and report.location_mismatches > 300, report.summary()
    assert "scopes at .debug_info" in report.summary()


def _gdb(vmlinux, *commands) -> str:
    args = ["gdb", "-batch", "-nx"]
    for c in commands:
        args += ["-ex", c]
    run = subprocess.run(args + [str(vmlinux)], capture_output=True, text=True, timeout=600)
    return run.stdout + run.stderr


LINE = re.compile(r'Line (\d+) of "([^"]+)"')


def test_gdb_lines_source_and_scopes_of_moved_functions(dwarf4):
    vmlinux, out, amap, _ = dwarf4
    code = load_code_image(str(amap))
    with ElfImage(vmlinux) as image:
        old = moved_instructions(image, code)
    rng = np.random.default_rng(3)
    old = np.sort(rng.choice(old, 40, replace=False))
    new, ok = code.points(old)
    before = LINE.findall(_gdb(vmlinux, *[f"info line *{a:#x}" for a in old.tolist()]))
    after = LINE.findall(_gdb(out, *[f"info line *{a:#x}" for a in new.tolist()]))
    assert len(before) == 40 and after == before
    # A function that moved and was split: gdb shows its source, and the same scope.
    with ElfImage(out) as image:
        cold = sorted(n[:-5] for n in image.symbols.names if n.endswith(".cold")
                      and not n[:-5].endswith(".cold"))
    name = cold[len(cold) // 2]
    text = _gdb(out, f"disassemble /s {name}")
    assert "Dump of assembler code" in text and re.search(r"^\d+\s", text, re.M), text[-2000:]

    def scope(path):
        s = _gdb(path, f"info scope {name}")
        return sorted(re.findall(r"Symbol (\S+) is", s))
    assert scope(out) == scope(vmlinux)


def test_profile_layout_with_splitting_keeps_dwarf_true(tmp_path_factory):
    """The layout make CONFIG_BOLT=y uses with a profile (ext-tsp blocks, cdsort
    functions, hot/cold split) from a real QEMU profile of the 6.1-debug kernel."""
    from kbuild_bolt.cli import main as cli

    kernel = lab_kernel("6.1-debug")
    d = tmp_path_factory.mktemp("dwarf4-profile")
    profile = d / "files.kbb"
    assert cli(["profile", "record", "--kernel", str(kernel.bzimage), "--vmlinux",
                str(kernel.vmlinux), "--initrd", str(kernel.initramfs), "--workload", "files",
                "--iterations", "1,4", "-o", str(profile)]) == 0
    out, amap = d / "vmlinux", d / "vmlinux.map"
    result = rewrite(kernel.vmlinux, out, RewriteOptions(
        reorder_blocks="ext-tsp", reorder_functions="cdsort", split_functions=True,
        profile=str(profile), progress=False, address_map=str(amap)))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.fragments > 100 and result.debug_stats["scopes made ranges"] > 100
    report = verify_debug(str(out), str(kernel.vmlinux), str(amap), sample=40000, seed=5)
    assert report.ok and report.checked > 30000 and report.cfi_checked > 0.95 * report.checked, \
        report.summary()
    assert report.orc_checked > 0.9 * report.cfi_checked and report.dwarfdump_checked, \
        report.summary()


@pytest.mark.distro
def test_distro_dwarf5_inline_chains_equal(dwarf5):
    vmlinux, out, amap, result = dwarf5
    _kept(result)
    report = verify_debug(str(out), str(vmlinux), str(amap), sample=30000, seed=4)
    assert report.ok and report.checked > 25000, report.summary()
    assert report.cfi_checked > 0.9 * report.checked, report.summary()
    # (scopes, location lists and llvm-dwarfdump --verify are in report.ok)
    assert report.orc_checked > 0.9 * report.cfi_checked and report.dwarfdump_checked, \
        report.summary()


HERE = Path(__file__).resolve().parent
KERNEL_SPACE = 0xFFFF800000000000
CLONE = re.compile(r"(\.(isra|constprop|part|cold)(\.\d+)?)+$")


@pytest.fixture(scope="module")
def crash_dump(dwarf4, tmp_path_factory):
    """A memory dump of the optimized 6.1-debug kernel in the middle of the files
    workload (QEMU dump-guest-memory, with VMCOREINFO)."""
    _, out, _, _ = dwarf4
    kernel = lab_kernel("6.1-debug")
    core = tmp_path_factory.mktemp("vmcore") / "vmcore"
    outcome = boot(out, kernel.initramfs, memory="512M", dump_to=core, timeout=600)
    assert outcome.ok and "dump" in outcome.markers, outcome.summary()
    assert core.exists() and core.stat().st_size > 256 << 20
    return core


def _symbolize(vmlinux, addrs):
    from kbuild_bolt.rewrite.verify_debug import chains

    return chains(str(vmlinux), np.asarray(addrs, np.uint64))


def test_drgn_stack_traces_of_every_task(dwarf4, crash_dump):
    """drgn unwinds every task of the dump with the optimized vmlinux; every frame
    in moved code has the function, file and line the input had there."""
    vmlinux, out, amap, _ = dwarf4
    run = subprocess.run(["/usr/bin/python3", str(HERE / "drgn_stacks.py"), str(crash_dump),
                          str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    tasks = json.loads(run.stdout)
    assert len(tasks) > 20 and not [t for t in tasks if "error" in t], run.stdout[:2000]
    code = load_code_image(str(amap))
    groups = []          # (address looked up, drgn's frames there, innermost first)
    for task in tasks:
        frames = task["frames"]
        assert frames, task
        group = []
        for f in frames:
            group.append(f)
            if not f["inline"]:
                pc = f["pc"] if f["interrupted"] else f["pc"] - 1
                if f["pc"] >= KERNEL_SPACE:       # (not the user-space frame a syscall ends at)
                    groups.append((pc, group))
                group = []
    pcs = np.array([g[0] for g in groups], np.uint64)
    old, ok = code.old_of(pcs)
    moved = ok & code.in_rewritten(old)
    assert moved.sum() > 20, f"{moved.sum()} frames in moved code"
    expected = _symbolize(vmlinux, old[moved])
    problems = []
    for (pc, group), want in zip([g for g, m in zip(groups, moved) if m], expected):
        got = [(Path(f["source"][0]).name, f["source"][1]) if f["source"] else None for f in group]
        exp = [(Path(file).name, line) for _, file, line, _, _ in want]
        if got != exp:
            problems.append(f"{pc:#x}: drgn {got} != {exp}")
    assert problems == [], problems[:10]


@pytest.fixture(scope="module")
def dwarf5(distro, tmp_path_factory):
    return (distro.vmlinux,) + _rewrite(distro.vmlinux, tmp_path_factory, "dwarf5", 22)


def _distro_dump(kernel, tmp_path_factory, name):
    """A kernel (PVH, with the lab initramfs) dumped in the middle of the files
    workload."""
    from kbuild_bolt.lab.initramfs import build_lab_initramfs

    d = tmp_path_factory.mktemp(name)
    initrd = build_lab_initramfs(d / "initrd.gz")
    core = d / "vmcore"
    outcome = boot(kernel, initrd, memory="1G", dump_to=core, timeout=600)
    assert outcome.ok and "dump" in outcome.markers, outcome.summary()
    assert core.exists() and core.stat().st_size > 512 << 20
    return core


@pytest.fixture(scope="module")
def distro_dump(dwarf5, tmp_path_factory):
    return _distro_dump(dwarf5[1], tmp_path_factory, "distro-vmcore")


def _crash(vmlinux, core, commands: str) -> str:
    run = subprocess.run(["crash", "-s", str(vmlinux), str(core)], input=commands + "quit\n",
                         capture_output=True, text=True, timeout=900)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    return text


def _dis_lines(text: str) -> dict[int, tuple[str, int]]:
    """crash's dis -l: the source line each instruction is listed under."""
    lines, where = {}, None
    for line in text.splitlines():
        h = _DIS_HEAD.match(line.strip())
        if h:
            where = (Path(h.group(1)).name, int(h.group(2)))
            continue
        i = _DIS_INSN.match(line)
        if i and where:
            lines[int(i.group(1), 16)] = where
    return lines


_DIS_HEAD = re.compile(r"^(\S+\.[chS]): (\d+)$")
_DIS_INSN = re.compile(r"^0x([0-9a-f]+) <")


@pytest.mark.distro
def test_crash_backtraces_symbols_and_source(dwarf5, distro_dump, tmp_path_factory):
    """crash (Debian's) on the dump: bt -a unwinds the CPUs' tasks through moved
    code, sym gives a moved instruction's source line as the input had it, and
    dis -l of a moved, split function shows each instruction under the source
    line the input had for it. (The lab kernels' tiny configuration is beyond
    crash 8.0.2 even unoptimized: it cannot read their exception stacks. So is
    Debian's cloud flavor: there bt -a is asked to fail as it does unoptimized.)"""
    vmlinux, out, amap, _ = dwarf5
    code = load_code_image(str(amap))
    with ElfImage(vmlinux) as image:
        old = moved_instructions(image, code)
    old = old[len(old) // 3:len(old) // 3 + 1]
    new, _ = code.points(old)
    name = "vfs_read"
    # (crash needs a dump of the unoptimized kernel too: what it makes of that
    # is the measure)
    input_text = _crash(vmlinux, _distro_dump(vmlinux, tmp_path_factory, "input-vmcore"),
                        f"bt -a\ndis -l {name}\n")
    text = _crash(out, distro_dump, f"bt -a\nsym {int(new[0]):#x}\ndis -l {name}\n")
    # bt -a: a backtrace per CPU, through functions of the optimized kernel
    assert len(re.findall(r"^PID: \d+\s+TASK:", text, re.M)) >= 2, text[:3000]
    frames = re.findall(r"#\d+ \[[0-9a-f]+\] (\S+) at ([0-9a-f]+)", text)
    input_frames = re.findall(r"#\d+ \[[0-9a-f]+\] (\S+) at ([0-9a-f]+)", input_text)
    if len(input_frames) >= 4 and "bt: " not in input_text:
        assert len(frames) >= 4 and "bt: " not in text, text[:3000]
    else:   # (crash unwinds neither kernel: it fails on the stacks, not on our code)
        assert "bt: read of stack" in text and "bt: read of stack" in input_text, text[:3000]
    with ElfImage(out) as image:
        # (crash shows GCC's clones and our cold parts by their function's name)
        names = {CLONE.sub("", n) for n in image.symbols.names}
    assert all(CLONE.sub("", f) in names for f, _ in frames), frames
    # sym: the moved instruction's source line is the input's
    want = _symbolize(vmlinux, old)[0][0]
    m = re.search(rf"^{int(new[0]):x} \(\w\) \S+ (\S+): (\d+)", text, re.M)
    assert m and Path(m.group(1)).name == Path(want[1]).name and int(m.group(2)) == want[2], \
        (m and m.group(0), want)
    # dis -l: every instruction under the source line crash gives the same
    # instruction of the unoptimized kernel (crash needs a dump of that one too)
    lines = _dis_lines(text)
    assert len(lines) > 50, text[-3000:]
    before = _dis_lines(input_text)
    addrs = np.array(sorted(lines), np.uint64)
    old_of, ok = code.old_of(addrs)
    assert ok.sum() > 50
    wrong = [(hex(int(a)), lines[int(a)], before.get(int(o)))
             for a, o in zip(addrs[ok], old_of[ok]) if lines[int(a)] != before.get(int(o))]
    assert wrong == [], wrong[:10]


def test_dwarf_it_cannot_read_is_removed_with_a_reason(tmp_path):
    """A unit of a DWARF version this tool does not know: the kernel is still
    optimized, its debug sections are removed, and the summary says why."""
    kernel = lab_kernel("6.1-debug")
    info = tmp_path / "info"
    _dump_section(kernel.vmlinux, ".debug_info", info)
    data = bytearray(info.read_bytes())
    data[4:6] = (9).to_bytes(2, "little")          # the first unit claims DWARF 9
    info.write_bytes(data)
    odd = tmp_path / "vmlinux.odd"
    subprocess.run(["objcopy", "--update-section", f".debug_info={info}", str(kernel.vmlinux),
                    str(odd)], check=True, capture_output=True)
    result = rewrite(odd, tmp_path / "out", RewriteOptions(reorder_blocks="random", seed=1,
                                                           progress=False))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.stripped and "version 9 is not supported" in result.summary()


def test_dwarfdump_verify_sees_a_new_error_only(dwarf4, tmp_path):
    """llvm-dwarfdump --verify runs to the end on GCC's DWARF (call-site checks
    off: LLVM loops on call sites in lexical blocks), the rewritten kernel has no
    error the input lacks, and a range list offset broken on purpose is one."""
    from kbuild_bolt.dwarf.info import walk
    from kbuild_bolt.rewrite.verify_debug import dwarfdump_errors

    vmlinux, out, _, _ = dwarf4
    broken = tmp_path / "broken"
    shutil.copyfile(out, broken)
    with ElfImage(out) as image:
        s, a = image.section(".debug_info"), image.section(".debug_abbrev")
        info = image.read_file_range(s.offset, s.size)
        found = walk(info, image.read_file_range(a.offset, a.size))
    field = next(p for p in found.s_ranges if p >= 0)
    with open(broken, "r+b") as f:
        f.seek(s.offset + field)
        f.write((0x7FFFFFF0).to_bytes(4, "little"))
    before = dwarfdump_errors(str(vmlinux), str(tmp_path))
    assert len(before) > 1000        # GCC's own (LLVM reads GNU operations as errors)
    assert dwarfdump_errors(str(out), str(tmp_path)) <= before
    new = dwarfdump_errors(str(broken), str(tmp_path)) - before
    assert any("range" in msg.lower() for msg, _ in new), new


class _Same(dict):
    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return key


def test_rewrite_refuses_a_stale_line_table(monkeypatch, tmp_path):
    """rewrite's own check (inline chains at a sample of moved instructions) stops
    an output whose line programs still describe the old layout."""
    import kbuild_bolt.dwarf.update as update
    from kbuild_bolt.errors import KbbError

    monkeypatch.setattr(update, "update_lines", lambda data, image: (bytes(data), _Same()))
    kernel = lab_kernel("6.1-debug")
    out = tmp_path / "vmlinux"
    with pytest.raises(KbbError, match="verification of the debug info failed"):
        rewrite(kernel.vmlinux, out, RewriteOptions(reorder_blocks="random", seed=3,
                                                    progress=False))
    assert not out.exists()
