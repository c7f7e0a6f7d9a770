"""Recording a guest that knows nothing of kbuild-bolt (issue 14): the user's own
initramfs, the whole run or only between two console lines (the plugin cuts
there itself), the KASLR offset found from the code; `boot --expect` judges
such a guest by a line of the user's choosing."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.initramfs import cpio
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.attach import attach, function_samples
from kbuild_bolt.qemu.runner import DEFAULT_TEXT

pytestmark = pytest.mark.xdist_group("record-guest")

# An /init of the user's: its own words on the console, its own work, then off.
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t devtmpfs dev /dev
echo "my system is up"
awk '$3 == "_text" { print "MY-TEXT " $1; exit }' /proc/kallsyms
echo "== work begins =="
i=0
while [ $i -lt 6 ]; do
    mkdir -p /tmp/w/$i && cp -r /bin /tmp/w/$i/ && find /tmp/w > /dev/null && rm -rf /tmp/w/$i
    i=$((i + 1))
done
echo "== work ends =="
echo "my system is going down"
poweroff -f
"""


@pytest.fixture(scope="module")
def own_initrd(tmp_path_factory) -> Path:
    busybox = Path("/bin/busybox")
    entries = [cpio.directory("bin"), cpio.directory("dev"),
               cpio.char_device("dev/console", 5, 1),
               cpio.regular("bin/busybox", busybox.read_bytes(), 0o755),
               cpio.symlink("bin/sh", "busybox"),
               cpio.regular("init", INIT.encode(), 0o755)]
    out = tmp_path_factory.mktemp("own-initrd") / "initrd.gz"
    out.write_bytes(gzip.compress(cpio.write_archive(entries)))
    return out


def reported_text(recording) -> int:
    line = next(l for l in recording.boot.log_lines if l.startswith("MY-TEXT "))
    return int(line.split()[1], 16)


def test_whole_run_and_between_markers_with_kaslr(own_initrd):
    kernel = lab_kernel("6.12-regular")
    model = BinaryModel.open(kernel.vmlinux)
    whole, rec_whole = qemu.record_guest(kernel.bzimage, vmlinux=kernel.vmlinux,
                                         initrd=own_initrd)
    marked, rec_marked = qemu.record_guest(kernel.bzimage, vmlinux=kernel.vmlinux,
                                           initrd=own_initrd, start="== work begins ==",
                                           stop="== work ends ==")
    for profile, rec in ((whole, rec_whole), (marked, rec_marked)):
        assert rec.boot.ok and rec.boot.kaslr, rec.boot.summary()
        # the offset found from the code is the one the guest's kallsyms shows
        assert rec.kaslr == "found from the code"
        assert DEFAULT_TEXT + rec.kaslr_offset == reported_text(rec)
        assert attach(model, profile).matched > 0.99
    assert rec_whole.cutoff == "whole run" and rec_marked.cutoff == "between the markers"
    # The cut-off is real: boot code ran in the whole run only ...
    init_text = model.image.section(".init.text")
    in_init = model.functions.section == init_text.index
    runs_whole = function_samples(model, attach(model, whole))
    runs_marked = function_samples(model, attach(model, marked))
    assert runs_whole[in_init].sum() > 1_000_000
    assert runs_marked[in_init].sum() == 0
    # ... and the work is in both (copying files: the page cache, the VFS)
    for name in ("step_into", "copy_page_from_iter_atomic"):
        row = model.functions.by_name(name)
        assert runs_marked[row] > 0 and runs_whole[row] >= runs_marked[row]
    assert marked.total < 0.8 * whole.total


