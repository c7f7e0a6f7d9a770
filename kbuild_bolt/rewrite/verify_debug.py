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

from kbuild_bolt.arrays import unique
from kbuild_bolt.dwarf.image import INHERIT, LINEAR
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.rewrite.debuginfo import load_code_image
from kbuild_bolt.rewrite.verify_orc import OrcTable
from kbuild_bolt.rewrite.verify_scopes import DebugTables, compare
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
    scope_mismatches: int = 0
    scope_problems: list = field(default_factory=list)
    location_mismatches: int = 0
    location_problems: list = field(default_factory=list)
    orc_checked: int = 0
    orc_problems: list = field(default_factory=list)
    orc_skipped: str = ""
    dwarfdump_checked: bool = False
    dwarfdump_problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.cfi_problems or self.scope_mismatches
                    or self.location_mismatches or self.dwarfdump_problems or self.orc_problems)

    def summary(self) -> str:
        def state(problems):
            return "ok" if not problems else f"{len(problems)} PROBLEMS"

        everything = (self.problems + self.cfi_problems + self.scope_problems
                      + self.location_problems + self.dwarfdump_problems + self.orc_problems)
        lines = [f"verify --debug: {state(everything)}",
                 f"  inline chains equal at new addresses   {self.checked:>10,} checked  "
                 f"{state(self.problems)}",
                 f"  call frame rules equal (.debug_frame)  {self.cfi_checked:>10,} checked  "
                 f"{state(self.cfi_problems)}",
                 (f"  .debug_frame CFA agrees with ORC       skipped ({self.orc_skipped})"
                  if self.orc_skipped else
                  f"  .debug_frame CFA agrees with ORC      {self.orc_checked:>10,} checked  "
                  f"{state(self.orc_problems)}"),
                 f"  scopes containing each instruction     {self.checked:>10,} checked  "
                 f"{state(self.scope_problems)}",
                 f"  location expressions at each one       {self.checked:>10,} checked  "
                 f"{state(self.location_problems)}"]
        if self.dwarfdump_checked:
            lines.append(f"  llvm-dwarfdump --verify: no new errors  {'':>10} "
                         f"{'':8} {state(self.dwarfdump_problems)}")
        if self.scope_mismatches or self.location_mismatches:
            lines.append(f"  ({self.scope_mismatches:,} instructions with other scopes, "
                         f"{self.location_mismatches:,} with other locations)")
        lines += [f"  ! {p}" for p in (self.problems[:20] + self.cfi_problems[:20]
                                       + self.scope_problems[:20]
                                       + self.location_problems[:20]
                                       + self.dwarfdump_problems[:20]
                                       + self.orc_problems[:20])]
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
    return unique(np.concatenate(starts).astype(np.uint64))


def sample_moved_instructions(image_in: ElfImage, code, n: int, seed: int = 0) -> np.ndarray:
    """Old addresses of about ``n`` moved instructions, one in each of ``n`` pieces
    picked at random (only those pieces are decoded)."""
    real = np.flatnonzero(code.kind != INHERIT)
    rng = np.random.default_rng(seed)
    if len(real) > n:
        real = np.sort(rng.choice(real, n, replace=False))
    picked = []
    for s in image_in.sections:
        if not (s.is_exec and s.has_bits and s.size):
            continue
        sel = real[(code.old_lo[real] >= s.addr) & (code.old_lo[real] < s.addr + s.size)]
        lin = sel[code.kind[sel] == LINEAR]
        lin = lin[np.argsort(code.old_lo[lin], kind="stable")]
        picked.append(code.old_lo[sel[code.kind[sel] != LINEAR]])
        if not len(lin):
            continue
        data = bytes(image_in.section_data(s))
        ranges = [(int(a), int(a) + int(k)) for a, k in zip(code.old_lo[lin], code.old_len[lin])]
        starts = decode_ranges(data, s.addr, ranges).addr.astype(np.uint64)
        # one instruction per piece
        piece = np.searchsorted(code.old_lo[lin].astype(np.uint64), starts, side="right") - 1
        first = np.r_[0, np.flatnonzero(np.diff(piece)) + 1] if len(piece) else piece
        cnt = np.diff(np.r_[first, len(piece)])
        pick = first + (rng.random(len(first)) * cnt).astype(np.int64)
        picked.append(starts[pick])
    if not picked:
        return np.zeros(0, np.uint64)
    return unique(np.concatenate(picked).astype(np.uint64))


