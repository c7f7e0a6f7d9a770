"""`kbuild-bolt boot` on every lab kernel: KASLR on and off, both workloads, PVH,
Debian's distro vmlinux, and a deliberately broken kernel that must be caught."""

import json
import shutil
import subprocess
import sys

import pytest

from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.qemu.runner import DEFAULT_TEXT, boot


def assert_clean(result):
    assert result.ok, result.summary() + "\n" + "\n".join(result.log_lines[-40:])
    assert not result.problems
    assert result.plan and not result.missing


@pytest.mark.parametrize("workload", ["files", "server"])
@pytest.mark.parametrize("kaslr", [True, False], ids=["kaslr", "nokaslr"])
def test_boot_lab_bzimage(lab, workload, kaslr):
    result = boot(lab.bzimage, lab.initramfs, workload=workload, kaslr=kaslr, iterations=5)
    assert_clean(result)
    assert "module:test_static_keys" in result.markers
    assert f"workload-end:{workload}" in result.markers
    assert result.entry == "bzImage"
    if kaslr:
        if result.text_base == DEFAULT_TEXT:  # 1 in ~500: the random slot was the default one
            result = boot(lab.bzimage, lab.initramfs, workload="none", kaslr=True)
            assert_clean(result)
        assert result.text_base != DEFAULT_TEXT
    else:
        assert result.text_base == DEFAULT_TEXT


def test_boot_lab_vmlinux_pvh(lab):
    result = boot(lab.vmlinux, lab.initramfs, workload="files", iterations=3)
    assert_clean(result)
    assert result.entry == "pvh"
    assert result.kaslr is False
    assert result.text_base == DEFAULT_TEXT


@pytest.mark.distro
def test_boot_distro_vmlinux_pvh(distro, tmp_path):
    from kbuild_bolt.lab.initramfs import build_lab_initramfs

    initrd = build_lab_initramfs(tmp_path / "initrd.gz")
    # (the kallsyms channel keeps the second serial port busy: a PREEMPT_RT
    # kernel, rt-amd64, disables its IRQ there unless booted with noirqdebug)
    dump = tmp_path / "kallsyms.txt"
    result = boot(distro.vmlinux, initrd, workload="files", iterations=3, memory="1G",
                  kallsyms_to=dump)
    assert_clean(result)
    assert len(dump.read_text().splitlines()) > 50000
    rt = "CONFIG_PREEMPT_RT=y" in distro.config.read_text().splitlines()
    assert ("noirqdebug" in result.cmdline.split()) == rt, result.cmdline


def test_boot_cli_json(lab_regular, tmp_path):
    log = tmp_path / "console.log"
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "boot", str(lab_regular.bzimage),
                           "--initrd", str(lab_regular.initramfs), "--workload", "server",
                           "--iterations", "2", "--json", "--log", str(log)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["kaslr"] is True
    assert result["markers"][-1] == "done"
    assert "KBB-MARK done" in log.read_text()


def _function_offset(image, name):
    symbols = image.symbols
    addr = symbols.address(name)
    section = image.section_at(addr)
    return addr, section.offset + (addr - section.addr)


def test_broken_kernel_is_reported(lab_regular, tmp_path):
    """A ud2 planted at the start of pipe2() oopses in the workload: the boot fails."""
    broken = tmp_path / "vmlinux.broken"
    shutil.copyfile(lab_regular.vmlinux, broken)
    with ElfImage(broken) as image:
        _addr, offset = _function_offset(image, "__x64_sys_pipe2")
    with open(broken, "r+b") as f:
        f.seek(offset)
        f.write(b"\x0f\x0b")
    result = boot(broken, lab_regular.initramfs, workload="files", iterations=1, timeout=60)
    assert not result.ok
    kinds = {p.kind for p in result.problems}
    assert kinds & {"oops", "bug", "panic"}, result.summary()
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "boot", str(broken),
                           "--initrd", str(lab_regular.initramfs), "--iterations", "1",
                           "--timeout", "60"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout


def test_kernel_without_init_is_reported(lab_regular):
    """No init to run: the kernel panics, no marker appears, the boot fails."""
    result = boot(lab_regular.bzimage, lab_regular.initramfs, workload="none",
                  append="rdinit=/nonexistent init=/nonexistent", timeout=60)
    assert not result.ok
    assert result.missing
    assert "panic" in {p.kind for p in result.problems}


def test_hung_kernel_times_out(lab_regular):
    """A shell waiting on the console instead of /init: killed at the timeout, reported."""
    result = boot(lab_regular.bzimage, lab_regular.initramfs, workload="none",
                  append="rdinit=/bin/busybox -- sh", timeout=15)
    assert result.timed_out
    assert not result.ok


def test_boot_rejects_non_kernel(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\0" * 4096)
    proc = subprocess.run([sys.executable, "-m", "kbuild_bolt", "boot", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kbuild-bolt: error: {path}: neither a bzImage nor an ELF vmlinux"]
