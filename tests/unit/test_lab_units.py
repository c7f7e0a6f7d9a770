"""Pieces of the lab that need no kernel: cpio, /init, config fragments, log scanning."""

import gzip

import pytest

from kbuild_bolt.errors import KbbError
from kbuild_bolt.initramfs import cpio
from kbuild_bolt.lab.initramfs import build_lab_initramfs, render_init
from kbuild_bolt.lab.kernels import apply_fragment, fragment_mismatches, parse_config
from kbuild_bolt.qemu.runner import BootResult, scan_log


def test_cpio_round_trip_is_byte_exact():
    entries = [cpio.directory("bin"), cpio.regular("bin/x", b"abc", mode=0o755),
               cpio.symlink("bin/y", "x"), cpio.char_device("dev/console", 5, 1),
               cpio.regular("empty", b"")]
    blob = cpio.write_archive(entries)
    back, end = cpio.read_archive(blob)
    assert end == len(blob)
    assert [e.name for e in back] == ["bin", "bin/x", "bin/y", "dev/console", "empty"]
    assert back[1].data == b"abc" and back[2].data == b"x"
    assert back[3].rdevmajor == 5 and back[3].rdevminor == 1
    assert cpio.write_archive(back, number_inodes=False) == blob


def test_cpio_errors():
    blob = cpio.write_archive([cpio.regular("a", b"x" * 100)])
    with pytest.raises(KbbError, match="truncated"):
        cpio.read_archive(blob[:150])
    with pytest.raises(KbbError, match="not a newc"):
        cpio.read_archive(b"garbage" * 40)


def test_cpio_matches_gnu_cpio(tmp_path):
    import shutil
    import subprocess
    if shutil.which("cpio") is None:
        pytest.skip("cpio missing")
    blob = cpio.write_archive([cpio.directory("d"), cpio.regular("d/f", b"hello\n")])
    out = subprocess.run(["cpio", "-i", "-d", "--quiet"], input=blob, cwd=tmp_path,
                         capture_output=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d/f").read_bytes() == b"hello\n"


def test_init_plan_lists_modules_and_workload_markers():
    script = render_init(["base", "test"], default_iterations=7)
    assert script.startswith("#!/bin/busybox sh\n")
    assert 'plan="init module:base module:test"' in script
    assert "iterations=7" in script
    assert 'if modprobe test; then echo "KBB-MARK module:test"' in script


def test_lab_initramfs_without_modules(tmp_path):
    out = build_lab_initramfs(tmp_path / "i.gz")
    entries, _ = cpio.read_archive(gzip.decompress(out.read_bytes()))
    names = {e.name for e in entries}
    assert {"init", "bin/busybox", "dev/console"} <= names
    assert not any(n.startswith("lib/modules/") for n in names)


def test_lab_initramfs_needs_modules_dir(tmp_path):
    with pytest.raises(KbbError):
        build_lab_initramfs(tmp_path / "i.gz", modules=["x"])


def test_config_fragment_apply_and_verify(tmp_path):
    config = tmp_path / ".config"
    config.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n")
    wanted = parse_config("CONFIG_A=n\n# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_D=m\n")
    assert wanted == {"CONFIG_A": "n", "CONFIG_B": "y", "CONFIG_D": "m"}
    apply_fragment(config, wanted)
    have = parse_config(config.read_text())
    assert have == {"CONFIG_A": "n", "CONFIG_B": "y", "CONFIG_C": '"x"', "CONFIG_D": "m"}
    assert fragment_mismatches(config.read_text(), wanted) == []
    assert fragment_mismatches("CONFIG_B=y\n", wanted) == ["CONFIG_D=m (got n)"]


def _scan(lines):
    result = BootResult(kernel="k", initrd=None, entry="bzImage", kaslr=True, cmdline="")
    scan_log(lines, result)
    return result


def test_scan_log_clean_run():
    result = _scan(["[0.1] booting", "KBB-PLAN init workload-start:files workload-end:files done",
                    "KBB-MARK init", "KBB-TEXT ffffffff9a000000", "KBB-MARK workload-start:files",
                    "KBB-MARK workload-end:files", "KBB-MARK done"])
    assert result.ok
    assert result.text_base == 0xFFFFFFFF9A000000
    assert result.kaslr_offset == 0x19000000


def test_scan_log_problems_and_missing_markers():
    result = _scan([
        "KBB-PLAN init done", "KBB-MARK init",
        "[ 0.2] WARNING: CPU: 0 PID: 1 at arch/x86/kernel/alternative.c:730 apply_returns+0x1/0x2",
        "[ 0.3] missing return thunk: foo+0x1/0x10-foo+0x6/0x10: e9 00 00 00 00",
        "[ 0.4] Oops: invalid opcode: 0000 [#1] PREEMPT SMP",
        "[ 0.5] Kernel panic - not syncing: Attempted to kill init!",
        "KBB-FAIL workload files",
        "[ 2.7] irq 3: nobody cared (try booting with the \"irqpoll\" option)",
    ])
    assert not result.ok
    assert [p.kind for p in result.problems] == ["warning", "return-thunk", "oops", "panic", "lab",
                                                 "irq"]
    assert result.missing == ["done"]


def test_scan_log_kernel_messages_inside_lab_lines():
    # As seen in CI: a kernel message written to the UART between the plan's
    # last word and its newline, and (worse) in the middle of a word.
    tsc = "[    2.468817] tsc: Refined TSC clocksource calibration: 2445.407 MHz"
    warn = "[    2.500000] WARNING: CPU: 1 PID: 9 at kernel/foo.c:1 foo+0x1/0x2"
    result = _scan(["KBB-PLAN init workload-start:files done" + tsc, "",
                    "KBB-MARK init", "KBB-TEXT ffffffff9a0" + tsc, "00000",
                    "KBB-MARK workload-st" + tsc, "art:files", "KBB-MARK done"])
    assert result.ok, result.summary()
    assert result.plan == ["init", "workload-start:files", "done"]
    assert result.text_base == 0xFFFFFFFF9A000000
    result = _scan(["KBB-PLAN init done", "KBB-MARK in" + warn, "it", "KBB-MARK done"])
    assert result.markers == ["init", "done"]
    assert [(p.kind, p.lineno) for p in result.problems] == [("warning", 2)]
    # A lab line whose writer died mid-line: the next lab line is not glued to it.
    result = _scan(["KBB-PLAN init done", "KBB-MARK in" + tsc, "KBB-MARK done"])
    assert result.markers == ["in", "done"] and result.missing == ["init"]
    # The profile recorder's boots (not the lab's markers, a line of text).
    result = BootResult(kernel="k", initrd=None, entry="bzImage", kaslr=True, cmdline="",
                        lab=False, expect_text="KBB-MARK done")
    scan_log(["KBB-MARK do" + tsc, "ne"], result)
    assert result.ok, result.summary()


def test_scan_log_without_lab_init():
    result = _scan(["[0.1] Kernel panic - not syncing: VFS: Unable to mount root fs"])
    assert not result.ok
    assert result.missing


def test_drive_arguments_tell_qcow2_from_raw(tmp_path):
    from kbuild_bolt.errors import KbbError
    from kbuild_bolt.qemu.runner import drive_arguments

    raw, qcow = tmp_path / "a.img", tmp_path / "b.qcow2"
    raw.write_bytes(b"\0" * 512)
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 508)
    assert drive_arguments([raw, qcow]) == [
        "-drive", f"file={raw},format=raw,if=virtio",
        "-drive", f"file={qcow},format=qcow2,if=virtio"]
    with pytest.raises(KbbError, match="No such file"):
        drive_arguments([tmp_path / "missing.img"])


