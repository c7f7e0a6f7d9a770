"""make CONFIG_BOLT=y on the lab trees: the Kbuild hooks, the kernel image and
packages built from the optimized vmlinux, its modules, a Debian initramfs.

Every build runs in an overlay over a cached lab kernel (tests/kernel/buildtree.py),
so only vmlinux is relinked and nothing in the cache changes. The lab source
trees carry the hooks patch (applied by the lab as a user would, with
``kbuild-bolt install-hooks``); CONFIG_BOLT is off in the lab configs.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.initramfs.repack import list_entries, split
from kbuild_bolt.kbuild.bzimage import code_differences
from kbuild_bolt.kbuild.modules import check_modules
from kbuild_bolt.lab.initramfs import build_lab_initramfs
from kbuild_bolt.lab.kernels import LAB_MODULES, lab_kernel
from kbuild_bolt.qemu.runner import boot

from buildtree import KBUILD_BOLT, OverlayBuild, enable_in_config
from debian_initramfs import make_debian_initramfs

# These tests run make (2 cores): keep them on one xdist worker, one build at a time.
pytestmark = pytest.mark.xdist_group("kbuild")

REPO = Path(__file__).resolve().parents[2]
BOLT_LINE = re.compile(r"^  BOLT    vmlinux$", re.M)
LINK_LINE = re.compile(r"^  LD      vmlinux$", re.M)


def cli(*args, check=True):
    proc = subprocess.run([KBUILD_BOLT, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"kbuild-bolt {' '.join(map(str, args))}: {proc.stderr}")
    return proc


def record_profile(flavor: str, out: Path) -> Path:
    kernel = lab_kernel(flavor)
    cli("profile", "record", "--kernel", kernel.bzimage, "--vmlinux", kernel.vmlinux,
        "--initrd", kernel.initramfs, "--workload", "files", "--iterations", "1,4", "-o", out)
    return out


@pytest.fixture(scope="module")
def profile612(tmp_path_factory):
    return record_profile("6.12-regular", tmp_path_factory.mktemp("profile612") / "files.kbb")


@pytest.fixture(scope="module")
def bolt612(tmp_path_factory, profile612):
    """6.12 tree with our patch: make CONFIG_BOLT=y BOLT_PROFILE=... on the command line."""
    scratch = tmp_path_factory.mktemp("kbuild612")
    tree = OverlayBuild("6.12-regular", scratch)
    build = tree.make("CONFIG_BOLT=y", f"BOLT_PROFILE={profile612}", "bzImage", "modules")
    (scratch / "build.log").write_text(build.stdout)
    modules = scratch / "modules"
    tree.make(f"INSTALL_MOD_PATH={modules}", "INSTALL_MOD_STRIP=1", "modules_install")
    return tree, build.stdout, modules


def optimized(tree: OverlayBuild, image: Path) -> None:
    """``image`` (a bzImage or vmlinuz) carries the tree's vmlinux, which is not the
    vmlinux the linker made."""
    assert code_differences(image, tree.path("vmlinux")) == []
    assert ".text" in code_differences(image, tree.path("vmlinux.pre-bolt"))


def boot_with_modules(kernel_image: Path, modules_root: Path, release: str, scratch: Path,
                      kaslr: bool = True):
    initrd = scratch / f"initrd-{kaslr}.cpio.gz"
    build_lab_initramfs(initrd, modules_root=modules_root, release=release, modules=LAB_MODULES)
    outcome = boot(kernel_image, initrd, workload="files", iterations=2, kaslr=kaslr, timeout=180)
    assert outcome.ok, outcome.summary()
    assert "module:test_static_keys" in outcome.markers   # loaded, its self-test passed
    return outcome


def test_bolt_runs_in_the_post_link_step(bolt612):
    tree, log, _ = bolt612
    assert BOLT_LINE.search(log), log[-3000:]
    summary = log[BOLT_LINE.search(log).end():].strip().splitlines()[0]
    assert "functions rewritten" in summary and "verify ok" in summary, summary
    used = float(re.search(r"profile ([\d.]+)% used", summary).group(1))
    assert used > 99, summary
    # The default with a profile: cdsort function order and hot/cold splitting, the
    # cold parts named in kallsyms (link-vmlinux.sh reserved room for them).
    placed = int(re.search(r"([\d,]+) placed anew", summary).group(1).replace(",", ""))
    assert placed > 1000 and "cold parts" in summary and "unnamed" not in summary, summary
    # x86's own post-link pass ran after ours: relocations out, vmlinux.relocs in.
    with ElfImage(tree.path("vmlinux")) as image:
        assert image.section(".rela.text") is None
    with ElfImage(tree.path("vmlinux.pre-bolt")) as image:
        assert image.section(".rela.text") is not None
    assert tree.exists("arch/x86/boot/compressed/vmlinux.relocs")
    optimized(tree, tree.path("arch/x86/boot/bzImage"))


def test_system_map_matches_the_optimized_vmlinux(bolt612):
    assert_system_map(bolt612[0])


def assert_system_map(tree):
    """System.map is made again from the optimized vmlinux: every line at the
    symbol's new address, the cold parts listed, in address order."""
    lines = tree.path("System.map").read_text().splitlines()
    values = [int(line.split()[0], 16) for line in lines]
    assert values == sorted(values)
    assert any(line.endswith(".cold") for line in lines)
    with ElfImage(tree.path("vmlinux")) as image:
        symbols = image.symbols
        address = {}
        for name, value in zip(symbols.names, symbols.value.tolist()):
            address.setdefault(name, set()).add(value)
    checked = 0
    for line in lines:
        value, _kind, name = line.split()[:3]
        if name in address:
            assert int(value, 16) in address[name], line
            checked += 1
    assert checked > 10000


