"""Where a retpoline call goes on its way: the thunks, for profile readers.

A call of ``__x86_indirect_thunk_<reg>`` reaches its real target through the
thunk (and, on CPUs that need one, a return thunk), code every such call site
shares; a reader that sees the call's way in order (the QEMU plugin, an LBR
stack) follows it there and records the call's real target.
"""

from __future__ import annotations

from kbuild_bolt.x86.patterns import INDIRECT_THUNK_PREFIXES, RETURN_THUNK

# A call of an indirect thunk starts the way; the return thunks are passed through.
PASSED_THROUGH = (RETURN_THUNK, "retbleed_return_thunk", "srso_return_thunk",
                  "srso_alias_return_thunk", "__x86_return_skl", "call_depth_return_thunk")
KERNEL_MIN = 0xFFFF800000000000


def thunk_ranges(image) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """([lo, hi) of the indirect thunks, [lo, hi) of the return thunks) of an
    ElfImage, merged into runs."""
    symbols = image.symbols
    names, values, sizes = symbols.names, symbols.value, symbols.size
    out = []
    for prefixes in (INDIRECT_THUNK_PREFIXES, PASSED_THROUGH):
        spans = sorted((int(values[i]), int(values[i]) + (int(sizes[i]) or 32))
                       for i, n in enumerate(names)
                       if n.startswith(prefixes) and int(values[i]) >= KERNEL_MIN)
        out.append(_runs(spans))
    return out[0], out[1]


def _runs(spans: list[tuple[int, int]], gap: int = 64) -> list[tuple[int, int]]:
    runs = []
    for lo, hi in spans:
        if runs and lo <= runs[-1][1] + gap:
            runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
        else:
            runs.append((lo, hi))
    return runs


class ThunkWays:
    """Follows branches, oldest first, through the thunks: ``step(src, dst)``
    returns (call site, real target) when a followed call leaves them."""

    def __init__(self, thunks, vias, delta: int = 0):
        self.thunks = [(lo + delta, hi + delta) for lo, hi in thunks]
        self.passed = self.thunks + [(lo + delta, hi + delta) for lo, hi in vias]
        self.site = None

    @staticmethod
    def _in(ranges, addr: int) -> bool:
        return any(lo <= addr < hi for lo, hi in ranges)

    def step(self, src: int, dst: int):
        if self.site is not None:
            if self._in(self.passed, src):
                if not self._in(self.passed, dst):
                    site, self.site = self.site, None
                    return site, dst
                return None
            self.site = None            # (the way was cut: an interrupt, a lost record)
        if self._in(self.thunks, dst) and not self._in(self.passed, src):
            self.site = src
        return None
