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
    build-id <GNU build-id of the vmlinux, hex>
    R <start> <last> <count>
    B <src> <dst> <count>
    H <function> <hash> <address> <size>
    K <block offset> <block size> <block hash>
    S <name> <value>
    M <index> <module> <section>

addresses, offsets and hashes in hex, counts in decimal; ``H`` and the ``K``
lines after it describe a function the profile saw (code hashes with addresses
masked), so the profile can be applied to a rebuilt kernel (stale profiles).
``build-id`` names the build they describe: on that very build every count
applies as it is, with no function to match again.
``S`` lines are counters of the run the recorder measured besides the code
(``l1i_fetches``/``l1i_misses``: the QEMU recorder's simulated L1i;
``instructions``, and ``instructions:<module>`` for the part in a module).

Code of loadable modules is kept as (module, section, offset): a module lands
at another address on every load, and is rewritten as the relocatable object
it was built as. ``M`` lines name the module sections the profile saw; the
address ``1 << 63 | (index + 1) << 32 | offset`` stands for ``offset`` into the
section ``M <index>`` names. Such addresses are non-canonical: neither user
space nor the kernel (0xffff8...) has them, so every column stays one uint64
array, and lookups in vmlinux never take a module's code for the kernel's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.atomic import atomic_output
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.shapes import parse_shapes, write_shapes

MAGIC = "# kbuild-bolt profile v1"

# Module code: bit 63 set, below the kernel half (0xffff8...): non-canonical
# addresses, which no code of user space or the kernel ever has.
MODULE_TAG = 1 << 63
# A module function's shape is named "module:function" (at its encoded address).
MODULE_SEPARATOR = ":"
KERNEL_HALF = 0xFFFF800000000000


def module_address(index, offset):
    """The profile address of ``offset`` into module section ``index`` (scalars
    or arrays)."""
    if isinstance(index, np.ndarray) or isinstance(offset, np.ndarray):
        return np.uint64(MODULE_TAG) | ((np.asarray(index, np.uint64) + np.uint64(1))
                                        << np.uint64(32)) | np.asarray(offset, np.uint64)
    return MODULE_TAG | ((int(index) + 1) << 32) | int(offset)


def in_modules(addrs: np.ndarray) -> np.ndarray:
    """Per address: module code (an encoded (section, offset))."""
    a = np.asarray(addrs, np.uint64)
    return (a >= np.uint64(MODULE_TAG)) & (a < np.uint64(KERNEL_HALF))


def module_section_index(addrs: np.ndarray) -> np.ndarray:
    """Per encoded module address: its index into ``Profile.module_sections``."""
    a = np.asarray(addrs, np.uint64) & np.uint64(MODULE_TAG - 1)
    return (a >> np.uint64(32)).astype(np.int64) - 1