def test_bzimage_boots_with_its_modules(bolt612, tmp_path):
    tree, _, modules = bolt612
    kernel = tree.kernel
    report = check_modules(tree.path("vmlinux"), modules, symvers=tree.path("Module.symvers"),
                           system_map=tree.path("System.map"))
    assert report.ok and report.modules >= 2, report.summary()
    bzimage = tmp_path / "bzImage"
    shutil.copyfile(tree.path("arch/x86/boot/bzImage"), bzimage)
    boot_with_modules(bzimage, modules, kernel.release, tmp_path, kaslr=True)
    boot_with_modules(bzimage, modules, kernel.release, tmp_path, kaslr=False)


def test_nothing_to_redo_when_nothing_changed(bolt612, profile612):
    tree, _, _ = bolt612
    again = tree.make("CONFIG_BOLT=y", f"BOLT_PROFILE={profile612}", "bzImage").stdout
    assert not BOLT_LINE.search(again)
    assert not LINK_LINE.search(again)


@pytest.mark.parametrize("compress", ["zstd", "gzip", "xz", "lz4"])
def test_debian_initramfs_repacked(bolt612, compress, tmp_path):
    """A Debian initramfs (initramfs-tools, early cpio in front) of the lab kernel gets
    the modules of the optimized build (stripped: different bytes); everything else
    stays byte for byte, the compression too, and the optimized kernel boots with it."""
    tree, _, modules = bolt612
    kernel = lab_kernel("6.12-regular")
    original = make_debian_initramfs(kernel.modules_root, kernel.release, kernel.config,
                                     tmp_path / "initrd.img", tmp_path, compress)
    repacked = tmp_path / "initrd.new"
    out = cli("repack-initramfs", original, repacked, "--modules", modules).stdout
    assert "2 modules" in out and compress in out, out
    before, after = split(original.read_bytes()), split(repacked.read_bytes())
    assert before.compression.name == after.compression.name == compress
    assert after.early == before.early and len(before.early) > 0
    old, new = list_entries(original), list_entries(repacked)
    assert [e.name for e in old] == [e.name for e in new]
    changed = set()
    for a, b in zip(old, new):
        assert (a.mode, a.ino, a.mtime, a.uid, a.gid, a.nlink) == \
               (b.mode, b.ino, b.mtime, b.uid, b.gid, b.nlink), a.name
        if a.data != b.data:
            changed.add(a.name)
    release_dir = modules / "lib/modules" / kernel.release
    for e in new:
        if e.name.endswith(".ko"):
            rel = e.name.split(f"lib/modules/{kernel.release}/", 1)[1]
            assert e.data == (release_dir / rel).read_bytes()
    assert {n for n in changed if n.endswith(".ko")} == {e.name for e in new
                                                         if e.name.endswith(".ko")}
    assert all(n.endswith(".ko") or "/modules." in n for n in changed), changed
    outcome = boot(tree.path("arch/x86/boot/bzImage"), repacked, workload="none", timeout=180,
                   expect=["initramfs-tools", "test_static_keys"])
    assert outcome.ok, outcome.summary()


