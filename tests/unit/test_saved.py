"""A stored .npz (the kept analysis, kept orders) read from the mapped file: the same arrays np.load gives,
a damaged member refused, an archive of another kind still read."""

import zipfile

import numpy as np
import pytest

from kbuild_bolt.arrays import NotStoredNpz, read_stored_npz


def _arrays():
    rng = np.random.default_rng(1)
    return {"a": rng.integers(0, 255, 1000).astype(np.uint8),
            "b": rng.integers(-5, 5, (30, 4)).astype(np.int64),
            "empty": np.zeros(0, np.uint64), "flags": rng.random(77) > 0.5}


def test_stored_arrays_read_in_place_are_np_load_s(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, **_arrays())
    got = read_stored_npz(path)
    with np.load(path) as want:
        assert set(got) == set(want.files)
        for name in want.files:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert np.array_equal(got[name], want[name]), name
    assert got["a"].flags.writeable and got["a"].flags.owndata   # (not a view of the file)


def test_a_changed_byte_in_a_member_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, **_arrays())
    data = bytearray(path.read_bytes())
    at = data.index(bytes(_arrays()["a"][:16]))
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile):
        read_stored_npz(path)


def test_a_compressed_archive_is_read_by_np_load(tmp_path):
    path = tmp_path / "x.npz"
    np.savez_compressed(path, **_arrays())
    with pytest.raises(NotStoredNpz):
        read_stored_npz(path)
