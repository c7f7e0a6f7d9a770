"""The profile: where the kernel ran, as ranges and transfers of control.

Every source (QEMU traces, perf LBR, perf samples, BOLT .fdata) is turned into
the same two kinds of records, in vmlinux addresses:

- a *range* ``(start, last, count)``: straight-line execution from the
  instruction at ``start`` through the instruction at ``last``, ``count`` times
  (a QEMU translation block, the code between two LBR entries, a sampled
  instruction as a one-instruction range);
- a *transfer* ``(src, dst, count)``: control went from the instruction at
  ``src`` to ``dst`` (a taken branch, or a fall-through between two ranges).

The file format (``kbuild-bolt profile v1``) is plain text, one record per line:

    # kbuild-bolt profile v1
    kernel 6.12.117
    source qemu
    R <start> <last> <count>
    B <src> <dst> <count>
    H <function> <hash> <address> <size>
    K <block offset> <block size> <block hash>
    S <name> <value>

addresses, offsets and hashes in hex, counts in decimal; ``H`` and the ``K``
lines after it describe a function the profile saw (code hashes with addresses
masked), so the profile can be applied to a rebuilt kernel (stale profiles).
``S`` lines are counters of the run the recorder measured besides the code
(``l1i_fetches``/``l1i_misses``: the QEMU recorder's simulated L1i).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.shapes import parse_shapes, write_shapes

MAGIC = "# kbuild-bolt profile v1"


def _sum_pairs(a: np.ndarray, b: np.ndarray, counts: np.ndarray):
    """Distinct (a, b) pairs, sorted, with the counts of equal pairs summed."""
    uniq, inv = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True)
    total = np.bincount(inv.ravel(), weights=counts, minlength=len(uniq)).astype(np.int64)
    return uniq[:, 0].copy(), uniq[:, 1].copy(), total


@dataclass
class Profile:
    range_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    range_last: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    range_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    dst: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    kernel: str = ""
    source: str = ""
    shapes: dict = field(default_factory=dict)   # name@address -> shapes.FunctionShape
    # Samples without branch records (perf without LBR): instruction hits only.
    sampled: bool = False
    # Share of a stale profile's counts that could be moved onto this kernel.
    used: float | None = None
    # Counters of the run (name -> value): combined like the counts.
    stats: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.range_count.sum())

    def merged(self) -> "Profile":
        """Identical records summed."""
        out = Profile(kernel=self.kernel, source=self.source, shapes=dict(self.shapes),
                      sampled=self.sampled, stats=dict(self.stats))
        if len(self.range_start):
            out.range_start, out.range_last, out.range_count = _sum_pairs(
                self.range_start, self.range_last, self.range_count)
        if len(self.src):
            out.src, out.dst, out.count = _sum_pairs(self.src, self.dst, self.count)
        return out

    def shifted(self, delta: int) -> "Profile":
        """Addresses moved by ``-delta`` (runtime KASLR address -> vmlinux address)."""
        d = np.uint64(delta & 0xFFFFFFFFFFFFFFFF)
        return Profile(self.range_start - d, self.range_last - d, self.range_count.copy(),
                       self.src - d, self.dst - d, self.count.copy(), self.kernel, self.source,
                       dict(self.shapes), self.sampled, stats=dict(self.stats))

    def scaled(self, factor: float) -> "Profile":
        return Profile(self.range_start, self.range_last,
                       np.round(self.range_count * factor).astype(np.int64), self.src, self.dst,
                       np.round(self.count * factor).astype(np.int64), self.kernel, self.source,
                       dict(self.shapes), self.sampled,
                       stats={k: round(v * factor) for k, v in self.stats.items()})


def combine(profiles: list[Profile], weights: list[float] | None = None) -> Profile:
    """Sum of several profiles (weights scale each one: -1 subtracts)."""
    if not profiles:
        return Profile()
    weights = weights or [1.0] * len(profiles)
    parts = [p.scaled(w) if w != 1 else p for p, w in zip(profiles, weights)]
    out = Profile(
        np.concatenate([p.range_start for p in parts]),
        np.concatenate([p.range_last for p in parts]),
        np.concatenate([p.range_count for p in parts]),
        np.concatenate([p.src for p in parts]),
        np.concatenate([p.dst for p in parts]),
        np.concatenate([p.count for p in parts]),
        profiles[0].kernel, "+".join(sorted({p.source for p in profiles if p.source})),
        {k: v for p in profiles for k, v in p.shapes.items()},
        any(p.sampled for p in profiles),
    ).merged()
    names = set.intersection(*(set(p.stats) for p in parts)) if parts else set()
    out.stats = {k: max(0, sum(p.stats[k] for p in parts)) for k in sorted(names)}
    # Differences of two noisy runs can go slightly negative: clip.
    out.range_count = np.maximum(out.range_count, 0)
    out.count = np.maximum(out.count, 0)
    keep = out.range_count > 0
    out.range_start, out.range_last, out.range_count = (out.range_start[keep],
                                                         out.range_last[keep],
                                                         out.range_count[keep])
    keep = out.count > 0
    out.src, out.dst, out.count = out.src[keep], out.dst[keep], out.count[keep]
    return out


def write_profile(profile: Profile, path) -> None:
    lines = [MAGIC]
    if profile.kernel:
        lines.append(f"kernel {profile.kernel}")
    if profile.source:
        lines.append(f"source {profile.source}")
    if profile.sampled:
        lines.append("sampled")
    for s, l, c in zip(profile.range_start.tolist(), profile.range_last.tolist(),
                       profile.range_count.tolist()):
        lines.append(f"R {s:x} {l:x} {c}")
    for s, d, c in zip(profile.src.tolist(), profile.dst.tolist(), profile.count.tolist()):
        lines.append(f"B {s:x} {d:x} {c}")
    for name, value in profile.stats.items():
        lines.append(f"S {name} {int(value)}")
    lines += write_shapes(profile.shapes)
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_profile(path) -> Profile:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise KbbError(f"{path}: no such profile") from None
    except UnicodeDecodeError:
        raise KbbError(f"{path}: not a text profile") from None
    if not text.startswith(MAGIC):
        raise KbbError(f"{path}: not a kbuild-bolt profile")
    rs, rl, rc, bs, bd, bc = [], [], [], [], [], []
    shape_lines = []
    profile = Profile()
    for n, line in enumerate(text.splitlines()[1:], 2):
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            tag = parts[0]
            if tag == "R":
                rs.append(int(parts[1], 16)); rl.append(int(parts[2], 16)); rc.append(int(parts[3]))
            elif tag == "B":
                bs.append(int(parts[1], 16)); bd.append(int(parts[2], 16)); bc.append(int(parts[3]))
            elif tag in ("H", "K"):
                int(parts[2], 16)
                shape_lines.append(line)
            elif tag == "kernel":
                profile.kernel = parts[1]
            elif tag == "source":
                profile.source = parts[1]
            elif tag == "sampled":
                profile.sampled = True
            elif tag == "S":
                profile.stats[parts[1]] = int(parts[2])
            else:
                raise ValueError(tag)
        except (ValueError, IndexError):
            raise KbbError(f"{path}:{n}: malformed profile line: {line[:60]}") from None
    profile.shapes = parse_shapes(shape_lines)
    profile.range_start = np.array(rs, dtype=np.uint64)
    profile.range_last = np.array(rl, dtype=np.uint64)
    profile.range_count = np.array(rc, dtype=np.int64)
    profile.src = np.array(bs, dtype=np.uint64)
    profile.dst = np.array(bd, dtype=np.uint64)
    profile.count = np.array(bc, dtype=np.int64)
    return profile
