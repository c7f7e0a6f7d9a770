"""Compare a running kernel's /proc/kallsyms with the vmlinux it booted.

The lab /init writes /proc/kallsyms to a second serial port (``boot(...,
kallsyms_to=FILE)``). Every function symbol of the vmlinux's code sections
(split-off ``.cold`` parts included) must be listed at its address, shifted by
the boot's KASLR offset, under its name: stack traces, perf, kprobes and
livepatch find code through these entries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.elf.image import STT_FUNC, ElfImage

CODE_SECTIONS = (".text", ".init.text", ".exit.text")
END_MARK = "KBB-KALLSYMS-END"


def read_dump(path) -> dict[str, set[int]]:
    """name -> addresses, for the core kernel's symbols of a /proc/kallsyms dump."""
    out: dict[str, set[int]] = {}
    complete = False
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if line == END_MARK:
            complete = True
            break
        parts = line.split()
        if len(parts) < 3 or len(parts) > 3:   # (a fourth field names a module)
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        out.setdefault(parts[2], set()).add(addr)
    if not complete:
        raise ValueError(f"{path}: the /proc/kallsyms dump is incomplete")
    return out


def kallsyms_problems(vmlinux, dump, missing_ok=()) -> tuple[int, list[str]]:
    """(functions checked, problems) for the kernel ``vmlinux`` whose /proc/kallsyms
    is in ``dump``. ``missing_ok``: names that may be absent (cold parts a kernel
    without kallsyms room could not name); when listed, they must be right."""
    listed = read_dump(dump)
    image = ElfImage(vmlinux)
    symbols = image.symbols
    text = image.symbols.address("_text")
    running = min(listed.get("_text", {0}))
    offset = running - text
    sections = [image.section(n).index for n in CODE_SECTIONS if image.section(n) is not None]
    funcs = np.flatnonzero((symbols.type == STT_FUNC) & isin(symbols.shndx, sections))
    names = symbols.names
    problems = []
    for i in funcs.tolist():
        want = int(symbols.value[i]) + offset
        have = listed.get(names[i])
        if have is None:
            if names[i] in missing_ok:
                continue
            problems.append(f"{names[i]}: not in /proc/kallsyms")
        elif want not in have:
            got = ", ".join(f"{a:#x}" for a in sorted(have)[:3])
            problems.append(f"{names[i]}: at {got}, the vmlinux says {want:#x}")
    return len(funcs), problems