def _sum_pairs(a: np.ndarray, b: np.ndarray, counts: np.ndarray):
    """Distinct (a, b) pairs, sorted, with the counts of equal pairs summed."""
    a, b = a.astype(np.uint64, copy=False), b.astype(np.uint64, copy=False)
    if not len(a):
        return a.copy(), b.copy(), np.zeros(0, np.int64)
    a_min, b_min = a.min(), b.min()
    if int(a.max() - a_min) >> 32 == 0 and int(b.max() - b_min) >> 32 == 0:
        # Both within 4 GiB (a kernel's code): one 64-bit key a pair, one sort.
        order = np.argsort(((a - a_min) << np.uint64(32)) | (b - b_min))
    else:
        order = np.lexsort((b, a))
    a, b = a[order], b[order]
    starts = np.flatnonzero((a[1:] != a[:-1]) | (b[1:] != b[:-1])) + 1
    starts = np.concatenate([[0], starts])
    total = np.add.reduceat(np.asarray(counts)[order], starts).astype(np.int64)
    return a[starts], b[starts], total


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
    # What stale matching applied of it (a one-line summary; "" for a profile
    # of this very kernel).
    applied: str = ""
    # Counters of the run (name -> value): combined like the counts.
    stats: dict = field(default_factory=dict)
    # (module, section) per index that module addresses encode (see MODULE_TAG).
    module_sections: tuple = ()
    # GNU build-id (hex) of the vmlinux whose addresses and shapes these are ("":
    # not known): a kernel with the same one is that very build, where every
    # count applies as it is.
    build_id: str = ""

    @property
    def total(self) -> int:
        return int(self.range_count.sum())

    def merged(self) -> "Profile":
        """Identical records summed."""
        out = Profile(kernel=self.kernel, source=self.source, shapes=dict(self.shapes),
                      sampled=self.sampled, stats=dict(self.stats),
                      module_sections=self.module_sections, build_id=self.build_id)
        if len(self.range_start):
            out.range_start, out.range_last, out.range_count = _sum_pairs(
                self.range_start, self.range_last, self.range_count)
        if len(self.src):
            out.src, out.dst, out.count = _sum_pairs(self.src, self.dst, self.count)
        return out

    def shifted(self, delta: int) -> "Profile":
        """Kernel addresses moved by ``-delta`` (runtime KASLR address -> vmlinux
        address); module code stays where it is (it is not in vmlinux)."""
        d = np.uint64(delta & 0xFFFFFFFFFFFFFFFF)

        def shift(a):
            return np.where(in_modules(a), a, a - d)

        return Profile(shift(self.range_start), shift(self.range_last), self.range_count.copy(),
                       shift(self.src), shift(self.dst), self.count.copy(), self.kernel,
                       self.source, dict(self.shapes), self.sampled, stats=dict(self.stats),
                       module_sections=self.module_sections, build_id=self.build_id)

    def scaled(self, factor: float) -> "Profile":
        return Profile(self.range_start, self.range_last,
                       np.round(self.range_count * factor).astype(np.int64), self.src, self.dst,
                       np.round(self.count * factor).astype(np.int64), self.kernel, self.source,
                       dict(self.shapes), self.sampled,
                       stats={k: round(v * factor) for k, v in self.stats.items()},
                       module_sections=self.module_sections, build_id=self.build_id)

    def select(self, keep_ranges: np.ndarray, keep_transfers: np.ndarray,
               **changes) -> "Profile":
        """The records the masks keep, everything else as it is (or as
        ``changes`` say: shapes=..., module_sections=...)."""
        fields = dict(kernel=self.kernel, source=self.source, shapes=dict(self.shapes),
                      sampled=self.sampled, used=self.used, applied=self.applied,
                      stats=dict(self.stats), module_sections=self.module_sections,
                      build_id=self.build_id)
        fields.update(changes)
        return Profile(self.range_start[keep_ranges], self.range_last[keep_ranges],
                       self.range_count[keep_ranges], self.src[keep_transfers],
                       self.dst[keep_transfers], self.count[keep_transfers], **fields)

    def kernel_only(self) -> "Profile":
        """The records of vmlinux code: what a vmlinux layout uses (a call from
        the kernel into a module, or back, is no edge of the kernel's code)."""
        if not self.module_sections:
            return self
        keep_r = ~in_modules(self.range_start)
        keep_b = ~(in_modules(self.src) | in_modules(self.dst))
        shapes = {k: v for k, v in self.shapes.items() if MODULE_SEPARATOR not in v.name}
        return self.select(keep_r, keep_b, shapes=shapes, module_sections=())

    def module_part(self, module: str) -> "Profile":
        """The records of one module's code, its sections numbered as in
        ``module_sections`` (kept: the addresses still encode the indices), and
        the shapes of its functions. Transfers that leave or enter the module
        are left out."""
        mine = np.array([m == module for m, _ in self.module_sections] + [False])

        def of_module(a):
            inside = in_modules(a)
            idx = np.where(inside, module_section_index(a), len(mine) - 1)
            return inside & mine[idx]

        keep_r = of_module(self.range_start)
        keep_b = of_module(self.src) & of_module(self.dst)
        prefix = module + MODULE_SEPARATOR
        shapes = {k: v for k, v in self.shapes.items() if v.name.startswith(prefix)}
        return self.select(keep_r, keep_b, shapes=shapes, used=None, applied="", stats={})

    @property
    def modules(self) -> list[str]:
        """The modules whose code the profile saw, in order of first appearance."""
        return list(dict.fromkeys(m for m, _ in self.module_sections))

    def module_totals(self) -> dict[str, int]:
        """Executions of blocks (range counts) per module."""
        inside = in_modules(self.range_start)
        idx = module_section_index(self.range_start[inside])
        per_section = np.bincount(idx, weights=self.range_count[inside] * 1.0,
                                  minlength=len(self.module_sections))
        out: dict[str, int] = {}
        for (module, _), n in zip(self.module_sections, per_section.tolist()):
            out[module] = out.get(module, 0) + int(n)
        return out

    def renumbered(self, sections: list) -> "Profile":
        """The same records with module sections numbered as in ``sections``
        (which holds every (module, section) of this profile)."""
        if not self.module_sections or tuple(sections) == self.module_sections:
            return Profile(self.range_start, self.range_last, self.range_count, self.src,
                           self.dst, self.count, self.kernel, self.source, self.shapes,
                           self.sampled, self.used, self.applied, self.stats, tuple(sections),
                           self.build_id)
        where = {key: i for i, key in enumerate(sections)}
        new_index = np.array([where[key] for key in self.module_sections], np.int64)

        def renumber(a):
            inside = in_modules(a)
            out = a.copy()
            out[inside] = module_address(new_index[module_section_index(a[inside])],
                                         a[inside] & np.uint64(0xFFFFFFFF))
            return out

        return Profile(renumber(self.range_start), renumber(self.range_last), self.range_count,
                       renumber(self.src), renumber(self.dst), self.count, self.kernel,
                       self.source, self.shapes, self.sampled, self.used, self.applied,
                       self.stats, tuple(sections), self.build_id)