def test_bindeb_pkg_ships_the_optimized_kernel(bolt612, profile612, tmp_path):
    """Distro flow, .config options this time (a distro config carries CONFIG_BOLT):
    switching from the command line to .config relinks (the BOLT options changed)."""
    tree, _, _ = bolt612
    enable_in_config(tree, profile612, tmp_path)
    log = tree.make("bindeb-pkg").stdout
    assert BOLT_LINE.search(log), log[-3000:]
    debs = tree.new_files("linux-image-*.deb")
    debs = [d for d in debs if "-dbg" not in d.name]
    assert len(debs) == 1, debs
    root = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    release = tree.kernel.release
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    optimized(tree, vmlinuz)
    assert (root / "boot" / f"System.map-{release}").read_bytes() == \
        tree.path("System.map").read_bytes()
    modules_root = root if (root / "lib/modules").is_dir() else root / "usr"
    boot_with_modules(vmlinuz, modules_root, release, tmp_path)


def test_binrpm_pkg_ships_the_optimized_kernel(bolt612, profile612, tmp_path):
    tree, _, _ = bolt612
    if shutil.which("rpmbuild") is None:
        pytest.fail("rpmbuild missing: scripts/setup installs rpm")
    enable_in_config(tree, profile612, tmp_path)
    tree.make("binrpm-pkg")
    rpms = [p for p in tree.new_files("build/rpmbuild/RPMS/*/kernel-[0-9]*.rpm")]
    assert len(rpms) == 1, rpms
    root = tmp_path / "rpm"
    root.mkdir()
    subprocess.run(f"rpm2cpio {rpms[0]} | cpio -idm --quiet", shell=True, cwd=root, check=True)
    images = list(root.glob("boot/vmlinuz-*")) + list(root.glob("lib/modules/*/vmlinuz"))
    assert images, sorted(str(p.relative_to(root)) for p in root.rglob("*"))[:30]
    for image in images:
        optimized(tree, image)


@pytest.fixture(scope="module")
def debug61(tmp_path_factory):
    """The 6.1 tree built with DEBUG_INFO (DWARF 4), packaged with bindeb-pkg: a
    random layout (no profile needed; functions and blocks move, split)."""
    scratch = tmp_path_factory.mktemp("debug61")
    tree = OverlayBuild("6.1-debug", scratch / "tree")
    amap = scratch / "vmlinux.map"
    log = tree.make("CONFIG_BOLT=y", "BOLT_LAYOUT=random", "BOLT_FUNCTIONS=random", "BOLT_SPLIT=y",
                    f"BOLT_FLAGS=--seed=5 --address-map={amap}", "KDEB_COMPRESS=none",
                    "bindeb-pkg").stdout
    assert BOLT_LINE.search(log), log[-3000:]
    return tree, amap


def _booted_build_id(image: Path, tmp_path: Path) -> bytes:
    """The build-id of the kernel inside a bzImage / vmlinuz (the one
    /sys/kernel/notes shows once it runs)."""
    from kbuild_bolt.elf.notes import build_id
    from kbuild_bolt.kbuild.bzimage import vmlinux_from_bzimage

    inner = tmp_path / "inner"
    inner.write_bytes(vmlinux_from_bzimage(image))
    with ElfImage(inner) as booted:
        return build_id(booted).value


def _true_debug_file(debug_file: Path, tree: OverlayBuild, amap: Path, booted_id: bytes) -> None:
    """``debug_file`` (a whole vmlinux or a separate .debug file) describes the
    optimized kernel: DWARF verified against the linker's vmlinux, and the
    build-id the booted kernel's, not the linker's."""
    from kbuild_bolt.elf.notes import build_id
    from kbuild_bolt.rewrite.verify_debug import verify_debug

    linked = tree.path("vmlinux.pre-bolt")
    with ElfImage(debug_file) as ours, ElfImage(linked) as theirs:
        assert ours.section(".debug_info").size > 10 << 20      # DWARF kept, not stripped
        assert build_id(ours).value == booted_id != build_id(theirs).value
    report = verify_debug(str(debug_file), str(linked), str(amap), sample=20000, seed=2)
    assert report.ok and report.checked > 15000, report.summary()
    # (a separate .debug file has no ORC bytes to hold .debug_frame against)
    assert bool(report.orc_skipped) == debug_file.name.endswith(".debug"), report.summary()
    assert report.orc_skipped or report.orc_checked > 10000, report.summary()