def symbolizer_available() -> bool:
    return any(shutil.which(name) for name in SYMBOLIZERS)


class DebugSample:
    """verify --debug's cheap part, which every rewrite that keeps DWARF runs: the
    inline chains of a sample of moved instructions. The input's side is read by
    llvm-symbolizer in the background while the DWARF is written, the output's
    while the output is verified, so it adds little time."""

    def __init__(self, in_path: str, image_in: ElfImage, code, n: int, seed: int = 0):
        old = sample_moved_instructions(image_in, code, n, seed)
        new, ok = code.points(old)
        self.old, self.new = old[ok], new[ok]
        self.pool = ThreadPoolExecutor(2)
        self.before = self.pool.submit(chains, in_path, self.old)
        self.after = None

    def start_output(self, out_path: str) -> None:
        self.after = self.pool.submit(chains, out_path, self.new)

    def report(self) -> DebugReport:
        try:
            before, after = self.before.result(), self.after.result()
        finally:
            self.pool.shutdown()
        report = DebugReport(checked=len(self.old))
        for o, n, x, y in zip(self.old.tolist(), self.new.tolist(), before, after):
            if x != y:
                report.problems.append(f"{o:#x} -> {n:#x}: {_show(x)} became {_show(y)}")
        return report

    def cancel(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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


_CFA = re.compile(r"CFA=(R[A-Z0-9]+)([+-]\d+)")


def agrees_with_orc(rule, orc_cfa) -> bool | None:
    """Whether a .debug_frame row's CFA is ORC's (None: nothing to compare)."""
    if rule is None or orc_cfa is None:
        return None
    m = _CFA.search(rule)
    return None if m is None else f"{m.group(1)}{int(m.group(2)):+d}" == orc_cfa


def alias_names(image: ElfImage) -> dict[str, str]:
    """name -> one name for the function at its address. The symbolizer names the
    outermost frame by the symbol table and picks any symbol at an address: a
    function's aliases (__x64_sys_foo/__ia32_sys_foo, memmove/__memmove) or a
    marker that starts a region there (__lock_text_start). Names that stand at
    several addresses (static functions of the same name) stay themselves."""
    from kbuild_bolt.elf.image import STT_FUNC

    symbols = image.symbols
    idx = np.flatnonzero(symbols.value != 0)
    names = np.array([symbols.names[i] for i in idx.tolist()])
    keep = names != ""
    idx, names = idx[keep], names[keep]
    addr = symbols.value[idx].astype(np.uint64)
    # names that stand at one address only
    o = np.lexsort((addr, names))
    n_s, a_s = names[o], addr[o]
    new_name = np.r_[True, n_s[1:] != n_s[:-1]]
    group = np.cumsum(new_name) - 1
    lo = np.minimum.reduceat(a_s, np.flatnonzero(new_name)) if len(a_s) else a_s
    hi = np.maximum.reduceat(a_s, np.flatnonzero(new_name)) if len(a_s) else a_s
    single = (lo == hi)
    uniq_names, uniq_addr = n_s[new_name][single], lo[single]
    # the least name of the functions at each address
    f = symbols.type[idx] == STT_FUNC
    fo = np.lexsort((names[f], addr[f]))
    fa, fn = addr[f][fo], names[f][fo]
    first = np.r_[True, fa[1:] != fa[:-1]] if len(fa) else np.zeros(0, bool)
    fa, fn = fa[first], fn[first]
    k = np.searchsorted(fa, uniq_addr)
    k = np.minimum(k, max(len(fa) - 1, 0))
    has = (fa[k] == uniq_addr) if len(fa) else np.zeros(len(uniq_addr), bool)
    del group
    return dict(zip(uniq_names[has].tolist(), fn[k[has]].tolist()))


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


# DW_TAG_call_site, DW_TAG_GNU_call_site -> tags LLVM's verifier has no check for
# (same ULEB128 sizes). LLVM 14-22's call-site check loops for ever on a call
# site inside a lexical block (it steps to the DIE's parent, never the parent's
# parent), which GCC writes in every large unit.
_CALL_SITE_TAGS = {0x48: bytes([0x7f]), 0x4109: bytes([0xfe, 0x9f, 0x01])}
_HEX = re.compile(r"0x[0-9a-f]+")
_DIE = re.compile(r"^(0x[0-9a-f]+): ")


def _without_call_site_checks(path: str, copy: str) -> None:
    from kbuild_bolt.dwarf.info import declarations
    from kbuild_bolt.dwarf.leb import uleb

    shutil.copyfile(path, copy)
    with ElfImage(path) as image:
        s = image.section(".debug_abbrev")
        if s is None:
            return
        b = image.read_file_range(s.offset, s.size)
    p = 0
    while p < len(b):
        end = p
        for _, start, end, tag, _, _ in declarations(b, p):
            if tag in _CALL_SITE_TAGS:
                _, q = uleb(b, start)
                b[q:q + len(_CALL_SITE_TAGS[tag])] = _CALL_SITE_TAGS[tag]
        p = end + 1
    with open(copy, "r+b") as f:
        f.seek(s.offset)
        f.write(b)


def dwarfdump_errors(path: str, workdir: str) -> set:
    """``llvm-dwarfdump --verify``'s errors as (message, DIE offset) pairs
    (addresses in a message masked: they differ between the input and output)."""
    import os

    copy = os.path.join(workdir, os.path.basename(path) + ".verify")
    _without_call_site_checks(path, copy)
    try:
        run = subprocess.run([tool(DWARFDUMPS, "llvm-19"), "--verify", copy],
                             capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(copy)
    errors = set()
    lines = (run.stdout + run.stderr).splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("error: ") or "occurred" in line or "Aggregated" in line \
                or line.startswith("error: Errors detected"):
            continue
        die = None
        for nxt in lines[i + 1:i + 4]:
            m = _DIE.match(nxt)
            if m:
                die = int(m.group(1), 16)
                break
        errors.add((_HEX.sub("0x_", line[7:]).rstrip(":"), die))
    return errors


def verify_debug(out_path: str, in_path: str, map_path: str, sample: int = 20000,
                 seed: int = 0, dwarfdump: bool = True) -> DebugReport:
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
    if dwarfdump:
        import os
        import tempfile
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_path))) as tmp, \
                ThreadPoolExecutor(2) as pool:
            a = pool.submit(dwarfdump_errors, in_path, tmp)
            b = pool.submit(dwarfdump_errors, out_path, tmp)
            errors_in, errors_out = a.result(), b.result()
        report.dwarfdump_checked = True
        report.dwarfdump_problems = [f"llvm-dwarfdump --verify: {msg}"
                                     + (f" (DIE {die:#x})" if die is not None else "")
                                     for msg, die in sorted(errors_out - errors_in,
                                                            key=lambda e: (e[0], e[1] or 0))]
    # .debug_frame and ORC agree at a new address wherever they agreed at the old one
    orc_table_out = OrcTable(out_path)
    if not orc_table_out.present:
        report.orc_skipped = "OUT has no ORC bytes: a separate debug file?"
    orc_in = OrcTable(in_path).cfa(old) if orc_table_out.present else []
    orc_out = orc_table_out.cfa(new) if orc_table_out.present else []
    for o, n, x, y, a, b in zip(old.tolist(), new.tolist(), rules_in, rules_out, orc_in, orc_out):
        before, after = agrees_with_orc(x, a), agrees_with_orc(y, b)
        if before:
            report.orc_checked += 1
            if not after:
                report.orc_problems.append(f"{o:#x} -> {n:#x}: .debug_frame {y} but ORC CFA {b} "
                                           f"(before: {x}, ORC {a})")
    # scopes and location lists, read by this project's reader from both files
    tables_in, tables_out = DebugTables(in_path), DebugTables(out_path)
    report.scope_mismatches, report.scope_problems = compare(
        tables_in.scopes(), tables_out.scopes(), old, new, "scopes")
    report.location_mismatches, report.location_problems = compare(
        tables_in.locations(code), tables_out.locations(), old, new, "locations")
    return report


def _show(chain) -> str:
    if not chain:
        return "nothing"
    return " <- ".join(f"{f}@{(file or '?').rsplit('/', 1)[-1]}:{line}:{col}"
                       + (f" d{d}" if d else "") for f, file, line, col, d in chain)
