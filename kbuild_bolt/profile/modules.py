"""Where a run's loadable modules were: runtime addresses -> (module, section, offset).

A module lands at another address on every load (and under KASLR at a random
one), so a profile keeps its code relative to the module's sections (see
``model.MODULE_TAG``). What a recorder needs is where each section was in the
run that was profiled:

- the running kernel's own list, ``/sys/module/<module>/sections/<section>``
  (one address per file). The lines ``grep . /sys/module/*/sections/.*text*``
  prints (``/sys/module/ext4/sections/.text:0xffffffffc0a00000``) say it, on a
  guest's console or saved to a file: any guest can print them, none needs
  kbuild-bolt's lab;
- the sections' sizes, from the modules' .ko files (a modules tree: the build's
  INSTALL_MOD_PATH, or /lib/modules/<release>). Without them a section is taken
  to reach the next section's start: code that is no module's (BPF programs,
  ftrace trampolines) lying after a module would then count as its code.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import unique
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import in_modules, module_address

SYSFS_LINE = re.compile(rb"/sys/module/([\w.-]+)/sections/(\.?[\w.$-]+):\s*(?:0x)?([0-9a-fA-F]+)")

# Module code farther than this past its section's start is no module's (an
# upper bound for a section whose size is unknown).
MAX_SECTION = 64 << 20


@dataclass
class ModuleMap:
    """Runtime code sections of the modules of one run."""

    module: list = field(default_factory=list)
    section: list = field(default_factory=list)
    start: list = field(default_factory=list)
    size: list = field(default_factory=list)      # None: unknown

    def __len__(self) -> int:
        return len(self.module)

    def add(self, module: str, section: str, start: int, size: int | None = None) -> None:
        key = (module, section)
        for i, known in enumerate(zip(self.module, self.section)):
            if known == key:          # (loaded again: the last load counts)
                self.start[i], self.size[i] = start, size
                return
        self.module.append(module)
        self.section.append(section)
        self.start.append(start)
        self.size.append(size)

    @property
    def sized(self) -> int:
        return sum(s is not None for s in self.size)

    def locate(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per runtime address: the index of the section holding it (-1: none)
        and the offset into it."""
        addrs = np.asarray(addrs, np.uint64)
        if not len(self):
            return np.full(len(addrs), -1, np.int64), np.zeros(len(addrs), np.uint64)
        start = np.array(self.start, np.uint64)
        order = np.argsort(start, kind="stable")
        s = start[order]
        # (a section without a size reaches the next one's start, or MAX_SECTION)
        nxt = np.append(s[1:], np.uint64(0xFFFFFFFFFFFFFFFF))
        sizes = np.array([self.size[i] if self.size[i] is not None else -1
                          for i in order.tolist()], np.int64)
        room = np.minimum(nxt - s, np.uint64(MAX_SECTION)).astype(np.int64)
        end = s + np.where(sizes >= 0, sizes, room).astype(np.uint64)
        k = np.searchsorted(s, addrs, side="right").astype(np.int64) - 1
        at = np.maximum(k, 0)
        hit = (k >= 0) & (addrs < end[at])
        index = np.where(hit, order[at], -1)
        offset = np.where(hit, addrs - s[at], np.uint64(0))
        return index, offset

    def encode(self, addrs: np.ndarray, sections: list) -> tuple[np.ndarray, np.ndarray]:
        """Runtime addresses -> profile addresses: module code as (section,
        offset), numbered in ``sections`` (extended with new (module, section)
        pairs); the mask says which were module code."""
        index, offset = self.locate(addrs)
        hit = index >= 0
        if not hit.any():
            return np.asarray(addrs, np.uint64).copy(), hit
        keys = list(zip(self.module, self.section))
        number = {key: i for i, key in enumerate(sections)}
        to_profile = np.full(len(keys), -1, np.int64)
        for i in unique(index[hit]).tolist():      # (only sections that ran)
            if keys[i] not in number:
                number[keys[i]] = len(sections)
                sections.append(keys[i])
            to_profile[i] = number[keys[i]]
        out = np.asarray(addrs, np.uint64).copy()
        out[hit] = module_address(to_profile[index[hit]], offset[hit])
        return out, hit


