"""Profiles cover loadable modules (issue 15): the lab's module-heavy workload
(ext4 on a loop device backed by tmpfs, both modules) recorded under QEMU keeps
module code as (module, section, offset), at least a quarter of the run's
kernel instructions; and the loader's layout computed from the .ko files
places every module section exactly where the running kernel says it is (what
perf's module maps and /proc/modules rely on)."""

from __future__ import annotations

import numpy as np
import pytest

from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.model import in_modules, module_section_index, read_profile, \
    write_profile
from kbuild_bolt.profile.modules import (
    _PROC_MODULES, from_text_bases, module_files, module_shares, parse_sysfs_lines,
    read_module_bytes,
)

pytestmark = pytest.mark.xdist_group("modules")


@pytest.fixture(scope="module")
def kernel():
    return lab_kernel("6.12-modules")


@pytest.fixture(scope="module")
def recorded(kernel):
    """The disk workload recorded with KASLR, and its boot's console."""
    lines = []
    profile = qemu.record(kernel.bzimage, kernel.initramfs, "disk", 3, kaslr=True,
                          vmlinux=kernel.vmlinux, modules_tree=kernel.modules_root,
                          log=lines.append)
    return profile


def function_spans(path, section: str) -> np.ndarray:
    """(start, end) of the functions a .ko defines in ``section``."""
    with ElfImage.from_bytes(read_module_bytes(path), str(path)) as image:
        index = image.section(section).index
        s = image.symbols
        mine = (s.type == 2) & (s.shndx == index) & (s.size > 0)
        spans = np.stack([s.value[mine], s.value[mine] + s.size[mine]], axis=1)
    return spans[np.argsort(spans[:, 0])].astype(np.uint64)


def test_disk_workload_runs_a_quarter_in_modules(kernel, recorded, tmp_path):
    modules = recorded.modules
    assert {"ext4", "loop"} <= set(modules)
    what, share, shares = module_shares(recorded)
    assert what == "instructions"
    assert share >= 0.25, f"only {100 * share:.1f}% of the kernel's instructions in modules"
    assert shares["ext4"] > 0.1 and shares["loop"] > 0
    # Every range in module code starts inside a function of its section: the
    # sections' places and sizes are right (a wrong base lands in padding and
    # between functions, a wrong size lets other code in).
    files = module_files(kernel.modules_root)
    inside = in_modules(recorded.range_start)
    index = module_section_index(recorded.range_start[inside])
    offset = recorded.range_start[inside] & np.uint64(0xFFFFFFFF)
    counts = recorded.range_count[inside]
    hit = np.zeros(len(offset), bool)
    for i, (module, section) in enumerate(recorded.module_sections):
        spans = function_spans(files[module], section)
        mine = index == i
        k = np.searchsorted(spans[:, 0], offset[mine], side="right").astype(np.int64) - 1
        ok = (k >= 0) & (offset[mine] < spans[np.maximum(k, 0), 1])
        hit[np.flatnonzero(mine)[ok]] = True
    assert counts[hit].sum() >= 0.999 * counts.sum()
    # through the file format and back
    write_profile(recorded, tmp_path / "disk.kbb")
    again = read_profile(tmp_path / "disk.kbb")
    assert again.module_sections == recorded.module_sections
    assert module_shares(again) == module_shares(recorded)


def test_vmlinux_rewrite_uses_the_kernel_part(kernel, recorded, tmp_path):
    """A vmlinux rewrite with a profile that holds modules applies its kernel
    part (module code is not vmlinux's: it neither counts as unmatched nor
    lands on vmlinux code)."""
    from kbuild_bolt.rewrite.context import RewriteOptions
    from kbuild_bolt.rewrite.engine import rewrite

    result = rewrite(kernel.vmlinux, tmp_path / "out", RewriteOptions(
        reorder_blocks="ext-tsp", profile=recorded, progress=False))
    assert result.profile_used > 0.98 and result.rewritten > 100


def test_loader_layout_matches_the_running_kernel(kernel, recorded):
    """/proc/modules' text starts, laid out from the .ko files as the loader
    does, give each core code section the address /sys/module says."""
    from kbuild_bolt.qemu.runner import boot

    result = boot(kernel.bzimage, kernel.initramfs, workload="disk", iterations=1, kaslr=True)
    assert result.ok, result.summary()
    text = "\n".join(result.log_lines).encode()
    bases = {m.group(1).decode().replace("-", "_"): int(m.group(2), 16)
             for m in _PROC_MODULES.finditer(text)}
    sysfs = parse_sysfs_lines(result.log_lines)
    assert {"ext4", "loop", "jbd2"} <= set(bases)
    placed, missing = from_text_bases(bases, kernel.modules_root)
    assert not missing
    said = {(m, s): a for m, s, a in zip(sysfs.module, sysfs.section, sysfs.start)
            if not s.startswith(".init")}
    computed = dict(zip(zip(placed.module, placed.section), placed.start))
    # (sysfs lists the sections named *text*: .altinstr_replacement, code that
    # only ever runs copied elsewhere, is not among them)
    assert len(said) > 10 and {k: computed.get(k) for k in said} == said
    assert set(computed) - set(said) <= {(m, ".altinstr_replacement") for m in bases}
