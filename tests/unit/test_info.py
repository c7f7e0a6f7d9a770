"""`kbuild-bolt info` on small assembled kernels, and its bad-input errors."""

import json
import subprocess
import sys

import pytest

from elfkit import assemble, tools_available

pytestmark = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")

KERNEL = r"""
    .text
    .globl startup_64
    .type startup_64, @function
startup_64:
    endbr64
1:  call __fentry__
2:  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
3:  lock incl counter(%rip)
4:  ud2
5:  jmp __x86_return_thunk
    .size startup_64, . - startup_64

    .globl second
    .type second, @function
second:
6:  ud2
7:  call *__x86_indirect_thunk_rax
    ret
    .size second, . - second
    .globl alias_of_second
    .type alias_of_second, @function
    .set alias_of_second, second

    .type __pfx_third, @function
__pfx_third:
    .fill 16, 1, 0x90
    .size __pfx_third, 16
    .type third, @function
third:
    ret
    .size third, . - third

    .globl __fentry__, __x86_return_thunk, __x86_indirect_thunk_rax
    .type __fentry__, @function
__fentry__: ret
    .size __fentry__, 1
    .type __x86_return_thunk, @function
__x86_return_thunk: ret
    .size __x86_return_thunk, 1
    .type __x86_indirect_thunk_rax, @function
__x86_indirect_thunk_rax: jmp *%rax
    .size __x86_indirect_thunk_rax, . - __x86_indirect_thunk_rax

    .section .init.text, "ax"
    .type init_fn, @function
init_fn: ret
    .size init_fn, 1

    .data
counter: .long 0
key: .quad 0

    .section __jump_table, "aw"
    .balign 8
    .long 2b - ., 4b - .
    .quad key + 1 - .

    .section .smp_locks, "a"
    .long 3b - .

    .section __bug_table, "a"
    .long 4b - .
    .short 0
    .short 1
    .long 6b - .
    .short 0
    .short 0

    .section .return_sites, "a"
    .long 5b - .
    .section .retpoline_sites, "a"
    .long 7b - .

    .section __mcount_loc, "a"
    .quad 1b
"""


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kbuild_bolt", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return assemble(tmp_path_factory.mktemp("info"), KERNEL, release="6.12.99-elfkit")


def test_info_reports_version_functions_relocations_and_tables(kernel):
    proc = run_cli("info", kernel, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["version"] == "6.12.99-elfkit"
    assert report["arch"] == "x86_64"
    assert report["relocations"]["present"]
    assert report["relocations"]["sections"][".rela.smp_locks"] == 1
    # startup_64, second (+ its alias, counted once), third (not its __pfx_), 3 thunks
    assert report["functions"][".text"] == 6
    assert report["functions"][".init.text"] == 1
    tables = report["tables"]
    assert tables["__jump_table"]["entries"] == 1
    assert tables["__bug_table"]["entries"] == 2
    assert tables["__bug_table"]["entry_size"] == 8   # no file/line: terse layout chosen
    assert tables[".smp_locks"]["entries"] == 1
    assert tables[".smp_locks"]["padding_entries"] == 1023
    assert tables[".return_sites"]["entries"] == 1
    assert tables[".retpoline_sites"]["entries"] == 1
    assert tables["__mcount_loc"]["entries"] == 1
    assert "__ex_table" in tables and tables["__ex_table"]["entries"] == 0
    assert ".parainstructions" not in tables


def test_info_text_output(kernel):
    proc = run_cli("info", kernel)
    assert proc.returncode == 0, proc.stderr
    assert "kernel:      6.12.99-elfkit (x86_64)" in proc.stdout
    assert "__jump_table" in proc.stdout


def test_info_without_relocations_is_reported(tmp_path):
    plain = assemble(tmp_path, KERNEL, ld_args=("-m", "elf_x86_64", "-z", "noexecstack"))
    report = json.loads(run_cli("info", plain, "--json").stdout)
    assert report["relocations"]["present"] is False
    assert any("no relocations" in p for p in report["problems"])


def test_info_without_symbols_is_reported(tmp_path, kernel):
    stripped = tmp_path / "stripped"
    subprocess.run(["objcopy", "--strip-all", str(kernel), str(stripped)], check=True)
    proc = run_cli("info", stripped, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["symbols"] is False
    assert report["version"] == "6.12.99-elfkit"  # from the banner in .rodata
    assert any("no symbol table" in p for p in report["problems"])


def _one_line_error(proc, fragment):
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kbuild-bolt: error: ")
    assert fragment in lines[0]


def test_not_elf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n" * 100)
    _one_line_error(run_cli("info", path), "not an ELF file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    _one_line_error(run_cli("info", path), "not an ELF file")


def test_missing_file(tmp_path):
    _one_line_error(run_cli("info", tmp_path / "nope"), "no such file")


def test_directory(tmp_path):
    _one_line_error(run_cli("info", tmp_path), "is a directory")


def test_truncated(tmp_path, kernel):
    path = tmp_path / "truncated"
    path.write_bytes(kernel.read_bytes()[: kernel.stat().st_size // 2])
    _one_line_error(run_cli("info", path), "truncated")


def test_truncated_header(tmp_path, kernel):
    path = tmp_path / "truncated"
    path.write_bytes(kernel.read_bytes()[:40])
    _one_line_error(run_cli("info", path), "truncated")


def test_32bit(tmp_path):
    elf32 = assemble(tmp_path, "    .text\n    .globl startup_64\nstartup_64: ret\n",
                     banner=False, as_args=("--32",),
                     ld_args=("-m", "elf_i386"), script="SECTIONS { . = 0x1000000; .text : { *(.text) } }")
    _one_line_error(run_cli("info", elf32), "32-bit ELF")


def test_not_x86(tmp_path, kernel):
    data = bytearray(kernel.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")   # e_machine = EM_AARCH64
    path = tmp_path / "arm64"
    path.write_bytes(bytes(data))
    _one_line_error(run_cli("info", path), "AArch64 ELF")


def test_not_a_kernel(tmp_path):
    prog = assemble(tmp_path, "    .text\n    .globl startup_64\nstartup_64: ret\n", banner=False)
    _one_line_error(run_cli("info", prog), "no Linux version banner")