def parse_sysfs_lines(lines, into: ModuleMap | None = None) -> ModuleMap:
    """The code sections named in ``grep . /sys/module/*/sections/*`` lines (bytes
    or str; other lines are skipped): sections whose name holds "text", but
    not .init* ones."""
    out = into if into is not None else ModuleMap()
    for line in lines:
        raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
        m = SYSFS_LINE.search(raw)
        # (init code is freed once the module is up, and the loader gives its
        # memory to modules loaded later: its address would claim their code)
        if m is None or b"text" not in m.group(2) or m.group(2).startswith(b".init"):
            continue
        start = int(m.group(3), 16)
        if start:            # (0: an unprivileged reader sees no addresses)
            out.add(m.group(1).decode(), m.group(2).decode(), start)
    return out


def read_module_sections(path) -> ModuleMap:
    """A saved list of module sections (``grep . /sys/module/*/sections/.*text*``)."""
    try:
        with open(path, "rb") as f:
            found = parse_sysfs_lines(f)
    except OSError as err:
        raise KbbError(f"{path}: {err.strerror}") from None
    if not len(found):
        raise KbbError(f"{path}: no /sys/module/<module>/sections/<section>:<address> lines "
                       "(save them with: grep . /sys/module/*/sections/.*text*)")
    return found


def module_files(tree) -> dict[str, Path]:
    """Module name -> its .ko (compressed or not) under a modules tree (the name
    as the kernel gives it: dashes become underscores)."""
    out: dict[str, Path] = {}
    for root, _, files in os.walk(tree):
        for name in files:
            for suffix in (".ko", ".ko.xz", ".ko.gz", ".ko.zst"):
                if name.endswith(suffix):
                    out.setdefault(name[:-len(suffix)].replace("-", "_"), Path(root) / name)
    return out


def read_module_bytes(path: Path) -> bytes:
    """A .ko's bytes, decompressed."""
    name = Path(path).name
    try:
        if name.endswith(".xz"):
            return lzma.decompress(Path(path).read_bytes())
        if name.endswith(".gz"):
            return gzip.decompress(Path(path).read_bytes())
        if name.endswith(".zst"):
            proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
            if proc.returncode != 0:
                raise KbbError(f"{path}: zstd could not decompress it")
            return proc.stdout
        return Path(path).read_bytes()
    except (OSError, lzma.LZMAError, EOFError) as err:
        raise KbbError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") \
            from None


def module_tree(tree) -> Path:
    """A modules tree given on the command line, which must exist."""
    if tree is None or not Path(tree).is_dir():
        raise KbbError(f"{tree}: no such modules directory")
    return Path(tree)


def section_sizes(data: bytes, name: str = "<module>") -> dict[str, int]:
    """Allocated sections' sizes of a relocatable object's bytes."""
    from kbuild_bolt.elf.image import ElfImage

    with ElfImage.from_bytes(data, name) as image:
        return {s.name: int(s.size) for s in image.sections if s.is_alloc}


def add_sizes(found: ModuleMap, tree) -> int:
    """Fill in the sizes of ``found``'s sections from the .ko files under
    ``tree``; returns how many sections got one."""
    files = module_files(module_tree(tree))
    cache: dict[str, dict[str, int]] = {}
    got = 0
    for i, module in enumerate(found.module):
        path = files.get(module)
        if path is None:
            continue
        if module not in cache:
            try:
                cache[module] = section_sizes(read_module_bytes(path), str(path))
            except (KbbError, OSError):
                cache[module] = {}
        size = cache[module].get(found.section[i])
        if size is not None:
            found.size[i] = size
            got += 1
    return got


def module_shares(profile) -> tuple[str, float, dict[str, float]]:
    """How much of a run was module code: (what is counted, share of all,
    share per module), counting executed instructions when the recorder counted
    them (QEMU), else block executions (ranges: a sample, a stretch between two
    LBR entries)."""
    total = profile.stats.get("instructions")
    per = {k.split(":", 1)[1]: v for k, v in profile.stats.items()
           if k.startswith("instructions:")}
    if total:
        what = "instructions"
    else:
        what, total = "block executions", profile.total
        per = profile.module_totals()
    total = max(total, 1)
    shares = {m: n / total for m, n in sorted(per.items(), key=lambda kv: -kv[1])}
    return what, sum(shares.values()), shares