COMBINE_BATCH = 1 << 20     # records gathered before they are folded into the sum


def combine(profiles, weights: list[float] | None = None, batch: int = COMBINE_BATCH) -> Profile:
    """Sum of several profiles (weights scale each one: -1 subtracts).

    ``profiles`` may be any iterable, e.g. a generator that reads files one at
    a time: they are folded into the sum as they come, so the memory is the
    distinct records of the sum plus a batch of pending ones (at least
    ``batch`` records, at most as many as the sum holds), however many
    profiles there are."""
    weights = iter(weights or ())
    total = Profile()
    pending: list[Profile] = []
    pending_records = 0
    kernel, sources, shapes, sampled, stats, seen = "", set(), {}, False, None, 0
    builds = set()      # (the sum is of one build only when every part is)
    # Module sections of every profile so far, one numbering for the sum (it only
    # grows: what is pending keeps its indices).
    sections: list = []
    for profile in profiles:
        weight = next(weights, 1.0)
        part = profile.scaled(weight) if weight != 1 else profile
        if part.module_sections:
            sections += [key for key in part.module_sections if key not in set(sections)]
            part = part.renumbered(sections)
        if not seen:
            kernel = profile.kernel
        seen += 1
        if profile.source:
            sources.add(profile.source)
        shapes.update(profile.shapes)
        builds.add(profile.build_id)
        sampled = sampled or profile.sampled
        stats = dict(part.stats) if stats is None else _summed_stats(stats, part.stats)
        pending.append(Profile(part.range_start, part.range_last, part.range_count, part.src,
                               part.dst, part.count))
        pending_records += len(part.range_start) + len(part.src)
        if pending_records >= max(batch, len(total.range_start) + len(total.src)):
            total = _fold(total, pending)
            pending, pending_records = [], 0
    if not seen:
        return Profile()
    total = _fold(total, pending)
    out = Profile(total.range_start, total.range_last, total.range_count, total.src, total.dst,
                  total.count, kernel, "+".join(sorted(sources)), shapes, sampled,
                  module_sections=tuple(sections),
                  build_id=builds.pop() if len(builds) == 1 else "")
    out.stats = {k: max(0, v) for k, v in sorted((stats or {}).items())}
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


def _summed_stats(a: dict, b: dict) -> dict:
    """Counters of two runs summed: those both measured; a module's instructions
    count as 0 in a run that did not run it (when both counted instructions)."""
    out = {k: v + b[k] for k, v in a.items() if k in b}
    if "instructions" in out:
        for k in (set(a) | set(b)) - set(out):
            if k.startswith("instructions:"):
                out[k] = a.get(k, 0) + b.get(k, 0)
    return out


def _fold(total: Profile, pending: list[Profile]) -> Profile:
    """The sum of ``total`` and the pending profiles, identical records summed."""
    parts = [total, *pending]
    return Profile(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("range_start", "range_last", "range_count", "src", "dst",
                                  "count"))).merged()


