"""An exact kernel profile from QEMU (no LBR hardware needed).

A small TCG plugin (kbb_plugin.c, compiled with the machine's gcc on first use
and cached) counts every execution of every kernel translation block and every
transition between two of them. Translation blocks end at branches, so with
the decoded code these give exact branch edges.

The plugin sees the whole run, boot included. ``record`` boots twice under
``-icount`` (deterministic guest time: the two boots are near identical) with a
short and a long workload and keeps the difference: the workload alone. Runtime
addresses are mapped back to vmlinux addresses through the running kernel's
``_text`` (printed by the lab /init), so KASLR boots work too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kbuild_bolt.errors import KbbError
from kbuild_bolt.cache import cache_root, locked
from kbuild_bolt.qemu.runner import DEFAULT_TEXT, boot
from kbuild_bolt.profile.model import Profile, combine
from kbuild_bolt.profile.thunks import thunk_ranges

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


def parse_plugin_output(path) -> Profile:
    """TB counts become ranges; TB transitions become transfers (last insn -> start);
    calls followed through retpoline thunks become transfers from the call to its
    real target (the thunk call itself is a transition too)."""
    rs, rl, rc, es, ed, ec = [], [], [], [], [], []
    stats = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if parts[0] == "T":
                rs.append(int(parts[1], 16))
                rl.append(int(parts[2], 16))
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
    return Profile(np.array(rs, dtype=np.uint64), np.array(rl, dtype=np.uint64),
                   np.array(rc, dtype=np.int64), np.array(es, dtype=np.uint64),
                   np.array(ed, dtype=np.uint64), np.array(ec, dtype=np.int64),
                   source="qemu", stats=stats).merged()


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
        warned_only = (not result.timed_out and not result.missing and result.markers
                       and all(p.kind in ("warning", "return-thunk") for p in result.problems))
        if not (result.ok or (tolerate_warnings and warned_only)):
            raise KbbError(f"profiling boot failed: {result.summary().splitlines()[0]} "
                           f"({'; '.join(p.line for p in result.problems[:2]) or 'see log'})")
        if not os.path.exists(out):
            raise KbbError("the QEMU plugin wrote no profile")
        profile = parse_plugin_output(out)
    if result.text_base is None:
        raise KbbError("the guest did not report its _text (lab /init marker KBB-TEXT missing)")
    # Runtime -> vmlinux addresses (KASLR moves the whole kernel by one offset).
    return profile.shifted(result.text_base - DEFAULT_TEXT), result


def record(kernel, initrd, workload: str = "files", iterations: tuple[int, int] = (2, 12),
           kaslr: bool = True, timeout: float = 600, smp: int = 1, log=None,
           tolerate_warnings: bool = False, append: str = "", vmlinux=None) -> Profile:
    """The workload's profile: a long run minus a short one (boot cancels out)."""
    short_n, long_n = iterations
    if long_n <= short_n:
        raise KbbError("the long run needs more iterations than the short one")
    if log:
        log(f"profiling {workload}: {short_n} iterations")
    short, _ = record_run(kernel, initrd, workload, short_n, kaslr, timeout, smp,
                          tolerate_warnings=tolerate_warnings, append=append, vmlinux=vmlinux)
    if log:
        log(f"profiling {workload}: {long_n} iterations")
    long, _ = record_run(kernel, initrd, workload, long_n, kaslr, timeout, smp,
                         tolerate_warnings=tolerate_warnings, append=append, vmlinux=vmlinux)
    profile = combine([long, short], [1.0, -1.0])
    profile.source = f"qemu:{workload}:{long_n - short_n}"
    return profile


def record_boot(kernel, initrd, workload: str = "files", iterations: int = 10,
                kaslr: bool = True, timeout: float = 600, smp: int = 1,
                vmlinux=None) -> Profile:
    """One run, boot included."""
    profile, _ = record_run(kernel, initrd, workload, iterations, kaslr, timeout, smp,
                            vmlinux=vmlinux)
    profile.source = f"qemu:{workload}:{iterations}+boot"
    return profile