def describe_modules(profile) -> str:
    """One line: the modules a profile saw and their share of the run ("" for none)."""
    if not profile.module_sections:
        return ""
    what, share, shares = module_shares(profile)
    parts = ", ".join(f"{m} {100 * s:.1f}%" for m, s in shares.items())
    return (f"{100 * share:.1f}% of the {what} in {len(shares)} modules "
            f"({parts})")


def text_layout(data: bytes, name: str = "<module>") -> list[tuple[str, int, int]]:
    """(section, offset, size) of a module's code in its core text, as the
    kernel's loader lays it out (kernel/module/main.c, layout_sections(): the
    allocated executable sections that are not .init*, in section header order,
    each aligned to its sh_addralign; the same in 6.1 and 6.12). The text's
    start is what /proc/modules and perf's module map give."""
    from kbuild_bolt.elf.image import ElfImage
    from kbuild_bolt.elf.place import laid_out

    with ElfImage.from_bytes(data, name) as image:
        code = [s for s in image.sections
                if s.is_alloc and s.is_exec and not s.name.startswith(".init")]
        starts, _ = laid_out(code, 0)
        # (an empty one counts: it moves what follows to its alignment)
        return [(s.name, starts[s.index], int(s.size)) for s in code if s.size]


def from_text_bases(bases: dict[str, int], tree) -> tuple[ModuleMap, list[str]]:
    """Module sections from where each module's core text started (perf's module
    maps, /proc/modules) and the .ko files under ``tree``; and the modules whose
    .ko was not found there (their code is left out)."""
    files = module_files(module_tree(tree))
    found, missing = ModuleMap(), []
    for module, base in bases.items():
        path = files.get(module)
        if path is None:
            missing.append(module)
            continue
        for section, offset, size in text_layout(read_module_bytes(path), str(path)):
            found.add(module, section, base + offset, size)
    return found, missing


# /proc/modules: "ext4 1003520 1 - Live 0xffffffffc0a1b000" (the address: root only)
_PROC_MODULES = re.compile(rb"^([\w-]+) \d+ \d+ \S+ \S+ (0x[0-9a-fA-F]+)", re.M)


def read_proc_modules(path) -> dict[str, int]:
    """Module -> core text start, from a saved /proc/modules."""
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise KbbError(f"{path}: {err.strerror}") from None
    bases = {m.group(1).decode().replace("-", "_"): int(m.group(2), 16)
             for m in _PROC_MODULES.finditer(text)}
    if not bases or not any(bases.values()):
        raise KbbError(f"{path}: no module addresses (a /proc/modules saved as root)")
    return {m: a for m, a in bases.items() if a}


def vmlinux_code_spans(vmlinux) -> np.ndarray:
    """(start, end) of a vmlinux's code sections, sorted (none: not an ELF file)."""
    from kbuild_bolt.elf.image import ElfImage

    try:
        image = vmlinux if isinstance(vmlinux, ElfImage) else ElfImage(vmlinux)
    except KbbError:
        return np.zeros((0, 2), np.uint64)
    spans = sorted((s.addr, s.addr + s.size) for s in image.sections
                   if s.is_alloc and s.is_exec and s.size)
    if image is not vmlinux:
        image.close()
    return np.array(spans, np.uint64).reshape(-1, 2)


def without_other_code(profile, spans: np.ndarray):
    """``profile`` (in vmlinux addresses) without the records of code that is
    neither in ``spans`` (vmlinux's code) nor a known module's, and how many
    executions were left out. Such code (BPF programs, trampolines, modules
    nobody placed), moved by the kernel's KASLR offset, could land on vmlinux
    code and be taken for it."""
    if not len(spans):
        return profile, 0

    def known(a):
        k = np.searchsorted(spans[:, 0], a, side="right").astype(np.int64) - 1
        at = np.maximum(k, 0)
        return in_modules(a) | ((k >= 0) & (a < spans[at, 1]))

    keep_r = known(profile.range_start)
    keep_b = known(profile.src) & known(profile.dst)
    if keep_r.all() and keep_b.all():
        return profile, 0
    return profile.select(keep_r, keep_b), int(profile.range_count[~keep_r].sum())
