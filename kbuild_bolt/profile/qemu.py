"""An exact kernel profile from QEMU (no LBR hardware needed).

A small TCG plugin (kbb_plugin.c, compiled with the machine's gcc on first use
and cached) counts every execution of every kernel translation block and every
transition between two of them. Translation blocks end at branches, so with
the decoded code these give exact branch edges.

``record_guest`` records any guest (the user's initramfs or disk images,
kernel command line and QEMU arguments): the whole run until it powers off,
or only between two console lines (the plugin cuts there itself). The KASLR
offset is found from the recorded code and the vmlinux, without the guest's
help. The lab workloads are one user of it (``record``); ``record_run`` and
``record_boot`` record a whole lab run, boot included.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.errors import KbbError
from kbuild_bolt.cache import cache_root, locked
from kbuild_bolt.qemu.runner import DEFAULT_TEXT, boot
from kbuild_bolt.profile.model import Profile, in_modules, module_section_index
from kbuild_bolt.profile.modules import (
    ModuleMap, add_sizes, parse_sysfs_lines, vmlinux_code_spans, without_other_code,
)
from kbuild_bolt.profile.thunks import thunk_ranges
from kbuild_bolt.x86 import decode as x86

PLUGIN_SOURCE = Path(__file__).resolve().parent / "kbb_plugin.c"
ICOUNT = ["-icount", "shift=0,sleep=off"]


def plugin_path() -> Path:
    """The compiled plugin (built once per source version)."""
    source = PLUGIN_SOURCE.read_bytes()
    key = hashlib.sha256(source).hexdigest()[:12]
    out = cache_root() / "plugins" / f"kbb-{key}.so"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise KbbError("gcc not found: needed once to build the QEMU profiling plugin")
    with locked("plugin"):
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp.so")
            proc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(tmp),
                                   str(PLUGIN_SOURCE)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise KbbError(f"building the QEMU plugin failed: {proc.stderr.strip()[:200]}")
            tmp.rename(out)
    return out


WINDOW = 1 << 21          # KASLR moves the kernel by multiples of 2 MiB


def thunk_arguments(vmlinux) -> list[str]:
    """The plugin's thunk=/via= arguments for ``vmlinux`` (an ELF with symbols;
    none for anything else: calls through thunks then go unrecorded)."""
    from kbuild_bolt.elf.image import ElfImage

    try:
        image = ElfImage(vmlinux)
    except KbbError:
        return []
    with image:
        thunks, vias = thunk_ranges(image)
    # (the plugin holds up to 16 ranges of each kind)
    return ([f"thunk={lo % WINDOW:x}:{hi - lo:x}" for lo, hi in thunks[:16]]
            + [f"via={lo % WINDOW:x}:{hi - lo:x}" for lo, hi in vias[:16]])


def parse_plugin_output(path, modules: ModuleMap | None = None) -> Profile:
    """TB counts become ranges; TB transitions become transfers (last insn -> start);
    calls followed through retpoline thunks become transfers from the call to its
    real target (the thunk call itself is a transition too). Code in ``modules``
    (where the run's modules were) becomes (module, section, offset); the
    instructions executed, in all and per module, become counters."""
    rs, rl, rc, ri, es, ed, ec = [], [], [], [], [], [], []
    stats = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if parts[0] == "T":
                rs.append(int(parts[1], 16))
                rl.append(int(parts[2], 16))
                ri.append(int(parts[3]))
                rc.append(int(parts[4]))
            elif parts[0] == "E":
                es.append(int(parts[2], 16))  # the last instruction of the source TB
                ed.append(int(parts[3], 16))
                ec.append(int(parts[5]))
            elif parts[0] == "C":
                es.append(int(parts[1], 16))  # the call of the thunk
                ed.append(int(parts[2], 16))  # where the thunk took it
                ec.append(int(parts[3]))
            elif parts[0] == "L":
                stats = {"l1i_fetches": int(parts[1]), "l1i_misses": int(parts[2])}
    rs, rl, es, ed = (np.array(a, dtype=np.uint64) for a in (rs, rl, es, ed))
    rc, ri, ec = (np.array(a, dtype=np.int64) for a in (rc, ri, ec))
    executed = rc * ri
    stats["instructions"] = int(executed.sum())
    sections: list = []
    if modules is not None and len(modules):
        rs, in_module = modules.encode(rs, sections)
        rl, _ = modules.encode(rl, sections)
        es, _ = modules.encode(es, sections)
        ed, _ = modules.encode(ed, sections)
        index = module_section_index(rs[in_module])
        per_section = np.bincount(index, weights=executed[in_module] * 1.0,
                                  minlength=len(sections))
        for (module, _), n in zip(sections, per_section.tolist()):
            key = f"instructions:{module}"
            stats[key] = stats.get(key, 0) + int(n)
    return Profile(rs, rl, rc, es, ed, ec, source="qemu", stats=stats,
                   module_sections=tuple(sections)).merged()


def plugin_cutoff(path) -> int | None:
    """The plugin's cut-off state at the end of the run (``G`` line): 0 the start
    text never appeared, 1 counting to the end, 2 stopped; None: no such line."""
    with open(path) as f:
        for line in f:
            if line.startswith("G "):
                return int(line.split()[1])
    return None


# Where KASLR may put the kernel: 2 MiB steps (CONFIG_PHYSICAL_ALIGN) up to 1 GiB
# above its link address.
KASLR_ALIGN = 1 << 21
KASLR_SPAN = 1 << 30


def find_kaslr_offset(model, profile: Profile, sample: int = 20000) -> int:
    """The KASLR offset of the run ``profile`` (runtime addresses) was recorded
    in, found from the code alone: the 2 MiB step at which the most executed
    translation blocks of the run are blocks of ``model`` (the kernel's own
    vmlinux): they start on an instruction and end on a control transfer. (An
    instruction start alone matches at a wrong offset a quarter of the time.)
    No help from the guest."""
    kernel = np.flatnonzero(~in_modules(profile.range_start))     # (not module code)
    order = kernel[np.argsort(-profile.range_count[kernel], kind="stable")[:sample]]
    starts, lasts = profile.range_start[order], profile.range_last[order]
    if not len(starts):
        raise KbbError("the profile holds no kernel code: no KASLR offset to find")
    insn = model.insns.addr
    # (int3 and ud2 count as neither: a shift into int3 fill, such as the 2 MiB
    # after the entry text, would match every byte)
    flow = model.insns.flow
    transfer = isin(flow, (x86.JMP, x86.IND_JMP, x86.JCC, x86.RET, x86.CALL, x86.IND_CALL))
    code = ~isin(flow, (x86.INTERRUPT, x86.EXCEPTION))
    best, best_hits, second = 0, -1, -1

    def is_insn(addrs):
        i = np.minimum(np.searchsorted(insn, addrs), len(insn) - 1)
        return insn[i] == addrs, i

    for step in range(KASLR_SPAN // KASLR_ALIGN):
        delta = np.uint64(step * KASLR_ALIGN)
        start_ok, k = is_insn(starts - delta)
        last_ok, i = is_insn(lasts - delta)
        hits = int((start_ok & code[k] & last_ok & transfer[i]).sum())
        if hits > best_hits:
            best, best_hits, second = step, hits, best_hits
        elif hits > second:
            second = hits
    if best_hits < 0.5 * len(starts) or second > 0.5 * best_hits:
        raise KbbError("the KASLR offset of the recorded run cannot be told from the code "
                       f"({best_hits:,} of {len(starts):,} blocks match at best): record with "
                       "--nokaslr, or check that --vmlinux is the kernel that ran")
    return best * KASLR_ALIGN


@dataclass
class GuestRecording:
    """What ``record_guest`` found besides the profile."""

    boot: object                 # the BootResult
    kaslr_offset: int            # what the profile was shifted by (0: none)
    kaslr: str                   # "off", "found from the code"
    cutoff: str                  # "whole run", "between the markers"
    modules: ModuleMap | None = None     # the modules' code sections the guest printed
    # Executions of code that is neither vmlinux's nor a known module section's
    # (BPF programs, trampolines, modules the guest did not list): left out.
    other_code: int = 0


def record_guest(kernel, *, vmlinux, initrd=None, drives=(), append: str = "",
                 qemu_args=(), start: str | None = None, stop: str | None = None,
                 expect_text: str | None = None, kaslr: bool = True, smp: int = 1,
                 memory: str = "512M", timeout: float = 600,
                 tolerate_warnings: bool = False,
                 modules_tree=None) -> tuple[Profile, GuestRecording]:
    """Record any guest: a kernel with the user's initramfs and/or disk images,
    kernel command line and QEMU arguments. By default the whole run until the
    guest powers off; with ``start``/``stop``, only between the first console
    line containing ``start`` and the first line after it containing ``stop``
    (the plugin cuts there itself, watching the console as the guest writes it).
    The KASLR offset is found from the recorded code and ``vmlinux``.

    Module code is kept as (module, section, offset) where the guest's console
    said where its modules' sections were (``grep . /sys/module/*/sections/.*text*``
    lines, see profile.modules); ``modules_tree`` (a modules directory with the
    .ko files) gives their sizes."""
    from kbuild_bolt.binary.model import BinaryModel

    if stop is not None and start is None:
        raise KbbError("--stop-marker needs --start-marker")
    plugin = plugin_path()
    thunks = thunk_arguments(vmlinux)
    with tempfile.TemporaryDirectory(prefix="kbuild-bolt-profile-") as tmp:
        out = os.path.join(tmp, "tb.txt")
        console = os.path.join(tmp, "console.txt")
        gate = []
        if start is not None:
            gate = [f"console={console}", f"start={start.encode().hex()}"]
        if stop is not None:
            gate.append(f"stop={stop.encode().hex()}")
        result = boot(kernel, initrd, lab=False, expect_text=expect_text, kaslr=kaslr,
                      timeout=timeout, smp=smp, memory=memory, append=append, drives=drives,
                      console_to=console,
                      extra_qemu=["-plugin", ",".join([f"{plugin}", f"out={out}", *thunks,
                                                       *gate]), *ICOUNT, *qemu_args])
        _check_profiling_boot(result, out, tolerate_warnings)
        state = plugin_cutoff(out)
        if start is not None and state == 0:
            raise KbbError(f"the start marker {start!r} never appeared on the console")
        if stop is not None and state == 1:
            raise KbbError(f"the stop marker {stop!r} never appeared after the start marker")
        modules = parse_sysfs_lines(result.log_lines)
        if modules_tree is not None and len(modules):
            add_sizes(modules, modules_tree)
        profile = parse_plugin_output(out, modules)
    offset, how = 0, "off"
    if result.kaslr:
        offset, how = find_kaslr_offset(BinaryModel.open(vmlinux), profile), \
            "found from the code"
    profile = profile.shifted(offset) if offset else profile
    profile, other = without_other_code(profile, vmlinux_code_spans(vmlinux))
    return profile, GuestRecording(result, offset, how,
                                   "between the markers" if start else "whole run",
                                   modules, other)


def _check_profiling_boot(result, out, tolerate_warnings: bool) -> None:
    """The boot a profile comes from ran as it must (or, ``tolerate_warnings``, ran
    to its end with only warnings: a broken peer's output measured), and the
    plugin wrote its profile."""
    warned_only = (not result.timed_out and not result.missing
                   and (result.markers or not result.lab)
                   and all(p.kind in ("warning", "return-thunk") for p in result.problems))
    if not (result.ok or (tolerate_warnings and warned_only)):
        raise KbbError(f"profiling boot failed: {result.summary().splitlines()[0]} "
                       f"({'; '.join(p.line for p in result.problems[:2]) or 'see log'})")
    if not os.path.exists(out):
        raise KbbError("the QEMU plugin wrote no profile (did the guest power off?)")


def record_run(kernel, initrd, workload: str, iterations: int, kaslr: bool = True,
               timeout: float = 600, smp: int = 1, memory: str = "512M",
               tolerate_warnings: bool = False, append: str = "",
               vmlinux=None) -> tuple[Profile, object]:
    """Boot once with the plugin; returns (profile in vmlinux addresses, boot result).

    ``tolerate_warnings``: profile a kernel that warns but runs the workload to
    the end (to measure a broken peer's output, e.g. BOLT's). ``append``: more
    kernel command line (``kbb.events=1``: trace events on during the workload).
    ``vmlinux``: the kernel's symbols (default: ``kernel`` itself when it is an
    ELF vmlinux), for following calls through retpoline thunks."""
    plugin = plugin_path()
    thunks = thunk_arguments(vmlinux or kernel)
    with tempfile.TemporaryDirectory(prefix="kbuild-bolt-profile-") as tmp:
        out = os.path.join(tmp, "tb.txt")
        result = boot(kernel, initrd, workload=workload, iterations=iterations, kaslr=kaslr,
                      timeout=timeout, smp=smp, memory=memory, append=append,
                      extra_qemu=["-plugin", ",".join([f"{plugin}", f"out={out}", *thunks]),
                                  *ICOUNT])
        _check_profiling_boot(result, out, tolerate_warnings)
        profile = parse_plugin_output(out)
    if result.text_base is None:
        raise KbbError("the guest did not report its _text (lab /init marker KBB-TEXT missing)")
    # Runtime -> vmlinux addresses (KASLR moves the whole kernel by one offset).
    return profile.shifted(result.text_base - DEFAULT_TEXT), result


# The lab /init's lines around the workload's measured loop (after its setup,
# before its teardown): the recorder's cut-off.
LAB_START = "KBB-LOOP begin"
LAB_STOP = "KBB-LOOP end"


def record(kernel, initrd, workload: str = "files", iterations: tuple[int, int] | int = (2, 12),
           kaslr: bool = True, timeout: float = 600, smp: int = 1, log=None,
           tolerate_warnings: bool = False, append: str = "", vmlinux=None,
           modules_tree=None) -> Profile:
    """The lab workload's profile, one user of :func:`record_guest`: the lab /init
    runs the workload (``iterations``: a count, or SHORT,LONG as the two-run
    recorder took it: LONG - SHORT), and the plugin records only between the
    lines it prints around the workload's loop (its setup and teardown, run once
    whatever the count, are left out, as the two runs' difference left them).
    The KASLR offset is found from the code; the lab /init's own report of
    ``_text`` must agree with it."""
    n = iterations if isinstance(iterations, int) else iterations[1] - iterations[0]
    if n <= 0:
        raise KbbError("the workload needs at least one iteration")
    if log:
        log(f"profiling {workload}: {n} iterations")
    args = f"kbb.workload={workload} kbb.iterations={n}" + (f" {append}" if append else "")
    profile, recording = record_guest(
        kernel, vmlinux=vmlinux or kernel, initrd=initrd, append=args,
        start=LAB_START, stop=LAB_STOP, expect_text="KBB-MARK done",
        kaslr=kaslr, smp=smp, timeout=timeout, tolerate_warnings=tolerate_warnings,
        modules_tree=modules_tree)
    reported = recording.boot.text_base
    if reported is not None and reported - DEFAULT_TEXT != recording.kaslr_offset:
        raise KbbError(f"KASLR offset {recording.kaslr_offset:#x} found from the code, but the "
                       f"guest reports _text at {reported:#x}")
    profile.source = f"qemu:{workload}:{n}"
    return profile


def record_boot(kernel, initrd, workload: str = "files", iterations: int = 10,
                kaslr: bool = True, timeout: float = 600, smp: int = 1,
                vmlinux=None) -> Profile:
    """One run, boot included."""
    profile, _ = record_run(kernel, initrd, workload, iterations, kaslr, timeout, smp,
                            vmlinux=vmlinux)
    profile.source = f"qemu:{workload}:{iterations}+boot"
    return profile
