"""OutputImage.repack lays out again, in the finished file itself, the sections
after the loadable part: emptied, replaced by longer or shorter bytes, moved
down or up (in small chunks here, so moves overlap their own bytes), and the
file reads as the same ELF with just those changes."""

import numpy as np
import pytest

from elfkit import assemble, tools_available
from kbuild_bolt.elf import writer
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.elf.writer import OutputImage
from synthetic_kernel import CODE, TABLES

needs_as = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")


@pytest.fixture(scope="module")
def vmlinux(tmp_path_factory):
    return assemble(tmp_path_factory.mktemp("repack"), CODE + "".join(TABLES.values()))


def tail_sections(image):
    """The non-allocated sections with bytes after the loadable part, in file order."""
    keep_end = max(s.offset + s.size for s in image.sections if s.is_alloc and s.has_bits)
    return sorted((s for s in image.sections[1:] if not s.is_alloc and s.offset >= keep_end
                   and s.size), key=lambda s: s.offset), keep_end


def before_bytes(path, section) -> bytes:
    return path.read_bytes()[section.offset:section.offset + section.size]


@needs_as
@pytest.mark.parametrize("case", ["grow first", "grow first a little", "shrink first a little",
                                  "empty first", "shrink and grow", "as is"])
def test_repack_moves_sections_in_place(vmlinux, tmp_path, monkeypatch, case):
    monkeypatch.setattr(writer._move_in_file, "__defaults__", (7,))     # (7-byte chunks)
    image = ElfImage(vmlinux)
    tail, keep_end = tail_sections(image)
    assert len(tail) >= 3
    first, middle, last = tail[0], tail[len(tail) // 2], tail[-1]
    empty, replace, info = set(), {}, {}
    if case == "grow first":
        replace[first.index] = bytes(range(256)) * (first.size // 64 + 3)
    elif case == "grow first a little":      # (each later section moves over itself)
        replace[first.index] = before_bytes(vmlinux, first) + bytes(8)
    elif case == "shrink first a little":
        replace[first.index] = before_bytes(vmlinux, first)[:-8]
    elif case == "empty first":
        empty.add(first.index)
    elif case == "shrink and grow":
        replace[first.index] = b"\x5a" * max(1, first.size // 3)
        replace[last.index] = b"\xa5" * (last.size * 2 + 13)
        info[middle.index] = 77
    out = OutputImage(image, tmp_path / "out")
    path = out.finish()
    out.repack(empty=empty, replace=replace, info=info)
    before = vmlinux.read_bytes()
    after = path.read_bytes()
    # The loadable part is as it was (but for e_shoff).
    assert after[:0x28] == before[:0x28] and after[0x30:keep_end] == before[0x30:keep_end]
    # (the headers read as they are: the changes here need not make sense to a reader)
    shoff = int.from_bytes(after[0x28:0x30], "little")
    headers = np.frombuffer(after, image.shdrs.dtype, len(image.shdrs), shoff)
    assert len(after) == shoff + image.shdrs.nbytes      # (the header table last)
    ends = []
    for s in image.sections[1:]:
        t = headers[s.index]
        offset, size = int(t["offset"]), int(t["size"])
        if s.is_alloc or not s.size or s.offset < keep_end:
            assert (offset, size) == (s.offset, s.size), s.name
            continue
        want = b"" if s.index in empty else replace.get(s.index,
                                                         before[s.offset:s.offset + s.size])
        assert after[offset:offset + size] == want, s.name
        ends.append((offset, offset + size))
    for field in ("name", "type", "flags", "addr", "link", "addralign", "entsize"):
        assert np.array_equal(headers[field], image.shdrs[field]), field
    expected_info = image.shdrs["info"].copy()
    for index, value in info.items():
        expected_info[index] = value
    assert np.array_equal(headers["info"], expected_info)
    # Between the sections, zeros.
    ends.sort()
    for (_, a), (b, _) in zip([(0, keep_end)] + ends, ends + [(shoff, shoff)]):
        assert a <= b and not any(after[a:b]), (a, b)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_without_holes(tmp_path, monkeypatch, kernel_copy):
    """The output starts as the input's bytes but for the ranges left as holes
    (zeros), copied by the kernel or, where it cannot, read and written."""
    if not kernel_copy:
        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(writer.os, "copy_file_range", refuse)
    data = np.random.default_rng(1).integers(0, 256, 3_000_001, np.uint8).tobytes()
    (tmp_path / "in").write_bytes(data)
    (tmp_path / "out").write_bytes(b"")
    holes = [(10, 20), (15, 1000), (2_000_000, 2_500_000), (2_999_990, 3_000_001)]
    writer._copy_without(tmp_path / "in", tmp_path / "out", len(data), holes)
    want = bytearray(data)
    for lo, hi in holes:
        want[lo:hi] = bytes(hi - lo)
    assert (tmp_path / "out").read_bytes() == bytes(want)
