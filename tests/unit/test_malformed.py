"""Malformed ELF structures and self-contradicting kernels: one line naming the
structure and entry, exit 2, no output; never an internal error."""

import subprocess
import sys

import numpy as np
import pytest

from elfkit import tools_available
from kbuild_bolt.elf.image import RELA, SYM, ElfImage
from synthetic_kernel import build

pytestmark = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("malformed"))


def rewrite(path, out):
    return subprocess.run([sys.executable, "-m", "kbuild_bolt", "rewrite", str(path), "-o",
                           str(out), "--reorder-blocks", "reverse", "-q"],
                          capture_output=True, text=True)


def refused(proc, out, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kbuild-bolt: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def patched(kernel, tmp_path, section_name, dtype, index, **values):
    """A copy of ``kernel`` with record ``index`` of a section changed."""
    image = ElfImage(kernel)
    section = image.section(section_name)
    data = bytearray(kernel.read_bytes())
    record = np.frombuffer(bytes(data[section.offset:section.offset + section.size]),
                           dtype).copy()
    for name, value in values.items():
        record[index][name] = value
    data[section.offset:section.offset + section.size] = record.tobytes()
    path = tmp_path / "bad"
    path.write_bytes(bytes(data))
    return path


def test_relocation_symbol_out_of_range(kernel, tmp_path):
    r = ElfImage(kernel).relocations(ElfImage(kernel).section(".rela.text"))
    info = (np.uint64(10 ** 8) << np.uint64(32)) | (r["info"][3] & np.uint64(0xFFFFFFFF))
    bad = patched(kernel, tmp_path, ".rela.text", RELA, 3, info=info)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", ".rela.text[3]",
            "symbol index 100000000")


@pytest.mark.parametrize("rtype, says", [(9, "R_X86_64_GOTPCREL is not supported"),
                                         (200, "unknown relocation type 200")])
def test_relocation_type(kernel, tmp_path, rtype, says):
    r = ElfImage(kernel).relocations(ElfImage(kernel).section(".rela.text"))
    info = (r["info"][0] & ~np.uint64(0xFFFFFFFF)) | np.uint64(rtype)
    bad = patched(kernel, tmp_path, ".rela.text", RELA, 0, info=info)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", ".rela.text[0]", says)


def test_relocation_outside_its_section(kernel, tmp_path):
    bad = patched(kernel, tmp_path, ".rela.text", RELA, 1, offset=0x10)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", ".rela.text[1]",
            "offset 0x10 is outside .text")


def test_relocation_disagreeing_with_its_field(kernel, tmp_path):
    """A record that names another target than the bytes hold: caught before any
    work (rewriting would write the record's value into code)."""
    r = ElfImage(kernel).relocations(ElfImage(kernel).section(".rela.text"))
    bad = patched(kernel, tmp_path, ".rela.text", RELA, 2, addend=int(r["addend"][2]) + 0x40)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", ".rela.text[2]",
            "relocation says", "the input's relocations disagree with its code")


def test_symbol_value_outside_everything(kernel, tmp_path):
    image = ElfImage(kernel)
    index = image.symbols.index("startup_64")
    bad = patched(kernel, tmp_path, ".symtab", SYM, index, value=0x1234)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", f".symtab[{index}]",
            "lies outside its section .text")


def test_symbol_section_out_of_range(kernel, tmp_path):
    image = ElfImage(kernel)
    index = image.symbols.index("second")
    bad = patched(kernel, tmp_path, ".symtab", SYM, index, shndx=0x7777)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", f".symtab[{index}]",
            "no such section")


def test_symbol_name_past_the_string_table(kernel, tmp_path):
    bad = patched(kernel, tmp_path, ".symtab", SYM, 5, name=0x7FFFFFFF)
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", ".symtab[5]",
            "name offset past the string table")


def test_section_past_the_end_of_the_file(kernel, tmp_path):
    image = ElfImage(kernel)
    shdrs = image.shdrs.copy()
    text = image.section(".text").index
    shdrs["offset"][text] = image.size
    data = bytearray(kernel.read_bytes())
    shoff = int(image.header["shoff"])
    data[shoff:shoff + shdrs.nbytes] = shdrs.tobytes()
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    refused(rewrite(bad, tmp_path / "out"), tmp_path / "out", "truncated (.text ends past")


def test_table_disagreeing_with_the_code_is_refused_before_the_work(tmp_path):
    """An input whose own table points into the middle of an instruction."""
    body = "    .section .smp_locks, \"a\"\n    .long .Llock + 1 - .\n"
    bad = build(tmp_path, replace={"smp_locks": body})
    proc = rewrite(bad, tmp_path / "out")
    refused(proc, tmp_path / "out", ".smp_locks[0]",
            "the input's own table disagrees with its code")


@pytest.mark.parametrize("forked", [True, False], ids=["two-cpus", "one-cpu"])
def test_verification_reports_relocations_of_code_and_of_data(kernel, tmp_path, monkeypatch,
                                                              forked):
    """Verification checks the relocations of the code in its decoding process
    and the others beside it: a record that disagrees with its field is reported
    either way, and with one CPU."""
    from kbuild_bolt.rewrite import verify as verify_module

    if not forked:
        monkeypatch.setattr(verify_module, "default_jobs", lambda: 1)
    assert verify_module.verify(kernel, against=kernel).ok
    for section in (".rela.text", ".rela.rodata"):
        r = ElfImage(kernel).relocations(ElfImage(kernel).section(section))
        bad = patched(kernel, tmp_path, section, RELA, 0, addend=int(r["addend"][0]) + 0x40)
        report = verify_module.verify(bad, against=kernel)
        assert [p for p in report.problems if f"{section}[0]" in p and "relocation says" in p], \
            report.problems
