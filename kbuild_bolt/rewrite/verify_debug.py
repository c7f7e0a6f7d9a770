"""``kbuild-bolt verify --debug OUT --against IN --address-map MAP``: the DWARF of a
rewritten kernel checked by a real client, independently of the code that wrote it.

For moved instructions (all of them, or a seeded sample), LLVM's symbolizer
reads the input at the old address and the output at the new one; the inline
chains (function, file, line, column, discriminator of every frame) must be
equal. The address map is the one ``rewrite --address-map`` wrote: where each
old piece of code went, as the emitter placed it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.dwarf.image import INHERIT, LINEAR
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.rewrite.debuginfo import load_code_image
from kbuild_bolt.x86.decode import decode_ranges

COLD = re.compile(r"(\.cold(\.\d+)?)+$")
SYMBOLIZERS = ("llvm-symbolizer-19", "llvm-symbolizer-22", "llvm-symbolizer")


@dataclass
class DebugReport:
    checked: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "ok" if self.ok else f"{len(self.problems)} PROBLEMS"
        lines = [f"verify --debug: {state}",
                 f"  inline chains equal at new addresses   {self.checked:>10,} checked  {state}"]
        lines += [f"  ! {p}" for p in self.problems[:20]]
        return "\n".join(lines)


def symbolizer() -> str:
    for name in SYMBOLIZERS:
        path = shutil.which(name)
        if path:
            return path
    raise KbbError("verify --debug needs llvm-symbolizer (Debian package llvm-19)")


def moved_instructions(image_in: ElfImage, code) -> np.ndarray:
    """Old addresses of every instruction that a piece of new code stands for."""
    real = code.kind != INHERIT
    starts = []
    for s in image_in.sections:
        if not (s.is_exec and s.has_bits and s.size):
            continue
        data = bytes(image_in.section_data(s))
        sel = real & (code.old_lo >= s.addr) & (code.old_lo < s.addr + s.size)
        lin = sel & (code.kind == LINEAR)
        ranges = [(int(a), int(a) + int(n)) for a, n in zip(code.old_lo[lin], code.old_len[lin])]
        if ranges:
            starts.append(decode_ranges(data, s.addr, ranges).addr)
        starts.append(code.old_lo[sel & (code.kind != LINEAR)])
    if not starts:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate(starts).astype(np.uint64))


def alias_names(image: ElfImage) -> dict[str, str]:
    """name -> one name for the function at its address. The symbolizer names the
    outermost frame by the symbol table and picks any symbol at an address: a
    function's aliases (__x64_sys_foo/__ia32_sys_foo, memmove/__memmove) or a
    marker that starts a region there (__lock_text_start). Names that stand at
    several addresses (static functions of the same name) stay themselves."""
    from kbuild_bolt.elf.image import STT_FUNC

    symbols = image.symbols
    names = symbols.names
    where: dict[str, int] = {}
    funcs: dict[int, list[str]] = {}
    for i in np.flatnonzero(symbols.value != 0).tolist():
        name = names[i]
        if not name:
            continue
        addr = int(symbols.value[i])
        where[name] = addr if where.get(name, addr) == addr else -1
        if symbols.type[i] == STT_FUNC:
            funcs.setdefault(addr, []).append(name)
    return {name: min(funcs[addr]) for name, addr in where.items() if addr in funcs}


def chains(obj: str, addrs: np.ndarray) -> list:
    tool = symbolizer()
    with ElfImage(obj) as image:
        aliases = alias_names(image)
    text = "\n".join(f"{a:#x}" for a in addrs.tolist()) + "\n"
    run = subprocess.run([tool, f"--obj={obj}", "--inlines", "--output-style=JSON"],
                         input=text, capture_output=True, text=True)
    if run.returncode:
        raise KbbError(f"{tool} failed: {run.stderr.strip().splitlines()[-1:]}")
    out = []
    for line in run.stdout.splitlines():
        if not line.strip():
            continue
        frames = json.loads(line).get("Symbol", [])
        chain = [(f.get("FunctionName"), f.get("FileName"), f.get("Line"), f.get("Column"),
                  f.get("Discriminator")) for f in frames]
        if chain:
            # The outermost frame is named by the symbol table (LLVM does that for
            # ELF): a cold part's symbol is name.cold, the function is the same; an
            # alias is the same function too.
            name = COLD.sub("", chain[-1][0] or "")
            chain[-1] = (aliases.get(name, name),) + chain[-1][1:]
        out.append(chain)
    if len(out) != len(addrs):
        raise KbbError(f"{tool} answered {len(out)} of {len(addrs)} addresses")
    return out


def verify_debug(out_path: str, in_path: str, map_path: str, sample: int = 20000,
                 seed: int = 0) -> DebugReport:
    code = load_code_image(map_path)
    report = DebugReport()
    with ElfImage(in_path) as image_in:
        old = moved_instructions(image_in, code)
    if sample and len(old) > sample:
        rng = np.random.default_rng(seed)
        old = np.sort(rng.choice(old, sample, replace=False))
    new, ok = code.points(old)
    old, new = old[ok], new[ok]
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(chains, in_path, old)
        b = pool.submit(chains, out_path, new)
        before, after = a.result(), b.result()
    report.checked = len(old)
    for o, n, x, y in zip(old.tolist(), new.tolist(), before, after):
        if x != y:
            report.problems.append(f"{o:#x} -> {n:#x}: {_show(x)} became {_show(y)}")
    return report


def _show(chain) -> str:
    if not chain:
        return "nothing"
    return " <- ".join(f"{f}@{(file or '?').rsplit('/', 1)[-1]}:{line}:{col}"
                       + (f" d{d}" if d else "") for f, file, line, col, d in chain)
