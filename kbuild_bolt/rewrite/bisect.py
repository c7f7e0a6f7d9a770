"""``kbuild-bolt bisect``: find the functions whose rewrite breaks the kernel.

"Bisecting in BOLT: limit optimizations to a set of functions; works well
with VM turnaround time", automated: rewrite every function the options would
rewrite and boot the result; if it fails (a missing marker, a WARNING, an
Oops...), rewrite subsets and boot them, keeping a failing subset, until the
set cannot shrink. With one culprit that is log2(n) boots; interacting
culprits are found too (the subset search keeps what the other half needs).
The vmlinux is read once; each step writes a rewritten kernel and boots it
(PVH, or a bzImage rebuilt from a kernel build tree for KASLR).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field, replace

from kbuild_bolt.errors import KbbError
from kbuild_bolt.rewrite.engine import RewriteOptions, Session, rewrite


@dataclass
class BisectResult:
    total: int = 0
    culprits: list[str] = field(default_factory=list)
    boots: int = 0
    failing_lines: list[str] = field(default_factory=list)
    full_run_ok: bool = False

    def summary(self) -> str:
        if self.full_run_ok:
            return (f"bisect: the kernel with all {self.total:,} functions rewritten boots "
                    "clean; nothing to bisect")
        lines = [f"bisect: {len(self.culprits)} of {self.total:,} rewritten functions make the "
                 f"kernel fail ({self.boots} boots):"]
        lines += [f"  {name}" for name in self.culprits]
        if self.failing_lines:
            lines.append("failing log lines with only those rewritten:")
            lines += [f"  {line}" for line in self.failing_lines]
        return "\n".join(lines)


class Bisector:
    def __init__(self, vmlinux, initrd, options: RewriteOptions, boot_kwargs: dict,
                 make_bootable=None, log=print):
        self.vmlinux = vmlinux
        self.initrd = initrd
        self.options = replace(options, progress=False)
        self.boot_kwargs = boot_kwargs
        self.make_bootable = make_bootable
        self.log = log
        self.session = Session(vmlinux)
        self.workdir = tempfile.mkdtemp(prefix="kbuild-bolt-bisect-")
        self.boots = 0
        self.last_failure: list[str] = []

    def run(self, funcs: set[str] | None):
        """Rewrite ``funcs`` (None: all) and boot; returns (ok, rewritten names, lines)."""
        from kbuild_bolt.qemu.runner import boot

        out = os.path.join(self.workdir, "vmlinux")
        options = replace(self.options, funcs=funcs)
        result = rewrite(self.vmlinux, out, options, session=self.session)
        kernel = self.make_bootable(out) if self.make_bootable else out
        outcome = boot(kernel, self.initrd, **self.boot_kwargs)
        self.boots += 1
        lines = [f"{p.kind}: {p.line}" for p in outcome.problems]
        lines += [f"missing marker: {m}" for m in outcome.missing]
        if outcome.timed_out:
            lines.append("timed out")
        return outcome.ok, result.rewritten_names, lines

    def fails(self, funcs: list[str]) -> bool:
        ok, _names, lines = self.run(set(funcs))
        self.log(f"  bisect: {len(funcs):>6,} functions rewritten -> {'ok' if ok else 'FAILS'}")
        if not ok:
            self.last_failure = lines
        return not ok

    def minimize(self, candidates: list[str], fixed: list[str]) -> list[str]:
        """A minimal subset M of ``candidates`` such that fixed + M fails."""
        if len(candidates) <= 1:
            return candidates
        half = len(candidates) // 2
        a, b = candidates[:half], candidates[half:]
        if self.fails(fixed + a):
            return self.minimize(a, fixed)
        if self.fails(fixed + b):
            return self.minimize(b, fixed)
        ma = self.minimize(a, fixed + b)
        mb = self.minimize(b, fixed + ma)
        return ma + mb

    def bisect(self) -> BisectResult:
        result = BisectResult()
        ok, names, lines = self.run(self.options.funcs)
        self.boots = 1
        result.total = len(names)
        if ok:
            result.full_run_ok = True
            result.boots = self.boots
            return result
        self.log(f"  bisect: all {len(names):,} rewritten functions -> FAILS; narrowing down")
        self.last_failure = lines
        culprits = self.minimize(sorted(names), [])
        # The failure lines of exactly the culprit set.
        ok, _names, lines = self.run(set(culprits))
        if ok:
            raise KbbError("bisect: the failure does not reproduce with the culprit set alone "
                           "(flaky boot?)")
        result.culprits = culprits
        result.failing_lines = lines
        result.boots = self.boots
        return result


def run_bisect(vmlinux, initrd, options, boot_kwargs, make_bootable=None) -> BisectResult:
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    return Bisector(vmlinux, initrd, options, boot_kwargs, make_bootable, log).bisect()
