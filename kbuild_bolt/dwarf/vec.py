"""Bulk byte assembly with numpy: little-endian fields, LEB128 and copied byte runs
written at many positions at once (new lists and line programs are millions of
small records)."""

from __future__ import annotations

import numpy as np

_POW7 = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)


def uleb_size(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.uint64)
    return 1 + (v[:, None] >= _POW7[None, :]).sum(axis=1).astype(np.int64)


_HALF7 = np.array([1 << (7 * k - 1) for k in range(1, 10)], np.int64)


def sleb_size(v: np.ndarray) -> np.ndarray:
    """Bytes of each value as SLEB128: k groups hold -2**(7k-1) <= v < 2**(7k-1)."""
    v = np.asarray(v, np.int64)
    mag = np.where(v < 0, -(v + 1), v)          # the same group count for v and -v-1
    return 1 + (mag[:, None] >= _HALF7[None, :]).sum(axis=1).astype(np.int64)


def put_uleb(buf: np.ndarray, pos: np.ndarray, v: np.ndarray, size: np.ndarray) -> None:
    v = np.asarray(v, np.uint64)
    for k in range(int(size.max()) if len(size) else 0):
        m = size > k
        byte = ((v[m] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(size[m] > k + 1, 0x80, 0).astype(np.uint8)
        buf[pos[m] + k] = byte


def put_sleb(buf: np.ndarray, pos: np.ndarray, v: np.ndarray, size: np.ndarray) -> None:
    u = np.asarray(v, np.int64)
    for k in range(int(size.max()) if len(size) else 0):
        m = size > k
        byte = ((u[m] >> (7 * k)) & 0x7F).astype(np.uint8)
        byte |= np.where(size[m] > k + 1, 0x80, 0).astype(np.uint8)
        buf[pos[m] + k] = byte


_LE = {8: "<u8", 4: "<u4", 2: "<u2", 1: "u1"}


def put_le(buf: np.ndarray, pos: np.ndarray, v: np.ndarray, size: int) -> None:
    if not len(pos):
        return
    raw = np.asarray(v).astype(_LE[size]).view(np.uint8).reshape(-1, size)
    buf[np.asarray(pos, np.int64)[:, None] + np.arange(size)] = raw


def get_le(buf: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
    """The little-endian ``size``-byte fields of ``buf`` (uint8) at ``pos``, as uint64."""
    raw = np.ascontiguousarray(buf[np.asarray(pos, np.int64)[:, None] + np.arange(size)])
    return raw.view(_LE[size]).ravel().astype(np.uint64)


def copy_runs(buf: np.ndarray, dst: np.ndarray, src: np.ndarray, src_pos: np.ndarray,
              length: np.ndarray) -> None:
    """buf[dst[i]:dst[i]+length[i]] = src[src_pos[i]:...] for every i: byte k of
    every run at a time (runs are short: memory stays O(runs)), the few long
    runs' tails one by one."""
    length = np.asarray(length, np.int64)
    dst = np.asarray(dst, np.int64)
    src_pos = np.asarray(src_pos, np.int64)
    live = np.flatnonzero(length > 0)
    k = 0
    while len(live) and k < 32:
        buf[dst[live] + k] = src[src_pos[live] + k]
        k += 1
        live = live[length[live] > k]
    for i in live.tolist():
        a, n = int(src_pos[i]), int(length[i])
        buf[int(dst[i]) + k:int(dst[i]) + n] = src[a + k:a + n]


def exclusive_cumsum_by_group(size: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Offset of each record inside its group (groups contiguous, in order)."""
    cs = np.cumsum(size) - size
    if not len(size):
        return cs
    first = np.r_[True, group[1:] != group[:-1]]
    base = np.maximum.accumulate(np.where(first, cs, 0))
    return cs - base
