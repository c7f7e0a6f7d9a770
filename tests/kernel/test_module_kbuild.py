"""Modules through Kbuild (issue 15). Without debug info, ``make CONFIG_BOLT=y
modules`` lays out each module the profile saw as it links it (and only those,
and only again when the profile or an option changes); modules_install strips
and signs it as always (CONFIG_MODULE_SIG_ALL: the signature verifies over the
laid out bytes). The lab initramfs repacked with the installed tree runs the
disk workload clean with at most 0.45x the taken branches in module code,
re-profiled; bindeb-pkg and binrpm-pkg ship the laid out modules beside the
optimized kernel. With debug info (kept in the build for the debug packages),
modules_install lays each module out after INSTALL_MOD_STRIP, and a module
still carrying debug info is installed as it is, with a line saying so."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from buildtree import KBUILD_BOLT, OverlayBuild, enable_in_config
from module_signing import (
    build_sign_file, make_signing_key, signature_verifies, split_signature,
)
from kbuild_bolt.kbuild.modules import check_modules
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.profile import qemu
from kbuild_bolt.profile.model import write_profile
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.module import measured_module_taken

pytestmark = pytest.mark.xdist_group("kbuild")

# (installing: "BOLT    /lib/modules/.../ext4.ko"; linking: "BOLT [M] fs/ext4/ext4.ko")
BOLT_MODULE_LINE = re.compile(r"^  BOLT(?: \[M\] |    )(?:\S*/)?([^/\s]+)\.ko$", re.M)


@pytest.fixture(scope="module")
def disk_profile(tmp_path_factory):
    kernel = lab_kernel("6.12-modules")
    profile = qemu.record(kernel.bzimage, kernel.initramfs, "disk", 3, kaslr=True,
                          vmlinux=kernel.vmlinux, modules_tree=kernel.modules_root)
    out = tmp_path_factory.mktemp("disk-profile") / "disk.kbb"
    write_profile(profile, out)
    return out, profile


def in_build_dir(tree: OverlayBuild, rel: str) -> Path:
    """Where to put a file that make sees at build_dir/rel (the overlay's upper)."""
    path = tree.upper / (tree.build_dir / rel).relative_to(tree.lower)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def signing_setup(tree: OverlayBuild, scratch: Path) -> Path:
    """What CONFIG_MODULE_SIG_ALL=y's modules_install uses: scripts/sign-file and
    certs/signing_key.x509 in the build directory; returns the key (PEM, with
    its certificate)."""
    build_sign_file(in_build_dir(tree, "scripts/sign-file"))
    key = make_signing_key(scratch)
    subprocess.run(["openssl", "x509", "-in", str(key), "-outform", "DER", "-out",
                    str(in_build_dir(tree, "certs/signing_key.x509"))], check=True)
    return key


def stripped_copy(path: Path, out: Path) -> bytes:
    subprocess.run(["strip", "--strip-debug", "-o", str(out), str(path)], check=True)
    return out.read_bytes()


def original(tree: OverlayBuild, rel: str) -> bytes:
    """The lab build's own file (under the overlay's changes)."""
    return ((tree.lower / (tree.build_dir / rel).relative_to(tree.lower))).read_bytes()


def test_make_modules_lays_out_what_the_profile_saw_and_install_signs(disk_profile,
                                                                      tmp_path):
    """Without debug info: make modules lays out the modules the profile saw as it
    links them, and only those; nothing is redone until the profile changes;
    modules_install strips and signs them (the signature verifies over the laid
    out bytes)."""
    profile_path, before = disk_profile
    kernel = lab_kernel("6.12-modules")
    tree = OverlayBuild("6.12-modules", tmp_path / "tree")
    key = signing_setup(tree, tmp_path)
    bolt = ("CONFIG_BOLT=y", f"BOLT_PROFILE={profile_path}")
    log = tree.make(*bolt, "modules").stdout
    listed = subprocess.run([KBUILD_BOLT, "profile", "modules", str(profile_path)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert {"ext4", "loop"} <= set(listed), listed
    laid_out = BOLT_MODULE_LINE.findall(log)
    order = [line.rsplit("/", 1)[-1][:-2] for line in
             tree.path("modules.order").read_text().split()]
    assert sorted(laid_out) == sorted(n for n in order if n.replace("-", "_") in listed), \
        log[-3000:]
    assert len(order) > len(laid_out)                # (some modules the run never used)
    for name in laid_out:                            # the build's one-line summary
        assert re.search(rf"^module {name}: [\d,]+ functions rewritten, .*placed anew.*"
                         r"verify ok", log, re.M), log[-3000:]
    assert not BOLT_MODULE_LINE.findall(tree.make(*bolt, "modules").stdout)
    # A newer profile: the modules it lays out are linked and laid out again, no others.
    os.utime(profile_path)
    log = tree.make(*bolt, "modules").stdout
    linked = re.findall(r"^  LD \[M\]  (?:\S*/)?([^/\s]+)\.ko$", log, re.M)
    assert sorted(linked) == sorted(BOLT_MODULE_LINE.findall(log)) == sorted(laid_out), log
    root = tmp_path / "modules"
    log = tree.make(*bolt, f"INSTALL_MOD_PATH={root}", "INSTALL_MOD_STRIP=1",
                    "CONFIG_MODULE_SIG_ALL=y", f"CONFIG_MODULE_SIG_KEY={key}",
                    "CONFIG_MODULE_SIG_HASH=sha256", "modules_install").stdout
    assert not BOLT_MODULE_LINE.findall(log)         # (laid out once, at the link)
    installed = sorted((root / "lib/modules" / kernel.release / "kernel").rglob("*.ko"))
    names = {p.name[:-3].replace("-", "_"): p for p in installed}
    for name, path in names.items():
        rel = str(path.relative_to(root / "lib/modules" / kernel.release / "kernel"))
        assert (tree.path(rel).read_bytes() != original(tree, rel)) == (name in listed), name
        # Signed after the layout: the signature is the laid out module's.
        assert signature_verifies(path, key, tmp_path), name
        body, _ = split_signature(path.read_bytes())
        assert body == stripped_copy(tree.path(rel), tmp_path / "stripped.ko"), name
    report = check_modules(kernel.vmlinux, root, symvers=tree.path("Module.symvers"))
    assert report.ok, report.problems

    # The lab initramfs repacked with the installed modules: they load and run the
    # disk workload clean (the recording checks the console), and take at most
    # 0.45x the branches in module code.
    repacked = tmp_path / "initramfs.cpio.gz"
    subprocess.run([KBUILD_BOLT, "repack-initramfs", str(kernel.initramfs), str(repacked),
                    "--modules", str(root)], check=True, capture_output=True)
    after = qemu.record(kernel.bzimage, repacked, "disk", 3, kaslr=True,
                        vmlinux=kernel.vmlinux, modules_tree=root)
    taken = {name: (measured_module_taken(next(kernel.modules_root.rglob(f"{name}.ko")),
                                          before)["taken_branches"],
                    measured_module_taken(names[name], after)["taken_branches"])
             for name in laid_out}
    old, new = (sum(pair[i] for pair in taken.values()) for i in (0, 1))
    assert new <= 0.45 * old, taken


def test_modules_with_debug_info_installed_as_they_are(tmp_path):
    """6.1 with DWARF, every module laid out at random: installed without
    INSTALL_MOD_STRIP, each keeps its debug info and its bytes (a line says
    why); with it, each is laid out and still loads on the kernel's symbols."""
    kernel = lab_kernel("6.1-debug")
    tree = OverlayBuild("6.1-debug", tmp_path / "tree")
    kept, laid_out = tmp_path / "kept", tmp_path / "laid-out"
    log = tree.make("CONFIG_BOLT=y", "BOLT_LAYOUT=random", f"INSTALL_MOD_PATH={kept}",
                    "modules_install").stdout
    modules = sorted((kept / "lib/modules" / kernel.release / "kernel").rglob("*.ko"))
    assert modules
    for path in modules:
        rel = path.relative_to(kept / "lib/modules" / kernel.release / "kernel")
        assert path.read_bytes() == tree.path(str(rel)).read_bytes(), path
        name = path.name[:-3].replace("-", "_")
        assert re.search(rf"^module {name}: left as it is: .*has debug info \(\.debug_",
                         log, re.M), log[-3000:]
    log = tree.make("CONFIG_BOLT=y", "BOLT_LAYOUT=random", f"INSTALL_MOD_PATH={laid_out}",
                    "INSTALL_MOD_STRIP=1", "modules_install").stdout
    assert len(BOLT_MODULE_LINE.findall(log)) == len(modules), log[-3000:]
    assert "left as it is" not in log
    for path in modules:
        rel = path.relative_to(kept)
        name = path.name[:-3].replace("-", "_")
        rewritten = re.search(rf"^module {name}: ([\d,]+) functions rewritten", log, re.M)
        # (a module of one-block functions has no other layout)
        changed = (laid_out / rel).read_bytes() != stripped_copy(path, tmp_path / "s.ko")
        assert changed == (rewritten.group(1) != "0"), (name, rewritten.group(0))
    assert "module test_static_keys: 0 " not in log
    report = check_modules(kernel.vmlinux, laid_out, symvers=tree.path("Module.symvers"))
    assert report.ok, report.problems


def test_packages_ship_the_optimized_modules(disk_profile, tmp_path):
    """A distro config with CONFIG_BOLT and the disk profile: bindeb-pkg's kernel is
    the optimized vmlinux, its ext4 and loop are laid out (and check against that
    kernel); booted from the package's files, the disk workload runs clean with
    KASLR. binrpm-pkg ships the same modules."""
    from kbuild_bolt.kbuild.bzimage import code_differences

    profile_path, before = disk_profile
    kernel = lab_kernel("6.12-modules")
    tree = OverlayBuild("6.12-modules", tmp_path / "tree")
    enable_in_config(tree, profile_path, tmp_path)
    log = tree.make("bindeb-pkg").stdout           # (laid out as they are linked again)
    assert re.search(r"^  BOLT    vmlinux$", log, re.M), log[-3000:]
    assert {"ext4", "loop"} <= set(BOLT_MODULE_LINE.findall(log)), log[-3000:]
    debs = [d for d in tree.new_files("linux-image-*.deb") if "-dbg" not in d.name]
    assert len(debs) == 1, debs
    root = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    modules_root = root if (root / "lib/modules").is_dir() else root / "usr"
    release_dir = modules_root / "lib/modules" / kernel.release
    vmlinuz = root / "boot" / f"vmlinuz-{kernel.release}"
    assert code_differences(vmlinuz, tree.path("vmlinux")) == []
    for name, rel in (("ext4", "fs/ext4/ext4.ko"), ("loop", "drivers/block/loop.ko")):
        shipped = (release_dir / "kernel" / rel).read_bytes()
        assert shipped == stripped_copy(tree.path(rel), tmp_path / "s.ko"), name
        assert tree.path(rel).read_bytes() != original(tree, rel), name
    report = check_modules(tree.path("vmlinux"), modules_root,
                           symvers=tree.path("Module.symvers"))
    assert report.ok, report.problems
    initrd = tmp_path / "initramfs.cpio.gz"
    subprocess.run([KBUILD_BOLT, "repack-initramfs", str(kernel.initramfs), str(initrd),
                    "--modules", str(modules_root)], check=True, capture_output=True)
    outcome = boot(vmlinuz, initrd, workload="disk", iterations=2, kaslr=True)
    assert outcome.ok and not outcome.problems, outcome.summary()

    tree.make("binrpm-pkg")
    rpms = tree.new_files("build/rpmbuild/RPMS/*/kernel-[0-9]*.rpm")
    assert len(rpms) == 1, rpms
    unpacked = tmp_path / "rpm"
    unpacked.mkdir()
    subprocess.run(f"rpm2cpio {rpms[0]} | cpio -idm --quiet", shell=True, cwd=unpacked,
                   check=True)
    for name, rel in (("ext4", "fs/ext4/ext4.ko"), ("loop", "drivers/block/loop.ko")):
        found = list(unpacked.rglob(f"{name}.ko"))
        assert len(found) == 1, found
        # (installed unstripped: the build's laid out module itself)
        assert found[0].read_bytes() == tree.path(rel).read_bytes() != original(tree, rel)



HELLO = r"""
#include <linux/module.h>
#include <linux/kernel.h>
static int count;
static noinline int step(int i)
{
	if (i & 1)
		return i * 3;
	if (i % 3 == 0)
		pr_info("third %d\n", i);
	else if (i % 5 == 0)
		count -= i;
	return i - 1;
}
static noinline int walk(int n)
{
	int s = 0;
	for (int i = 0; i < n; i++) {
		if (i % 7)
			s += step(i);
		else if (s > 1000)
			s = step(s);
		else
			s -= i;
	}
	return s;
}
static int __init hello_init(void)
{
	count += walk(100);
	pr_info("hello %d\n", count);
	return 0;
}
static void __exit hello_exit(void) { }
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


def test_external_modules_build_with_or_without_kbuild_bolt(tmp_path):
    """An external module (M=, as DKMS builds one) against a CONFIG_BOLT tree: laid
    out where kbuild-bolt is at hand, built as always where it is not (a headers
    package on another machine)."""
    tree = OverlayBuild("6.12-modules", tmp_path / "tree")
    src = tmp_path / "hello"
    src.mkdir()
    (src / "hello.c").write_text(HELLO)
    (src / "Makefile").write_text("obj-m := hello.o\n")
    log = tree.make("CONFIG_BOLT=y", "BOLT_LAYOUT=random", "KBUILD_BOLT=/nonexistent/kbuild-bolt",
                    f"M={src}", "modules").stdout
    assert (src / "hello.ko").exists() and "BOLT" not in log, log[-2000:]
    plain = (src / "hello.ko").read_bytes()
    (src / "hello.ko").unlink()
    log = tree.make("CONFIG_BOLT=y", "BOLT_LAYOUT=random", f"M={src}", "modules").stdout
    assert BOLT_MODULE_LINE.findall(log) == ["hello"], log[-2000:]
    assert re.search(r"^module hello: [\d,]+ functions rewritten, .*verify ok", log, re.M)
    assert (src / "hello.ko").read_bytes() != plain
