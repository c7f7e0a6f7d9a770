"""The perf script reader kbuild-bolt had before issue 14 part 3 (one regular
expression a line, lists, np.unique over rows): the oracle of
tests/unit/test_perf_reader.py and the baseline of benchmarks/bench_perf.py."""

from __future__ import annotations

import re

import numpy as np

from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import Profile
from kbuild_bolt.profile.thunks import ThunkWays

TEXT = 0xFFFFFFFF81000000
KERNEL_MIN = 0xFFFF800000000000

_BR = re.compile(r"(0x[0-9a-fA-F]+)/(0x[0-9a-fA-F]+)/([PM-])/")
_IP = re.compile(r"^\s*(?:\d+\s+)?([0-9a-fA-F]{8,16})(?:\s|$)")


def reference_sum(a, b, counts):
    """Profile.merged() before: np.unique over rows."""
    if not len(a):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    uniq, inv = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True)
    total = np.bincount(inv.ravel(), weights=counts, minlength=len(uniq)).astype(np.int64)
    return uniq[:, 0].copy(), uniq[:, 1].copy(), total


def reference_read(path, text_base=None, vmlinux_text=TEXT, kernel_only=True, thunks=None):
    delta = (text_base - vmlinux_text) if text_base is not None else 0
    src, dst, rs, rl, ips = [], [], [], [], []
    lbr = False
    with open(path, errors="replace") as f:
        for line in f:
            records = _BR.findall(line)
            if records:
                lbr = True
                pairs = [(int(a, 16), int(b, 16)) for a, b, _ in records]
                for a, b in pairs:
                    if not kernel_only or (a >= KERNEL_MIN and b >= KERNEL_MIN):
                        src.append(a)
                        dst.append(b)
                if thunks is not None:
                    ways = ThunkWays(*thunks, delta=delta)
                    for a, b in reversed(pairs):
                        call = ways.step(a, b)
                        if call is not None and (not kernel_only or call[1] >= KERNEL_MIN):
                            src.append(call[0])
                            dst.append(call[1])
                for i in range(len(pairs) - 1):
                    start, end = pairs[i + 1][1], pairs[i][0]
                    if start <= end <= start + 4096 and start >= KERNEL_MIN:
                        rs.append(start)
                        rl.append(end)
                continue
            m = _IP.match(line)
            if m:
                ip = int(m.group(1), 16)
                if not kernel_only or ip >= KERNEL_MIN:
                    ips.append(ip)
    d = np.uint64(delta & 0xFFFFFFFFFFFFFFFF)
    if lbr:
        r = reference_sum(np.array(rs, np.uint64) - d, np.array(rl, np.uint64) - d,
                          np.ones(len(rs), np.int64))
        t = reference_sum(np.array(src, np.uint64) - d, np.array(dst, np.uint64) - d,
                          np.ones(len(src), np.int64))
        return Profile(*r, *t, source="perf-lbr")
    if not ips:
        raise KbbError(f"{path}: no kernel samples in this perf script output")
    addr = np.array(ips, np.uint64) - d
    r = reference_sum(addr, addr, np.ones(len(addr), np.int64))
    return Profile(*r, source="perf-samples", sampled=True)
