"""What a rewrite does to hold less memory: file pages let go between phases,
big arrays on pages of their own, and whole-kernel checks done in parts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kbuild_bolt.analysis import crosscheck
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.elf.writer import OutputImage

MB = 1 << 20


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_pages_leave_resident_memory_and_read_back_the_same(tmp_path):
    from synthetic_kernel import build

    vmlinux = build(tmp_path)
    # (a big file: the kernel and 24 MB of bytes after it)
    big = tmp_path / "big"
    pad = np.random.default_rng(7).integers(0, 256, 24 * MB, dtype=np.uint8)
    big.write_bytes(vmlinux.read_bytes() + pad.tobytes())
    image = ElfImage(big)
    expected = int(image.bytes.astype(np.uint64).sum())   # reads every page
    before = _rss_file_kb()
    image.release_pages()
    after = _rss_file_kb()
    assert before - after > 20 * 1024, (before, after)
    assert int(image.bytes.astype(np.uint64).sum()) == expected
    assert image.file_backed
    # (bytes held in memory: nothing to let go, and nothing breaks)
    held = ElfImage.from_bytes(vmlinux.read_bytes())
    held.release_pages()
    assert not held.file_backed and held.bytes[:4].tobytes() == b"\x7fELF"


def test_released_output_pages_keep_what_was_written(tmp_path):
    from synthetic_kernel import build

    vmlinux = build(tmp_path)
    image = ElfImage(vmlinux)
    text = image.section(".text")
    out = OutputImage(image, tmp_path / "out")
    out.fill(text.addr, 64, 0xCC)
    out.release_pages()          # (dirty pages: they stay the file's)
    out.write_at(text.addr + 64, b"\x90" * 8)
    out.release_pages()
    path = out.finish()
    written = ElfImage(path).read(text.addr, 72)
    assert written == b"\xcc" * 64 + b"\x90" * 8


def test_relocations_checked_in_parts_find_what_one_pass_finds(tmp_path, monkeypatch):
    from synthetic_kernel import build

    vmlinux = build(tmp_path)
    model = BinaryModel.open(vmlinux)
    total, problems = crosscheck.check_relocations(model)
    assert total > 10 and problems == []
    # A field that disagrees with its relocation, late in .rela.text.
    image = model.image
    rela = next(r for r in image.rela_sections if image.sections[r.info].name == ".text")
    records = image.relocations(rela)
    k = len(records) - 2
    off = int(records["offset"][k]) - image.sections[rela.info].addr \
        + image.sections[rela.info].offset
    data = bytearray(vmlinux.read_bytes())
    data[off] ^= 0x5A
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    whole = crosscheck.check_relocations(BinaryModel.open(bad))
    monkeypatch.setattr(crosscheck, "RELOCATION_PART", 3)
    parts = crosscheck.check_relocations(BinaryModel.open(bad))
    assert parts == whole
    assert whole[0] == total
    assert len(whole[1]) == 1 and f"{rela.name}[{k}]" in whole[1][0]


def test_big_arrays_freed_between_live_ones_go_back_to_the_system():
    # (a process of its own: glibc's threshold moves with what was freed before)
    script = textwrap.dedent("""
        import numpy as np
        from kbuild_bolt.memory import tune_heap
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) // 1024
        if WANT:
            tune_heap()
        first = np.ones(4 << 20, np.uint8); del first    # (raises glibc's threshold)
        base = anon()
        big, small = [], []
        for _ in range(40):
            big.append(np.ones(3 << 20, np.uint8))
            small.append(np.ones(64 << 10, np.uint8))   # (live, between them)
        small.append(np.ones(64 << 10, np.uint8))
        del big
        print(anon() - base)
    """)
    kept = {}
    for want in (False, True):
        run = subprocess.run([sys.executable, "-c", script.replace("WANT", str(want))],
                             capture_output=True, text=True, check=True)
        kept[want] = int(run.stdout.strip())
    if kept[False] < 60:
        pytest.skip(f"this C library gives freed heap memory back on its own ({kept})")
    assert kept[True] < 20, kept


def test_temporaries_at_the_top_of_the_heap_are_not_faulted_in_again():
    # A function's columns (below the mmap threshold) allocated and freed in
    # turn at the top of the heap: kept there, their pages are touched once,
    # not once per allocation. (Against the threshold fixed alone: fixing it
    # also fixes glibc's trim threshold at its 128 KB.)
    script = textwrap.dedent("""
        import resource
        import numpy as np
        from kbuild_bolt import memory
        if WANT:
            memory.tune_heap()
        elif memory._c_library():
            memory._c_library().mallopt(memory._M_MMAP_THRESHOLD, memory.OWN_PAGES_FROM)
        live = [np.ones(1 << 10, np.uint8)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(200):
            column = np.ones(512 << 10, np.uint8)
            del column
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for want in (False, True):
        run = subprocess.run([sys.executable, "-c", script.replace("WANT", str(want))],
                             capture_output=True, text=True, check=True)
        faults[want] = int(run.stdout.strip())
    if faults[False] < 2000:
        pytest.skip(f"this C library keeps the top of its heap on its own ({faults})")
    assert faults[True] < faults[False] // 10, faults


def test_part_of_a_mapping_released_leaves_the_rest_resident(tmp_path):
    import mmap

    from kbuild_bolt.elf.image import release_mapping

    path = tmp_path / "pages"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 16 * MB, np.uint8).tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        before = _rss_file_kb()
        data = np.frombuffer(m, np.uint8)
        assert int(data[::4096].sum()) >= 0          # (every page touched)
        del data
        touched = _rss_file_kb()
        if touched - before < 15 * 1024:
            pytest.skip("the pages read do not show in RssFile here")
        release_mapping(m, 4 * MB + 100, 8 * MB)    # (from its page on: 8 MB and a page)
        released = touched - _rss_file_kb()
        # (a kernel that maps the file by 2 MB folios may drop the ones at the
        # edges whole)
        assert 8 * 1024 <= released <= 12 * 1024, released
        assert bytes(m[4 * MB:4 * MB + 64]) == path.read_bytes()[4 * MB:4 * MB + 64]