def test_bindeb_pkg_dbg_package_carries_true_dwarf(debug61, tmp_path):
    """A kernel built with DEBUG_INFO: the -dbg package's vmlinux is the optimized
    one, DWARF true for the new layout, and its build-id is the one of the kernel
    the image package boots, so perf, crash and debuginfod pair them."""
    tree, amap = debug61
    debs = tree.new_files("linux-image-*.deb")
    dbg = [d for d in debs if "-dbg" in d.name]
    image = [d for d in debs if "-dbg" not in d.name]
    assert len(dbg) == 1 and len(image) == 1, debs
    release = tree.kernel.release
    root = tmp_path / "deb"
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    shipped = root / "usr/lib/debug/lib/modules" / release / "vmlinux"
    assert shipped.read_bytes() == tree.path("vmlinux").read_bytes()
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    assert code_differences(vmlinuz, shipped) == []
    _true_debug_file(shipped, tree, amap, _booted_build_id(vmlinuz, tmp_path))


# A distro-style spec (as Fedora's kernel.spec does it): rpm's own debuginfo
# machinery (find-debuginfo: debugedit, eu-strip) splits the vmlinux, keeping the
# kernel's build-id (not recomputed: the bzImage already carries it).
DEBUGINFO_SPEC = """\
%global _enable_debug_packages 1
%global _no_recompute_build_ids 1
%undefine _unique_build_ids
%global __spec_install_post %{__debug_install_post}
Name: kernel-bolt-lab
Version: 1
Release: 1
Summary: optimized lab kernel
License: GPL-2.0
%description
The optimized kernel.
%package debuginfo
Summary: Debug information for the optimized kernel
%description debuginfo
DWARF of the optimized kernel.
%install
install -D -m 644 %{image} %{buildroot}/lib/modules/%{kver}/vmlinuz
install -D -m 755 %{vmlinux} %{buildroot}/lib/modules/%{kver}/vmlinux
%files
/lib/modules/%{kver}
%files debuginfo
/usr/lib/debug/lib/modules/%{kver}
"""


def test_rpm_debuginfo_package_carries_true_dwarf(debug61, tmp_path):
    """The same kernel through rpmbuild's find-debuginfo (upstream binrpm-pkg
    makes no debuginfo package in 6.1 or 6.12; distro specs do): the debuginfo
    package's .debug file keeps the optimized kernel's true DWARF and build-id."""
    if shutil.which("find-debuginfo") is None or shutil.which("eu-strip") is None:
        pytest.fail("find-debuginfo / eu-strip missing: scripts/setup installs rpm and elfutils")
    tree, amap = debug61
    spec = tmp_path / "kernel.spec"
    spec.write_text(DEBUGINFO_SPEC)
    release = tree.kernel.release
    bzimage = tree.path("arch/x86/boot/bzImage")
    proc = subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {tmp_path / 'top'}",
                           "--define", f"vmlinux {tree.path('vmlinux')}",
                           "--define", f"image {bzimage}", "--define", f"kver {release}",
                           str(spec)], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    root = tmp_path / "root"
    root.mkdir()
    for rpm in (tmp_path / "top" / "RPMS").rglob("*.rpm"):
        subprocess.run(f"rpm2cpio {rpm} | cpio -idm --quiet", shell=True, cwd=root, check=True)
    debug_files = list((root / "usr/lib/debug/lib/modules" / release).glob("vmlinux*.debug"))
    assert len(debug_files) == 1, sorted(root.rglob("*"))
    _true_debug_file(debug_files[0], tree, amap, _booted_build_id(bzimage, tmp_path))


def test_missing_profile_stops_the_build_before_linking(bolt612, tmp_path):
    tree, _, _ = bolt612
    proc = tree.make("CONFIG_BOLT=y", f"BOLT_PROFILE={tmp_path}/nope.kbb", "vmlinux", check=False)
    assert proc.returncode != 0
    assert f"BOLT_PROFILE={tmp_path}/nope.kbb: no such file" in proc.stdout
    assert not LINK_LINE.search(proc.stdout), proc.stdout[-3000:]


