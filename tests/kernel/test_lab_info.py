"""`kbuild-bolt info` on real kernels, cross-checked against readelf.

Every table's entry count must agree with the size readelf gives for its
section or with its __start_/__stop_ symbols, and with the number of
relocations --emit-relocs left inside it (one per pointer field of every entry).
"""

import bisect
import json
import subprocess
import sys

import pytest

import readelf
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.kernel.tables import specs_for

# Tables every lab kernel has, per flavor (absent ones would be a regression).
EXPECTED = {
    "6.12-regular": {"__jump_table", ".static_call_sites", ".altinstructions", ".smp_locks",
                     "__ex_table", "__bug_table", ".orc_unwind_ip", ".orc_unwind", ".orc_header",
                     "__mcount_loc", ".pci_fixup", "__ksymtab", "__ksymtab_gpl", "__kcrctab",
                     "__kcrctab_gpl", "kallsyms"},
    "6.12-hardened": {".retpoline_sites", ".return_sites", ".call_sites", ".ibt_endbr_seal"},
    "6.1-regular": {"__jump_table", ".static_call_sites", ".altinstructions", ".parainstructions",
                    ".smp_locks", "__ex_table", "__bug_table", ".orc_unwind_ip", ".orc_unwind",
                    "__mcount_loc", ".pci_fixup", "__ksymtab", "__ksymtab_gpl", "kallsyms"},
    "distro": {"__jump_table", ".static_call_sites", ".altinstructions", ".parainstructions",
               ".smp_locks", "__ex_table", "__bug_table", ".orc_unwind_ip", ".orc_unwind",
               ".retpoline_sites", ".return_sites", "__mcount_loc", ".pci_fixup", "__ksymtab",
               "__ksymtab_gpl", "__kcrctab", "__kcrctab_gpl", "kallsyms"},
}
EXPECTED["6.12-hardened"] |= EXPECTED["6.12-regular"]


def info(path):
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "info", "--json", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_report(report, path, release, expected):
    assert report["version"] == release
    assert report["arch"] == "x86_64"
    assert report["symbols"] is True
    assert report["relocations"]["present"] is True
    assert expected <= set(report["tables"]), expected - set(report["tables"])

    sections = readelf.sections(path)
    values = readelf.symbol_values(path)
    assert report["text_size"] == sections[".text"][3]
    for rela, count in report["relocations"]["sections"].items():
        assert sections[rela][3] // 24 == count, rela

    # Functions: distinct FUNC addresses in .text (prefix symbols are padding).
    text_index = str(sections[".text"][0])
    starts = {v for v, _s, kind, _b, ndx, name in readelf.symbols(path)
              if kind == "FUNC" and ndx == text_index
              and not name.startswith(("__pfx_", "__cfi_"))}
    assert report["functions"][".text"] == len(starts)
    assert report["functions"][".text"] > 10000

    relocs = readelf.relocations(path)
    rela_by_target = {}
    for name, offsets in relocs.items():
        rela_by_target[name] = sorted(o for o, _t in offsets)

    with ElfImage(path) as image:
        by_name = {spec.name: spec for spec in specs_for(image)}
    for name, table in report["tables"].items():
        if name == "kallsyms":
            assert table["entries"] > 1000
            continue
        spec = by_name[name]
        slots = table["entries"] + table.get("padding_entries", 0)
        if table["located_by"] == "symbols":
            size = values[spec.bounds.stop] - values[spec.bounds.start]
            start = values[spec.bounds.start]
        else:
            start, size = sections[spec.bounds.section][2], sections[spec.bounds.section][3]
        assert start == table["address"], name
        assert size == slots * table["entry_size"], name

        # One relocation per pointer field of every real entry.
        layout = next(l for l in spec.layouts(tuple(map(int, release.split(".")[:2])))
                      if l.entry_size == table["entry_size"])
        pointers = sum(f.is_pointer for f in layout.fields)
        end = start + table["entries"] * table["entry_size"]
        # A null pointer field (0 with null_if_zero) has no relocation.
        nulls = 0
        if any(f.null_if_zero for f in layout.fields):
            with ElfImage(path) as image:
                rows = image.array_at(start, layout.dtype, table["entries"])
                nulls = sum(int((rows[f.name] == 0).sum()) for f in layout.fields
                            if f.null_if_zero)
        inside = 0
        for offsets in rela_by_target.values():
            inside += bisect.bisect_left(offsets, end) - bisect.bisect_left(offsets, start)
        own = relocs.get(".rela" + name, [])
        if inside == 0 and own and all(t == "R_X86_64_NONE" for _o, t in own):
            # 6.1's sorttable sorts __ex_table in place and zeroes its relocation
            # records (they would describe other slots afterwards); the count stays.
            assert name == "__ex_table", name
            assert len(own) == table["entries"] * pointers - nulls, (name, len(own))
            continue
        assert inside == table["entries"] * pointers - nulls, \
            (name, inside, table["entries"], pointers, nulls)


def test_info_lab(lab):
    report = info(lab.vmlinux)
    check_report(report, lab.vmlinux, lab.release, EXPECTED[lab.name])


def test_info_lab_stripped_vmlinux_has_no_relocations(lab):
    report = info(lab.vmlinux_stripped)
    if lab.series == "6.12":
        assert report["relocations"]["present"] is False
        assert any("no relocations" in p for p in report["problems"])
    else:  # 6.1 keeps them in vmlinux
        assert report["relocations"]["present"] is True


@pytest.mark.distro
def test_info_distro(distro):
    report = info(distro.vmlinux)
    check_report(report, distro.vmlinux, distro.release, EXPECTED["distro"])
    assert report["functions"][".text"] > 40000
