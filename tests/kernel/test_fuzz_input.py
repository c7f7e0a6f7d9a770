"""Malformed input never crashes the rewrite: random bytes in every kernel table,
every relocation section and the symbol table of a real lab vmlinux.

Each case copies the vmlinux, overwrites a few random bytes at a random place
of one structure, and rewrites it with a random layout. The rewrite either
refuses it (exit 2, one line naming what is wrong, no output file) or
succeeds (exit 0, verified); never exit 3 (an internal error) or a traceback.

Run as a script for more seeds: ``python tests/kernel/test_fuzz_input.py
VMLINUX --seeds 20``.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import sys
from pathlib import Path

import pytest

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.cli import main as cli_main

SEEDS = (1, 2, 3)


def structures(vmlinux) -> dict[str, tuple[int, int]]:
    """(file offset, size) of every kernel table, relocation section, the
    symbol and string tables, and the section headers."""
    out = {}
    model = BinaryModel.open(vmlinux, require_relocations=True)
    image = model.image
    for name, data in model.tables.items():
        section = image.section_at(data.addr)
        if section is not None and section.has_bits and data.size:
            out[name] = (section.offset + data.addr - section.addr, data.size)
    header = image.header
    out["section headers"] = (int(header["shoff"]), int(header["shnum"]) * 64)
    for s in image.sections:
        if s.size and (s.name.startswith(".rela") and not s.name.startswith(".rela.debug")
                       or s.name in (".symtab", ".strtab")):
            out[s.name] = (s.offset, s.size)
    return out


def corrupt(src: Path, dst: Path, where: tuple[int, int], seed: int) -> str:
    """Copy ``src`` to ``dst`` with 1-64 random bytes written inside ``where``."""
    rng = random.Random(seed)
    offset, size = where
    n = min(size, rng.randint(1, 64))
    at = offset + rng.randrange(size - n + 1)
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(at)
        f.write(bytes(rng.randrange(256) for _ in range(n)))
    return f"{n} bytes at file offset {at:#x}"


def run_case(vmlinux: Path, name: str, where, seed: int, workdir: Path) -> tuple[int, str, str]:
    """(exit status, stderr, what was written) of one rewrite of a corrupted copy."""
    bad = workdir / "vmlinux.bad"
    out = workdir / "vmlinux.out"
    what = corrupt(vmlinux, bad, where, seed)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli_main(["rewrite", str(bad), "-o", str(out), "--reorder-blocks", "random",
                           "--seed", str(seed), "-q"])
    leftovers = [p.name for p in workdir.iterdir() if p.name.startswith(".vmlinux.out")]
    text = err.getvalue()
    if status != 0 and out.exists():
        text += f"\n(output written despite exit {status})"
    if leftovers:
        text += f"\n(temporary files left: {leftovers})"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    return status, text, what


def check(status: int, text: str) -> str | None:
    """Why this outcome is wrong (None: fine)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if "temporary files left" in text or "output written despite" in text:
        return text
    if status == 0:
        return None
    if status != 2:
        return f"exit {status}: {text.strip()[-300:]}"
    errors = [line for line in lines if line.startswith("kbuild-bolt: error:")]
    if len(errors) != 1 or "Traceback" in text:
        return f"not one error line: {text.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def regular_structures(lab_regular):
    vmlinux = lab_regular.vmlinux
    return vmlinux, structures(vmlinux)


@pytest.mark.xdist_group("fuzz")
def test_random_bytes_never_crash(regular_structures, tmp_path):
    vmlinux, where = regular_structures
    assert len(where) > 30, sorted(where)
    outcomes, problems = {0: 0, 2: 0}, []
    for name, region in sorted(where.items()):
        for seed in SEEDS:
            status, text, what = run_case(vmlinux, name, region, seed, tmp_path)
            outcomes[status] = outcomes.get(status, 0) + 1
            why = check(status, text)
            if why:
                problems.append(f"{name} (seed {seed}, {what}): {why}")
    assert not problems, "\n".join(problems)
    # Most corruptions are caught (a few land in bytes nothing reads, such as an
    # unused symbol's name).
    assert outcomes[2] > outcomes[0], outcomes


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("vmlinux", type=Path)
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--only", default=None, help="structures whose name contains this")
    args = parser.parse_args()
    where = structures(args.vmlinux)
    with tempfile.TemporaryDirectory() as tmp:
        for name, region in sorted(where.items()):
            if args.only and args.only not in name:
                continue
            for seed in range(1, args.seeds + 1):
                status, text, what = run_case(args.vmlinux, name, region, seed, Path(tmp))
                why = check(status, text)
                last = (text.strip().splitlines() or [""])[-1][:150]
                print(f"{'BAD ' if why else 'ok  '}{status} {name:<28} seed {seed}: {last}",
                      flush=True)
    sys.exit(0)