def test_guest_boot_judged_by_its_own_line():
    from kbuild_bolt.qemu.runner import BootResult, scan_log

    def judged(lines, expect):
        result = BootResult(kernel="k", initrd=None, entry="bzImage", kaslr=True, cmdline="",
                            lab=False, expect_text=expect)
        scan_log(lines, result)
        return result

    up = ["[    0.1] Linux version 6.12", "my system is up", "reboot: Power down"]
    assert judged(up, "system is up").ok and judged(up, None).ok
    assert not judged(up, "never said").ok
    warned = up + ["[    1.0] WARNING: CPU: 0 PID: 1 at kernel/foo.c:1"]
    assert not judged(warned, "system is up").ok
    assert "not seen" in judged(up, "never said").summary()


def test_preempt_rt_from_the_bzimage_version_string(tmp_path):
    """A PREEMPT_RT kernel boots with noirqdebug (QEMU's UART trips the rt
    kernel's unhandled-IRQ count): told by the setup header's version string."""
    from kbuild_bolt.qemu.runner import preempt_rt

    def bzimage(version: bytes):
        head = bytearray(0x1000)
        head[0x202:0x206] = b"HdrS"
        head[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
        head[0x400:0x400 + len(version) + 1] = version + b"\0"
        path = tmp_path / f"bz{len(version)}"
        path.write_bytes(bytes(head) + b"PREEMPT_RT elsewhere does not count")
        return path

    rt = b"6.1.0-57-rt-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_RT Debian 6.1.192-3"
    assert preempt_rt(bzimage(rt), "bzImage")
    assert not preempt_rt(bzimage(b"6.12.117 (root@lab) #1 SMP PREEMPT_DYNAMIC"), "bzImage")