def test_record_cli_and_boot_expect(own_initrd, tmp_path):
    kernel = lab_kernel("6.12-regular")
    out = tmp_path / "own.kbb"
    cli = [sys.executable, "-m", "kbuild_bolt"]
    proc = subprocess.run(cli + ["profile", "record", "--kernel", str(kernel.bzimage),
                                 "--vmlinux", str(kernel.vmlinux), "--initrd", str(own_initrd),
                                 "--start-marker", "== work begins ==",
                                 "--stop-marker", "== work ends ==", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "KASLR on, offset 0x" in proc.stdout + proc.stderr and out.exists()
    # a stop text that never comes: a one-line error, nothing written
    bad = tmp_path / "bad.kbb"
    proc = subprocess.run(cli + ["profile", "record", "--kernel", str(kernel.bzimage),
                                 "--vmlinux", str(kernel.vmlinux), "--initrd", str(own_initrd),
                                 "--start-marker", "== work begins ==",
                                 "--stop-marker", "never printed", "-o", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "never appeared" in proc.stderr and not bad.exists()
    assert len(proc.stderr.strip().splitlines()) == 1
    # boot judges the user's guest by the user's line
    good = subprocess.run(cli + ["boot", str(kernel.bzimage), "--initrd", str(own_initrd),
                                 "--expect", "my system is going down"],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    missing = subprocess.run(cli + ["boot", str(kernel.bzimage), "--initrd", str(own_initrd),
                                    "--expect", "a line it never prints"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "not seen" in missing.stdout


def test_offset_is_found_or_refused():
    kernel = lab_kernel("6.12-regular")
    model = BinaryModel.open(kernel.vmlinux)
    from kbuild_bolt.profile.model import Profile

    # one-instruction blocks at control transfers, as QEMU would have run them
    transfers = np.flatnonzero(model.insns.flow != 0)[::37][:5000]
    starts = model.insns.addr[transfers] + np.uint64(0x2a00000)
    shifted = Profile(range_start=starts, range_last=starts,
                      range_count=np.ones(len(starts), np.int64))
    assert qemu.find_kaslr_offset(model, shifted) == 0x2a00000
    noise = Profile(range_start=np.arange(5000, dtype=np.uint64) * np.uint64(7919)
                    + np.uint64(0xffffffff90000001), range_last=starts,
                    range_count=np.ones(5000, np.int64))
    from kbuild_bolt.errors import KbbError
    with pytest.raises(KbbError, match="cannot be told"):
        qemu.find_kaslr_offset(model, noise)


@pytest.fixture(scope="module")
def own_disk(tmp_path_factory) -> Path:
    """An ext2 disk image with the user's root file system (the same /init)."""
    root = tmp_path_factory.mktemp("own-rootfs")
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        (root / d).mkdir()
    (root / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("busybox")
    # (devtmpfs is mounted on the disk's /dev by the kernel: the /init's own mount
    # of it fails harmlessly)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    image = tmp_path_factory.mktemp("own-disk") / "rootfs.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-d", str(root), "-L", "root", str(image),
                    "24M"], check=True, capture_output=True)
    return image


def test_disk_image_with_a_root_file_system(own_disk, tmp_path):
    """A guest that boots from its own disk (virtio, ext2), no initramfs: recorded
    between its markers with KASLR, and judged by its own line."""
    kernel = lab_kernel("6.12-modules")
    model = BinaryModel.open(kernel.vmlinux)
    out = tmp_path / "disk.kbb"
    cli = [sys.executable, "-m", "kbuild_bolt"]
    guest = ["--drive", str(own_disk), "--append", "root=/dev/vda rw init=/init"]
    proc = subprocess.run(cli + ["profile", "record", "--kernel", str(kernel.bzimage),
                                 "--vmlinux", str(kernel.vmlinux), *guest,
                                 "--start-marker", "== work begins ==",
                                 "--stop-marker", "== work ends ==", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "KASLR on, offset 0x" in proc.stdout + proc.stderr
    from kbuild_bolt.profile.formats import resolve_profile

    runs = function_samples(model, attach(model, resolve_profile(out, model)))
    names = model.functions.names
    # The work ran on the disk's file system: ext2 (built in) wrote the copies.
    ext2 = [runs[row] for row, name in enumerate(names) if name.startswith("ext2_")]
    assert sum(ext2) > 0
    assert runs[model.functions.by_name("virtblk_probe")] == 0   # (boot: before the markers)
    good = subprocess.run(cli + ["boot", str(kernel.bzimage), *guest,
                                 "--expect", "my system is going down"],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
