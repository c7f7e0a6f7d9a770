"""Check that a refactoring changed no output byte: rewrite every lab kernel and
Debian's distro vmlinux with the code of another revision and with this
checkout, and compare the files.

    .venv/bin/python benchmarks/same_outputs.py --base REV [--kernels ...]

Layouts: ``random`` (seed 7), ``reverse`` and ``ext-tsp`` with an exact QEMU
profile of the ``files`` workload (recorded once per kernel and cached under
``~/.cache/kbuild-bolt/bench/``). The base revision runs from a temporary git
worktree with the same Python environment. Prints one line per rewrite and a
Markdown table (for a closing note or RESULTS.md); exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kbuild_bolt.cache import cache_root
from kbuild_bolt.lab.distro import distro_kernel
from kbuild_bolt.lab.initramfs import build_lab_initramfs
from kbuild_bolt.lab.kernels import FLAVORS, lab_kernel

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"random": ["--reorder-blocks", "random", "--seed", "7"],
           "reverse": ["--reorder-blocks", "reverse"],
           "ext-tsp": ["--reorder-blocks", "ext-tsp"]}


def kernels(names) -> dict[str, tuple[Path, Path | None, Path]]:
    """name -> (vmlinux, bzImage or None, initramfs)."""
    out = {}
    for name in names:
        if name == "distro":
            k = distro_kernel()
            plain = cache_root() / "bench" / "plain-initramfs.cpio.gz"
            if not plain.exists():
                plain.parent.mkdir(parents=True, exist_ok=True)
                build_lab_initramfs(plain)   # (no lab modules: they are not for this kernel)
            out[name] = (k.vmlinux, None, plain)
        else:
            k = lab_kernel(name)
            out[name] = (k.vmlinux, k.bzimage, k.initramfs)
    return out


def profile_for(name: str, vmlinux: Path, bzimage: Path | None, initrd: Path) -> Path:
    digest = hashlib.sha256(f"{vmlinux}:{vmlinux.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    path = cache_root() / "bench" / f"files-{name}-{digest}.kbb"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "kbuild_bolt", "profile", "record",
               "--kernel", str(bzimage or vmlinux), "--vmlinux", str(vmlinux),
               "--initrd", str(initrd), "--workload", "files", "-o", str(path)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def rewrite(code_root: Path, vmlinux: Path, out: Path, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "rewrite", str(vmlinux),
                           "-o", str(out), "-q", *args], env=env, capture_output=True,
                          text=True, cwd=code_root)
    if proc.returncode != 0:
        raise SystemExit(f"rewrite failed ({code_root}): {proc.stderr.strip()[-500:]}")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--kernels", nargs="+", default=[*FLAVORS, "distro"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    args = parser.parse_args()
    rows, differ = [], False
    with tempfile.TemporaryDirectory(prefix="kbb-same-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.base], check=True, capture_output=True)
        try:
            for name, (vmlinux, bzimage, initrd) in kernels(args.kernels).items():
                for layout in args.layouts:
                    extra = list(LAYOUTS[layout])
                    if layout == "ext-tsp":
                        extra += ["--profile", str(profile_for(name, vmlinux, bzimage, initrd))]
                    out = Path(tmp) / "vmlinux.out"
                    old = rewrite(base, vmlinux, out, extra)
                    new = rewrite(ROOT, vmlinux, out, extra)
                    same = old == new
                    differ |= not same
                    rows.append((name, layout, new[:16], "identical" if same else "DIFFERENT"))
                    print(f"{name:<14} {layout:<8} {new[:16]} "
                          f"{'identical' if same else 'DIFFERENT from ' + old[:16]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           capture_output=True)
    print(f"\n| kernel | layout | sha256 (first 16) | against {args.base} |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