def test_6_1_tree_with_config_options(tmp_path_factory, tmp_path):
    profile = record_profile("6.1-regular", tmp_path_factory.mktemp("profile61") / "files.kbb")
    tree = OverlayBuild("6.1-regular", tmp_path_factory.mktemp("kbuild61"))
    tree.run([str(tree.source / "scripts/config"), "--file", str(tree.build_dir / ".config"),
              "--enable", "BOLT", "--set-str", "BOLT_PROFILE", str(profile)])
    tree.make("olddefconfig")
    log = tree.make("bzImage", "modules").stdout
    assert BOLT_LINE.search(log), log[-3000:]
    summary = log[BOLT_LINE.search(log).end():].strip().splitlines()[0]
    assert "placed anew" in summary and "unnamed" not in summary, summary
    optimized(tree, tree.path("arch/x86/boot/bzImage"))
    assert_system_map(tree)
    modules = tmp_path / "modules"
    tree.make(f"INSTALL_MOD_PATH={modules}", "modules_install")
    assert check_modules(tree.path("vmlinux"), modules).ok
    boot_with_modules(tree.path("arch/x86/boot/bzImage"), modules, tree.kernel.release, tmp_path)
    # A profile of another kernel: refused with one line, nothing written.
    proc = cli("rewrite", lab_kernel("6.12-regular").vmlinux, "-o", tmp_path / "out",
               "--profile", profile, "-q", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "recorded on Linux 6.1" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_no_patch_mode(profile612, tmp_path_factory, tmp_path):
    """make ARCH_POSTLINK=.../Makefile.bolt on a tree that does not enable the hook
    (hardened flavor, CONFIG_BOLT unset): the regular kernel's profile, moved onto
    this build by stale matching."""
    tree = OverlayBuild("6.12-hardened", tmp_path_factory.mktemp("kbuild-nopatch"))
    log = tree.make(f"ARCH_POSTLINK={REPO / 'Makefile.bolt'}", f"BOLT_PROFILE={profile612}",
                    "bzImage", "modules").stdout
    assert BOLT_LINE.search(log), log[-3000:]
    assert "CONFIG_BOLT=y" not in tree.path(".config").read_text()
    optimized(tree, tree.path("arch/x86/boot/bzImage"))
    modules = tmp_path / "modules"
    tree.make(f"INSTALL_MOD_PATH={modules}", "modules_install")
    boot_with_modules(tree.path("arch/x86/boot/bzImage"), modules, tree.kernel.release, tmp_path)


def test_profile_of_this_build_applies_without_matching_again(profile612, tmp_path,
                                                               monkeypatch):
    """`profile record` names the vmlinux it recorded (its build-id). Rewriting that
    vmlinux with the profile works out no function's shape again, and lays it
    out exactly as matching every function would (the profile without its
    build-id line)."""
    from kbuild_bolt.elf.notes import build_id
    from kbuild_bolt.profile import stale
    from kbuild_bolt.profile.model import read_profile
    from kbuild_bolt.rewrite.context import RewriteOptions
    from kbuild_bolt.rewrite.engine import rewrite

    kernel = lab_kernel("6.12-regular")
    profile = read_profile(profile612)
    assert profile.build_id == build_id(ElfImage(kernel.vmlinux)).hex()
    matched = tmp_path / "matched.kbb"
    matched.write_text("".join(line for line in profile612.read_text().splitlines(True)
                               if not line.startswith("build-id ")))
    cli("rewrite", kernel.vmlinux, "-o", tmp_path / "matched", "--profile", matched,
        "--reorder-blocks=ext-tsp", "-q")

    def no_shapes(*args, **kwargs):
        raise AssertionError("a shape worked out again for a profile of this build")

    monkeypatch.setattr(stale, "function_shape", no_shapes)
    result = rewrite(kernel.vmlinux, tmp_path / "same", RewriteOptions(
        reorder_blocks="ext-tsp", profile=str(profile612), progress=False))
    assert result.verify_summary.startswith("verify: ok")
    assert f"{len(profile.shapes)} functions unchanged" in result.profile_applied
    assert (tmp_path / "same").read_bytes() == (tmp_path / "matched").read_bytes()
