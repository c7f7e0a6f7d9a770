"""Kbuild integration pieces that need no kernel build: the committed patches,
install-hooks' refusals, initramfs repacking with every compression, module checks
on small assembled modules."""

import gzip
import io
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kbuild_bolt.cli import whole_lines
from kbuild_bolt.errors import KbbError
from kbuild_bolt.initramfs import cpio
from kbuild_bolt.initramfs.repack import Compression, compress, detect, list_entries, split
from kbuild_bolt.kbuild import hooks
from kbuild_bolt.kbuild.modules import read_module

REPO = Path(__file__).resolve().parents[2]
KBB = [sys.executable, "-m", "kbuild_bolt"]


def run_cli(*args):
    return subprocess.run([*KBB, *map(str, args)], capture_output=True, text=True)


def added_file(patch: str, path: str) -> str:
    """The content of a file the patch creates."""
    part = patch.split(f"+++ b/{path}\n", 1)[1]
    part = part.split("\n--- ", 1)[0]
    lines = part.splitlines()[1:]   # skip the @@ line
    return "".join(line[1:] + "\n" for line in lines if line.startswith("+"))


@pytest.mark.parametrize("series", hooks.SUPPORTED)
def test_committed_patch_carries_the_current_files(series):
    patch = hooks.committed_patch(series).read_text()
    assert added_file(patch, "scripts/Kconfig.bolt") == (REPO / "kconfig/Kconfig.bolt").read_text()
    assert added_file(patch, "scripts/Makefile.bolt") == (REPO / "Makefile.bolt").read_text()
    # The hook's leading blank line may be context in the diff.
    assert "".join(f"+{line}\n" for line in hooks.VMLINUX_HOOK.strip("\n").splitlines()) in patch
    assert '+source "scripts/Kconfig.bolt"' in patch
    # The kallsyms reserve, as hooks.py writes it today.
    for line in hooks.LINK_RESERVE.strip("\n").splitlines():
        assert f"+{line}\n" in patch, line
    for line in hooks.KALLSYMS_GLOBALS.strip("\n").splitlines()[1:]:   # (after context)
        assert f"+{line}\n" in patch, line


def fake_tree(tmp_path, version, patchlevel):
    tree = tmp_path / "linux"
    tree.mkdir()
    (tree / "Makefile").write_text(f"VERSION = {version}\nPATCHLEVEL = {patchlevel}\n"
                                   "SUBLEVEL = 0\n")
    return tree


def test_install_hooks_refuses_unsupported_version(tmp_path):
    tree = fake_tree(tmp_path, 5, 10)
    proc = run_cli("install-hooks", tree)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "Linux 5.10 is not supported" in proc.stderr and "ARCH_POSTLINK" in proc.stderr


def test_install_hooks_refuses_non_tree_and_broken_tree(tmp_path):
    proc = run_cli("install-hooks", tmp_path)
    assert proc.returncode == 2 and "not a kernel source tree" in proc.stderr
    tree = fake_tree(tmp_path, 6, 12)   # 6.12, but not the files the patch expects
    proc = run_cli("install-hooks", tree)
    assert proc.returncode == 2 and "does not apply cleanly" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tree / "scripts").exists()   # nothing half-applied


# ---------------------------------------------------------------------------
# initramfs repacking

