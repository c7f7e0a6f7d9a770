"""Profiles from ``perf script`` text.

With LBR (``perf record -a -e cycles:k -j any,k`` then
``perf script -F pid,ip,brstack``) every sample carries up to 32 branch records
``FROM/TO/P|M/...``, newest first. Each is a transfer; between two consecutive
records the CPU ran straight from the older one's target to the newer one's
source, which gives ranges (as BOLT's perf2bolt does).

Without LBR (``perf script -F ip`` or ``-F pid,ip[,sym]``, e.g. from
``perf record -e cpu-clock``: works on machines without a PMU) each sample is
one instruction hit; block counts come from the hits, edges are inferred.

Addresses are runtime addresses: with KASLR the kernel ran ``text_base -
vmlinux _text`` away from its link address, given on the command line or
read from a saved ``/proc/kallsyms`` (its ``_text`` line).
"""

from __future__ import annotations

import re

import numpy as np

from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import Profile
from kbuild_bolt.profile.thunks import ThunkWays

_BR = re.compile(r"(0x[0-9a-fA-F]+)/(0x[0-9a-fA-F]+)/([PM-])/")
_IP = re.compile(r"^\s*(?:\d+\s+)?([0-9a-fA-F]{8,16})(?:\s|$)")
KERNEL_MIN = 0xFFFF800000000000
MAX_RANGE = 4096


def looks_like(head: bytes) -> bool:
    text = head.decode("ascii", "replace")
    lines = [line for line in text.splitlines()[:20] if line.strip()]
    return bool(lines) and (any(_BR.search(line) for line in lines)
                            or all(_IP.match(line) for line in lines[:5]))


def text_base_from_kallsyms(path) -> int:
    """The running kernel's _text from a saved /proc/kallsyms."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "_text":
                    value = int(parts[0], 16)
                    if value == 0:
                        raise KbbError(f"{path}: _text is 0 (read /proc/kallsyms as root)")
                    return value
    except FileNotFoundError:
        raise KbbError(f"{path}: no such file") from None
    raise KbbError(f"{path}: no _text symbol (not a kallsyms file?)")


def read_perf_script(path, text_base: int | None = None, vmlinux_text: int = 0xFFFFFFFF81000000,
                     kernel_only: bool = True, thunks=None) -> Profile:
    """A Profile in vmlinux addresses from perf script text (LBR or plain samples).
    ``thunks``: (indirect thunk ranges, return thunk ranges) in vmlinux addresses
    (profile.thunks.thunk_ranges): an LBR stack's calls of retpoline thunks are
    followed to their real targets, recorded as transfers from the call."""
    delta = (text_base - vmlinux_text) if text_base is not None else 0
    src, dst, rs, rl = [], [], [], []
    ips = []
    lbr = False
    try:
        f = open(path, errors="replace")
    except FileNotFoundError:
        raise KbbError(f"{path}: no such file") from None
    with f:
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
                    for a, b in reversed(pairs):          # (oldest first)
                        call = ways.step(a, b)
                        if call is not None and (not kernel_only or call[1] >= KERNEL_MIN):
                            src.append(call[0])
                            dst.append(call[1])
                # Newest first: entry i+1 is older; straight line from its target to
                # the source of entry i.
                for i in range(len(pairs) - 1):
                    start, end = pairs[i + 1][1], pairs[i][0]
                    if start <= end <= start + MAX_RANGE and start >= KERNEL_MIN:
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
        profile = Profile(np.array(rs, dtype=np.uint64) - d, np.array(rl, dtype=np.uint64) - d,
                          np.ones(len(rs), np.int64), np.array(src, dtype=np.uint64) - d,
                          np.array(dst, dtype=np.uint64) - d, np.ones(len(src), np.int64),
                          source="perf-lbr")
        return profile.merged()
    if not ips:
        raise KbbError(f"{path}: no kernel samples in this perf script output")
    addr = np.array(ips, dtype=np.uint64) - d
    return Profile(addr, addr.copy(), np.ones(len(addr), np.int64), source="perf-samples",
                   sampled=True).merged()
