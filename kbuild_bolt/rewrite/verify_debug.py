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
DWARFDUMPS = ("llvm-dwarfdump-19", "llvm-dwarfdump-22", "llvm-dwarfdump")
SYMBOLIZERS = ("llvm-symbolizer-19", "llvm-symbolizer-22", "llvm-symbolizer")


@dataclass
class DebugReport:
    checked: int = 0
    problems: list = field(default_factory=list)
    cfi_checked: int = 0
    cfi_problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.cfi_problems

    def summary(self) -> str:
        def state(problems):
            return "ok" if not problems else f"{len(problems)} PROBLEMS"

        lines = [f"verify --debug: {state(self.problems + self.cfi_problems)}",
                 f"  inline chains equal at new addresses   {self.checked:>10,} checked  "
                 f"{state(self.problems)}",
                 f"  call frame rules equal (.debug_frame)  {self.cfi_checked:>10,} checked  "
                 f"{state(self.cfi_problems)}"]
        lines += [f"  ! {p}" for p in (self.problems[:20] + self.cfi_problems[:20])]
        return "\n".join(lines)



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


def tool(names: tuple[str, ...], package: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise KbbError(f"verify --debug needs {names[0]} (Debian package {package})")


_FDE = re.compile(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.\.([0-9a-f]+)")
_ROW = re.compile(r"^\s+0x([0-9a-f]+): (.*)$")


class FrameTable:
    """The call-frame rows of a file as LLVM reads them (llvm-dwarfdump --debug-frame):
    at each address, the rule text of the FDE that covers it."""

    def __init__(self, obj: str):
        run = subprocess.run([tool(DWARFDUMPS, "llvm-19"), "--debug-frame", obj],
                             capture_output=True, text=True)
        if run.returncode:
            raise KbbError(f"llvm-dwarfdump --debug-frame {obj} failed")
        fde_lo, fde_hi, row_addr, row_text, row_fde = [], [], [], [], []
        for line in run.stdout.splitlines():
            m = _FDE.match(line)
            if m:
                fde_lo.append(int(m.group(1), 16))
                fde_hi.append(int(m.group(2), 16))
                continue
            m = _ROW.match(line)
            if m and fde_lo:
                row_addr.append(int(m.group(1), 16))
                row_text.append(m.group(2).strip())
                row_fde.append(len(fde_lo) - 1)
        order = np.argsort(np.array(fde_lo, np.uint64), kind="stable")
        self.lo = np.array(fde_lo, np.uint64)[order]
        self.hi = np.array(fde_hi, np.uint64)[order]
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        key = np.array(row_addr, np.uint64)
        fde = rank[np.array(row_fde, np.int64)] if row_fde else np.zeros(0, np.int64)
        o = np.lexsort((key, fde))
        self.row_fde, self.row_addr = fde[o], key[o]
        self.row_text = [row_text[i] for i in o.tolist()]

    def at(self, addrs: np.ndarray) -> list:
        """The rule text at each address (None: no FDE covers it)."""
        k = np.searchsorted(self.lo, addrs, side="right").astype(np.int64) - 1
        ok = (k >= 0) & (addrs < self.hi[np.maximum(k, 0)])
        # last row of FDE k at or before the address
        key_f = self.row_fde
        out = []
        for a, kk, good in zip(addrs.tolist(), k.tolist(), ok.tolist()):
            if not good:
                out.append(None)
                continue
            i0 = int(np.searchsorted(key_f, kk, side="left"))
            i1 = int(np.searchsorted(key_f, kk, side="right"))
            j = i0 + int(np.searchsorted(self.row_addr[i0:i1], np.uint64(a), side="right")) - 1
            out.append(self.row_text[j] if j >= i0 else None)
        return out


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
    symbolizer = tool(SYMBOLIZERS, "llvm-19")
    with ElfImage(obj) as image:
        aliases = alias_names(image)
    text = "\n".join(f"{a:#x}" for a in addrs.tolist()) + "\n"
    run = subprocess.run([symbolizer, f"--obj={obj}", "--inlines", "--output-style=JSON"],
                         input=text, capture_output=True, text=True)
    if run.returncode:
        raise KbbError(f"{symbolizer} failed: {run.stderr.strip().splitlines()[-1:]}")
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
        raise KbbError(f"{symbolizer} answered {len(out)} of {len(addrs)} addresses")
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
        fa = pool.submit(FrameTable, in_path)
        fb = pool.submit(FrameTable, out_path)
        frames_in, frames_out = fa.result(), fb.result()
    report.checked = len(old)
    for o, n, x, y in zip(old.tolist(), new.tolist(), before, after):
        if x != y:
            report.problems.append(f"{o:#x} -> {n:#x}: {_show(x)} became {_show(y)}")
    # .debug_frame: the rules at each new address are the old address's
    rules_in, rules_out = frames_in.at(old), frames_out.at(new)
    for o, n, x, y in zip(old.tolist(), new.tolist(), rules_in, rules_out):
        if x is None:
            continue
        report.cfi_checked += 1
        if x != y:
            report.cfi_problems.append(f"{o:#x} -> {n:#x}: CFI {x} became {y}")
    return report


def _show(chain) -> str:
    if not chain:
        return "nothing"
    return " <- ".join(f"{f}@{(file or '?').rsplit('/', 1)[-1]}:{line}:{col}"
                       + (f" d{d}" if d else "") for f, file, line, col, d in chain)