def fake_module(tmp_path: Path, name: str, payload: str) -> bytes:
    """A relocatable object with a .modinfo, like a .ko as far as depmod cares."""
    src = tmp_path / f"{name}.c"
    src.write_text(f'__attribute__((section(".modinfo"), used)) static const char n[] = '
                   f'"name={name}";\n'
                   f'__attribute__((section(".modinfo"), used)) static const char v[] = '
                   f'"vermagic=6.12.0-test SMP mod_unload ";\n'
                   f'const char {name}_payload[] = "{payload}";\n')
    out = tmp_path / f"{name}.ko"
    subprocess.run(["gcc", "-c", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


RELEASE = "6.12.0-test"


def fake_initramfs(tmp_path: Path, method: str, early: bool = True) -> tuple[Path, Path]:
    """An initramfs like a distro's (early cpio + compressed main cpio) and a new
    modules directory with different module bytes."""
    mods = tmp_path / "old" / "lib/modules" / RELEASE / "kernel/lib"
    mods.mkdir(parents=True)
    old_a = fake_module(mods.parent.parent.parent, "alpha", "old")
    entries = [cpio.directory("usr"), cpio.directory("usr/lib"),
               cpio.regular("init", b"#!/bin/sh\necho hi\n", mode=0o755, mtime=1234),
               cpio.symlink("lib", "usr/lib"),
               cpio.directory(f"usr/lib/modules/{RELEASE}/kernel/lib"),
               cpio.regular(f"usr/lib/modules/{RELEASE}/kernel/lib/alpha.ko", old_a, mtime=99),
               cpio.regular(f"usr/lib/modules/{RELEASE}/modules.dep", b"stale\n"),
               cpio.regular("etc/motd", b"keep me\n", mtime=42)]
    main = cpio.write_archive(entries) + b"\0" * 512
    front = b""
    if early:
        front = cpio.write_archive([cpio.directory("kernel"),
                                    cpio.regular("kernel/x86/microcode/GenuineIntel.bin",
                                                 b"blob")])
    image = tmp_path / f"initrd.{method}"
    image.write_bytes(front + compress(main, Compression(method)))
    new = tmp_path / "new"
    newmods = new / "lib/modules" / RELEASE / "kernel/lib"
    newmods.mkdir(parents=True)
    (newmods / "alpha.ko").write_bytes(fake_module(tmp_path, "alpha", "new, optimized"))
    return image, new


@pytest.mark.parametrize("method", ["gzip", "xz", "zstd", "lz4", "bzip2", "lzma"])
def test_repack_replaces_only_modules_and_keeps_compression(tmp_path, method):
    if method in ("zstd", "lz4") and shutil.which(method) is None:
        pytest.fail(f"{method} missing: scripts/setup installs it")
    image, new = fake_initramfs(tmp_path, method)
    out = tmp_path / "out.img"
    proc = run_cli("repack-initramfs", image, out, "--modules", new)
    assert proc.returncode == 0, proc.stderr
    before, after = split(image.read_bytes()), split(out.read_bytes())
    assert after.compression.name == method
    assert after.early == before.early and before.early
    old, fresh = list_entries(image), list_entries(out)
    assert [e.name for e in old] == [e.name for e in fresh]
    by_name = {e.name: e for e in fresh}
    module = by_name[f"usr/lib/modules/{RELEASE}/kernel/lib/alpha.ko"]
    assert module.data == (new / "lib/modules" / RELEASE / "kernel/lib/alpha.ko").read_bytes()
    assert module.mtime == 99
    dep = by_name[f"usr/lib/modules/{RELEASE}/modules.dep"].data
    assert dep == b"kernel/lib/alpha.ko:\n"   # regenerated by depmod for this set
    for a, b in zip(old, fresh):
        if not a.name.endswith((".ko", "modules.dep")):
            assert a.encode() == b.encode(), a.name
    # The trailing zero padding of the main archive is kept too.
    assert after.archives[0][1].endswith(b"\0" * 512)


def test_repack_errors_are_one_line_and_write_nothing(tmp_path):
    image, new = fake_initramfs(tmp_path, "gzip")
    out = tmp_path / "out.img"
    other = tmp_path / "other/lib/modules/5.10.0-other/kernel"
    other.mkdir(parents=True)
    (other / "x.ko").write_bytes(b"x")
    cases = [
        ((image, out, "--modules", tmp_path / "other"), "modules built against another kernel"),
        ((tmp_path / "missing", out, "--modules", new), "no such file"),
        ((REPO / "README.md", out, "--modules", new), "unknown initramfs compression"),
        ((image, out, "--modules", tmp_path / "nowhere"), "no such directory"),
    ]
    for args, message in cases:
        proc = run_cli("repack-initramfs", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not out.exists()
    # No modules inside: nothing to replace is an error, not a silent copy.
    bare = tmp_path / "bare.img"
    bare.write_bytes(gzip.compress(cpio.write_archive([cpio.regular("init", b"x")])))
    proc = run_cli("repack-initramfs", bare, out, "--modules", new)
    assert proc.returncode == 2 and "holds no kernel modules" in proc.stderr
    # A truncated compressed part.
    cut = tmp_path / "cut.img"
    cut.write_bytes(image.read_bytes()[:-40])
    proc = run_cli("repack-initramfs", cut, out, "--modules", new)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_detect_knows_the_kernel_formats():
    assert detect(gzip.compress(b"x")).name == "gzip"
    assert detect(lzma.compress(b"x", format=lzma.FORMAT_XZ)).name == "xz"
    assert detect(lzma.compress(b"x", format=lzma.FORMAT_ALONE)).name == "lzma"
    assert detect(b"070701") is None
    with pytest.raises(KbbError, match="lzo"):
        detect(b"\x89LZO\x00")


def test_read_module_finds_vermagic_and_name(tmp_path):
    path = tmp_path / "beta.ko"
    path.write_bytes(fake_module(tmp_path, "beta", "x"))
    info = read_module(path)
    assert info.name == "beta" and info.vermagic == "6.12.0-test SMP mod_unload "
    assert info.imports == []


class _RecordedWrites(io.RawIOBase):
    """A raw file that keeps each write(2) it would have made."""

    def __init__(self):
        self.writes: list[bytes] = []

    def writable(self):
        return True

    def write(self, data):
        self.writes.append(bytes(data))
        return len(data)


def test_each_printed_line_is_one_write_under_pythonunbuffered():
    """make -j runs many kbuild-bolt processes on one pipe: with PYTHONUNBUFFERED
    print() would write a line's text and its newline apart, and another
    module's line could land between them (seen on CI)."""
    raw = _RecordedWrites()
    unbuffered = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    print("module loop: left as it is: has debug info", file=unbuffered)
    assert len(raw.writes) == 2                  # what went wrong: text, then "\n"
    raw.writes.clear()
    stream = whole_lines(unbuffered)
    assert stream is unbuffered
    print("module loop: left as it is: has debug info", file=stream)
    print("  BOLT    ext4.ko", "laid out", file=stream)
    assert raw.writes == [b"module loop: left as it is: has debug info\n",
                          b"  BOLT    ext4.ko laid out\n"]
