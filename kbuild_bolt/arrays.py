"""Array helpers every layer uses (numpy, no kernel or ELF knowledge)."""

from __future__ import annotations

import contextlib
import io
import mmap
import zipfile
import zlib

import numpy as np


def concat_ranges(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``lo[k], lo[k] + 1, ..., lo[k] + counts[k] - 1`` for every k, one after another
    (int64; the ranges of millions of runs without a Python loop)."""
    lo = np.asarray(lo).astype(np.int64)
    counts = np.asarray(counts).astype(np.int64)
    return np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))


def in_sorted(haystack: np.ndarray, needles) -> np.ndarray:
    """``np.isin`` for a sorted ``haystack``: a binary search instead of hashing
    millions of values."""
    needles = np.asarray(needles, dtype=haystack.dtype)
    if not len(haystack):
        return np.zeros(len(needles), bool)
    i = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return haystack[i] == needles


class NotStoredNpz(Exception):
    """An archive np.load reads, but not as stored arrays of a known header."""


def read_stored_npz(path) -> dict[str, np.ndarray]:
    """The arrays of an .npz that np.savez wrote, read from the mapped file: each
    member is stored, its CRC checked as unzipping would, its array copied out
    once (np.load reads each through zipfile's buffers: four times as long)."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        members = archive.infolist()
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return {member.filename[:-4]: _stored_array(data, member) for member in members}
    finally:
        with contextlib.suppress(BufferError):   # (a view still held by a traceback)
            data.close()


def _stored_array(data, member: zipfile.ZipInfo) -> np.ndarray:
    """The array of one stored .npy member of the mapped archive ``data``, a copy."""
    if member.compress_type != zipfile.ZIP_STORED or not member.filename.endswith(".npy"):
        raise NotStoredNpz(member.filename)
    head = member.header_offset
    if data[head:head + 4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("no local header")
    name_len, extra_len = np.frombuffer(data, "<u2", 2, head + 26).tolist()
    start = head + 30 + name_len + extra_len
    end = start + member.file_size
    if end > len(data) or zlib.crc32(memoryview(data)[start:end]) != member.CRC:
        raise zipfile.BadZipFile(f"{member.filename}: damaged")
    npy = io.BytesIO(data[start:start + min(member.file_size, 4096)])
    version = np.lib.format.read_magic(npy)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(npy)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(npy)
    else:
        raise NotStoredNpz(member.filename)
    if dtype.hasobject or fortran:
        raise NotStoredNpz(member.filename)
    count = int(np.prod(shape, dtype=np.int64))
    offset = start + npy.tell()
    if offset + count * dtype.itemsize > end:
        raise ValueError(f"{member.filename}: shorter than its header says")
    # (copied out: views would keep the whole file mapped, and in this
    # process's memory, after the rewrite has dropped what it no longer needs)
    return np.frombuffer(data, dtype, count, offset).reshape(shape).copy()