def write_profile(profile: Profile, path) -> None:
    head = [MAGIC]
    if profile.kernel:
        head.append(f"kernel {profile.kernel}")
    if profile.source:
        head.append(f"source {profile.source}")
    if profile.sampled:
        head.append("sampled")
    if profile.build_id:
        head.append(f"build-id {profile.build_id}")
    head += [f"M {i} {module} {section}"
             for i, (module, section) in enumerate(profile.module_sections)]
    tail = [f"S {name} {int(value)}" for name, value in profile.stats.items()]
    tail += write_shapes(profile.shapes)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(head) + "\n")
        # Written in batches: a fleet's merged profile has millions of records,
        # the lines of all of them at once would take gigabytes.
        for tag, a, b, c in (("R", profile.range_start, profile.range_last, profile.range_count),
                             ("B", profile.src, profile.dst, profile.count)):
            for at in range(0, len(a), _WRITE_BATCH):
                part = slice(at, at + _WRITE_BATCH)
                f.write("".join(f"{tag} {x:x} {y:x} {n}\n" for x, y, n in
                                zip(a[part].tolist(), b[part].tolist(), c[part].tolist())))
        if tail:
            f.write("\n".join(tail) + "\n")


_WRITE_BATCH = 1 << 16


def _records(tag: str, lines: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The columns of ``tag a b count`` lines (a and b in hex); ValueError if
    any line is not one."""
    tokens = " ".join(lines).split()
    if len(tokens) != 4 * len(lines) or any(t != tag for t in tokens[0::4]):
        raise ValueError(tag)
    return (np.array([int(x, 16) for x in tokens[1::4]], np.uint64),
            np.array([int(x, 16) for x in tokens[2::4]], np.uint64),
            np.array([int(x) for x in tokens[3::4]], np.int64))


def _first_malformed(lines: list[str]) -> tuple[int, str]:
    """(line number, line) of the first record or shape line that does not read
    (sorted out as read_profile does: by its first letter, or its first word)."""
    for n, line in enumerate(lines[1:], 2):
        parts = line.split()
        tag = line[:1] if line[:1] in ("R", "B", "H", "K") else \
            parts[0] if parts and parts[0] in ("R", "B", "H", "K") else None
        try:
            if tag in ("R", "B"):
                _records(tag, [" ".join(parts)])
            elif tag is not None:
                if parts[0] != tag:
                    raise ValueError(tag)
                fields = parts[2:5] if tag == "H" else parts[1:4]
                if len(fields) != 3:
                    raise IndexError(tag)
                for x in fields:
                    int(x, 16)
        except (ValueError, IndexError, OverflowError):
            return n, line
    return 1, lines[0]


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
    lines = text.splitlines()
    # Records and shapes (nearly every line) sorted out by their first letter and
    # read in bulk; the few other lines one by one.
    shape_lines: list[str] = []       # (H and K lines in their order: K follows its H)
    by_tag = {"R": [], "B": [], "H": shape_lines, "K": shape_lines}
    rest = []
    for n, line in enumerate(lines[1:], 2):
        kind = by_tag.get(line[:1])
        if kind is not None:
            kind.append(line)
        elif line and not line.startswith("#"):
            rest.append((n, line))
    sections: list = []
    profile = Profile()
    for n, line in rest:
        parts = line.split()
        try:
            tag = parts[0]
            if tag in by_tag:                  # (indented)
                by_tag[tag].append(" ".join(parts))
            elif tag == "kernel":
                profile.kernel = parts[1]
            elif tag == "source":
                profile.source = parts[1]
            elif tag == "sampled":
                profile.sampled = True
            elif tag == "build-id":
                profile.build_id = bytes.fromhex(parts[1]).hex()
            elif tag == "S":
                profile.stats[parts[1]] = int(parts[2])
            elif tag == "M":
                if int(parts[1]) != len(sections) or len(parts) != 4:
                    raise ValueError(tag)
                sections.append((parts[2], parts[3]))
            else:
                raise ValueError(tag)
        except (ValueError, IndexError):
            raise KbbError(f"{path}:{n}: malformed profile line: {line[:60]}") from None
    try:
        profile.range_start, profile.range_last, profile.range_count = _records("R", by_tag["R"])
        profile.src, profile.dst, profile.count = _records("B", by_tag["B"])
        profile.shapes = parse_shapes(shape_lines)
    except (ValueError, IndexError, OverflowError):     # (a number of more than 64 bits)
        n, line = _first_malformed(lines)
        raise KbbError(f"{path}:{n}: malformed profile line: {line[:60]}") from None
    profile.module_sections = tuple(sections)
    for column in (profile.range_start, profile.range_last, profile.src, profile.dst):
        index = module_section_index(column[in_modules(column)])
        if len(index) and (index.min() < 0 or index.max() >= len(sections)):
            raise KbbError(f"{path}: a module address names no M line")
    return profile
