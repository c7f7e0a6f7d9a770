"""The GNU build-id note: found among other notes, hashed over the file with its own
bytes zeroed, written in place."""

import hashlib
import struct
from types import SimpleNamespace

from kbuild_bolt.elf.notes import SHT_NOTE, build_id, compute, stamp


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def image_of(path, offset, data, addr=0xffffffff81000100):
    section = SimpleNamespace(name=".notes", type=SHT_NOTE, size=len(data), offset=offset,
                              addr=addr, is_alloc=True)
    return SimpleNamespace(sections=[section],
                           section_data=lambda s: memoryview(path.read_bytes())[
                               s.offset:s.offset + s.size])


def test_build_id_is_found_after_other_notes_and_stamped(tmp_path):
    notes = note(b"Xen\0", 0x13, b"\1\2\3\4\5\6") + note(b"GNU\0", 3, bytes(range(20)))
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60) + notes + b"tail")
    found = build_id(image_of(path, 64, notes))
    desc_at = 64 + 12 + 4 + 8 + 12 + 4
    assert found.offset == desc_at and found.size == 20 and found.value == bytes(range(20))
    assert found.addr == 0xffffffff81000100 + desc_at - 64
    # The hash reads the descriptor as zeros: the same before and after stamping.
    raw = bytearray(path.read_bytes())
    raw[desc_at:desc_at + 20] = bytes(20)
    expected = hashlib.sha1(bytes(raw)).digest()
    assert compute(path, found) == expected
    assert stamp(path, found) == expected
    assert path.read_bytes()[desc_at:desc_at + 20] == expected
    assert compute(path, build_id(image_of(path, 64, notes))) == expected
    # Small chunks give the same hash (the descriptor may straddle two reads).
    assert compute(path, found, chunk=7) == expected


def test_no_build_id_note():
    notes = note(b"Linux\0", 1, b"\0\0\0\0")
    section = SimpleNamespace(name=".notes", type=SHT_NOTE, size=len(notes), offset=0, addr=0,
                              is_alloc=False)
    image = SimpleNamespace(sections=[section], section_data=lambda s: memoryview(notes))
    assert build_id(image) is None
