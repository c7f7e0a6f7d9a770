"""Real test kernels, built from Debian's linux-source packages and cached.

A lab kernel is named ``<series>-<flavor>`` (``6.12-regular``, ``6.12-hardened``,
``6.1-regular``).  Its build is keyed by the config fragments, the Debian source
package version, the compiler and this module's recipe version, so a change to
any of them builds a new kernel beside the old one and nothing stale is reused.

The build runs out of tree with ``make ARCH_POSTLINK=<lab/postlink.mk>``: the
hook keeps ``vmlinux.unstripped`` (with the ``.rela.*`` sections that
--emit-relocs keeps and 6.12's post-link pass strips) and then runs the kernel's
own post-link pass, so ``bzImage`` is the kernel's usual one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kbuild_bolt.errors import KbbError
from kbuild_bolt.cache import cache_root, locked

# Bump when the build steps change in a way that changes the output.
RECIPE_VERSION = 1

HERE = Path(__file__).resolve().parent
CONFIG_DIR = HERE / "configs"
POSTLINK_HOOK = HERE / "postlink.mk"

# The modules every lab initramfs loads, in order (test_static_keys needs the base).
LAB_MODULES = ("test_static_key_base", "test_static_keys")

FLAVORS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (source series, config fragments applied on top of tinyconfig)
    "6.12-regular": ("6.12", ("lab.config",)),
    "6.12-hardened": ("6.12", ("lab.config", "hardened-6.12.config")),
    "6.1-regular": ("6.1", ("lab.config",)),
    "6.1-debug": ("6.1", ("lab.config", "debug-info-dwarf4.config")),
    "6.12-modules": ("6.12", ("lab.config", "modules-6.12.config")),
}


def progress(message: str) -> None:
    print(f"  LAB     {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], log: Path | None = None, **kwargs) -> None:
    """Run a build step; on failure raise a one-line error pointing at the log."""
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise KbbError(f"{' '.join(cmd[:3])} failed: {tail[0]}")
        return
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        started = time.monotonic()
        last_report = started
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            if now - last_report >= 30:
                last_report = now
                progress(f"... {int(now - started)} s ({cmd[-1]})")
    if proc.returncode != 0:
        raise KbbError(f"kernel build step failed ({' '.join(cmd[-3:])}); see {log}")


# ---------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class KernelSource:
    series: str
    package: str
    version: str  # Debian package version
    tree: Path


def _installed_version(package: str) -> str | None:
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}|${Version}", package],
            capture_output=True, text=True,
        )
    except FileNotFoundError:
        return None
    status, _, version = proc.stdout.partition("|")
    if proc.returncode != 0 or "install ok installed" not in status:
        return None
    return version


def _package_tarball(package: str, version: str) -> Path:
    """/usr/src/<package>.tar.xz of another version of a linux-source package,
    downloaded from Debian's archive into the cache (an update of the same
    series, for measuring profiles across kernel updates)."""
    safe = re.sub(r"[^A-Za-z0-9.+-]", "_", version)
    unpacked = cache_root() / "debs" / f"{package}_{safe}"
    tarball = unpacked / "usr/src" / f"{package}.tar.xz"
    with locked(f"deb-{package}"):
        if not tarball.exists():
            progress(f"downloading {package} {version}")
            work = Path(tempfile.mkdtemp(prefix=".deb-", dir=cache_root()))
            try:
                proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=work,
                                      capture_output=True, text=True)
                debs = list(work.glob("*.deb"))
                if proc.returncode != 0 or not debs:
                    detail = (proc.stderr.strip().splitlines() or ["no package"])[-1]
                    raise KbbError(f"cannot download {package}={version}: {detail}")
                run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")])
                if unpacked.exists():
                    shutil.rmtree(unpacked)
                unpacked.parent.mkdir(parents=True, exist_ok=True)
                (work / "root").rename(unpacked)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return tarball


def kernel_source(series: str, version: str | None = None) -> KernelSource:
    """The unpacked ``linux-source-<series>`` tree (unpacked on first use): the
    installed package's, or ``version``'s (downloaded when it is not installed)."""
    package = f"linux-source-{series}"
    installed = _installed_version(package)
    if version is None or version == installed:
        version = installed
        tarball = Path(f"/usr/src/{package}.tar.xz")
        if version is None or not tarball.exists():
            raise KbbError(f"{package} is not installed (apt-get install {package})")
    else:
        tarball = _package_tarball(package, version)
    safe = re.sub(r"[^A-Za-z0-9.+-]", "_", version)
    tree = cache_root() / "src" / f"{package}_{safe}"
    with locked(f"src-{package}"):
        if not (tree / "Makefile").exists():
            progress(f"unpacking {tarball}")
            tree.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=tree.parent))
            try:
                run(["tar", "-xf", str(tarball), "-C", str(tmp)])
                (tmp / package).rename(tree)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _ensure_hooks(tree, series)
    return KernelSource(series, package, version, tree)


HOOKS_MARKER = ".kbuild-bolt-hooks.patch"


def _ensure_hooks(tree: Path, series: str) -> None:
    """Lab trees carry the kbuild-bolt Kbuild hooks, applied the way users do, on
    every fresh unpack, and updated when the patch changes. CONFIG_BOLT stays off
    in the lab configs, so the hooks are inert there and the lab kernels are the
    same as without them: the patch is deliberately not part of the build key
    (a new key means a new build directory, and objtool's absolute paths make
    that a full rebuild)."""
    from kbuild_bolt.kbuild.hooks import committed_patch, install_hooks

    patch = committed_patch(series).read_text()
    marker = tree / HOOKS_MARKER
    if marker.exists():
        if marker.read_text() == patch:
            return
        progress(f"updating the kbuild-bolt hooks in {tree.name}")
        run(["patch", "-p1", "-R", "-s", "-i", str(marker)], cwd=tree)
    install_hooks(tree)
    marker.write_text(patch)


# ---------------------------------------------------------------------------
# Config fragments

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """``{option: value}`` for a .config or fragment; unset options map to ``"n"``."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def apply_fragment(config: Path, wanted: dict[str, str]) -> None:
    """Set every option of ``wanted`` in ``config`` (like scripts/config)."""
    kept = [
        line for line in config.read_text().splitlines()
        if not ((m := _SET.match(line) or _UNSET.match(line)) and m.group(1) in wanted)
    ]
    for option, value in wanted.items():
        kept.append(f"# {option} is not set" if value == "n" else f"{option}={value}")
    config.write_text("\n".join(kept) + "\n")


def fragment_mismatches(config_text: str, wanted: dict[str, str]) -> list[str]:
    have = parse_config(config_text)
    return [
        f"{option}={value} (got {have.get(option, 'n')})"
        for option, value in wanted.items()
        if have.get(option, "n") != value
    ]


# ---------------------------------------------------------------------------
# Lab kernels


@dataclass(frozen=True)
class LabKernel:
    name: str
    root: Path
    release: str

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def vmlinux(self) -> Path:
        """vmlinux with its .rela.* sections (as linked with --emit-relocs)."""
        return self.build_dir / "vmlinux.unstripped"

    @property
    def vmlinux_stripped(self) -> Path:
        """vmlinux after the kernel's own post-link pass (6.12: no relocations)."""
        return self.build_dir / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.build_dir / "arch/x86/boot/bzImage"

    @property
    def system_map(self) -> Path:
        return self.build_dir / "System.map"

    @property
    def config(self) -> Path:
        return self.build_dir / ".config"

    @property
    def modules_root(self) -> Path:
        """INSTALL_MOD_PATH of the build: holds lib/modules/<release>/."""
        return self.root / "modules"

    @property
    def modules_dir(self) -> Path:
        return self.modules_root / "lib/modules" / self.release

    @property
    def initramfs(self) -> Path:
        """The lab initramfs of this kernel, made again whenever the lab /init changes
        (its name carries the hash of what goes in)."""
        from kbuild_bolt.lab.initramfs import build_lab_initramfs, recipe_hash

        path = self.root / f"initramfs-{recipe_hash(LAB_MODULES)}.cpio.gz"
        if not path.exists():
            with locked(f"initramfs-{self.root.name}"):
                if not path.exists():
                    build_lab_initramfs(path, modules_root=self.modules_root,
                                        release=self.release, modules=LAB_MODULES)
        return path

    @property
    def series(self) -> str:
        return FLAVORS[self.name][0]


def _compiler_id() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise KbbError("gcc is not installed (apt-get install build-essential)") from None
    return out.splitlines()[0] if out else "gcc"


def _build_key(name: str, source: KernelSource) -> str:
    series, fragments = FLAVORS[name]
    digest = hashlib.sha256()
    digest.update(f"{RECIPE_VERSION}\0{name}\0{source.package}\0{source.version}\0".encode())
    digest.update(_compiler_id().encode())
    digest.update(POSTLINK_HOOK.read_bytes())
    for fragment in fragments:
        digest.update((CONFIG_DIR / fragment).read_bytes())
    return digest.hexdigest()[:12]


def wanted_options(name: str) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for fragment in FLAVORS[name][1]:
        wanted.update(parse_config((CONFIG_DIR / fragment).read_text()))
    return wanted


def lab_kernel(name: str, build: bool = True, source_version: str | None = None) -> LabKernel:
    """The cached lab kernel ``name``, built first when it is not in the cache;
    from the installed linux-source package, or from its Debian version
    ``source_version`` (another update of the same series)."""
    if name not in FLAVORS:
        raise KbbError(f"unknown lab kernel {name!r} (known: {', '.join(FLAVORS)})")
    source = kernel_source(FLAVORS[name][0], source_version)
    root = cache_root() / "kernels" / f"{name}-{_build_key(name, source)}"
    manifest = root / "lab.json"
    if not manifest.exists():
        if not build:
            raise KbbError(f"lab kernel {name} is not built yet (kbuild-bolt lab build {name})")
        # One kernel build at a time: the machines have 2 cores.
        with locked("kernel-build"):
            if not manifest.exists():
                _build(name, source, root)
    info = json.loads(manifest.read_text())
    return LabKernel(name=name, root=root, release=info["release"])


def _make(source: KernelSource, build_dir: Path, *targets: str) -> list[str]:
    return [
        "make", "-C", str(source.tree), f"O={build_dir}", "ARCH=x86_64",
        f"ARCH_POSTLINK={POSTLINK_HOOK}", *targets,
    ]


def _build(name: str, source: KernelSource, root: Path) -> None:
    started = time.monotonic()
    build_dir = root / "build"
    log = root / "build.log"
    if root.exists():
        shutil.rmtree(root)  # a half-finished earlier attempt
    build_dir.mkdir(parents=True)
    progress(f"building {name} from {source.package} {source.version} (log: {log})")
    env = dict(
        os.environ,
        KBUILD_BUILD_USER="kbuild-bolt",
        KBUILD_BUILD_HOST="lab",
        KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 2026",
        LC_ALL="C",
    )
    jobs = f"-j{os.cpu_count() or 1}"

    run(_make(source, build_dir, "tinyconfig"), log, env=env)
    wanted = wanted_options(name)
    # Twice: some options only appear once their dependencies are set.
    for _ in range(2):
        apply_fragment(build_dir / ".config", wanted)
        run(_make(source, build_dir, "olddefconfig"), log, env=env)
    bad = fragment_mismatches((build_dir / ".config").read_text(), wanted)
    if bad:
        raise KbbError(f"{name}: Kconfig did not take {', '.join(bad)}")

    progress(f"compiling {name} ({jobs})")
    run(_make(source, build_dir, jobs, "vmlinux", "bzImage", "modules"), log, env=env)
    run(_make(source, build_dir, "INSTALL_MOD_PATH=" + str(root / "modules"), "modules_install"),
        log, env=env)
    release = (build_dir / "include/config/kernel.release").read_text().strip()
    for required in ("vmlinux.unstripped", "arch/x86/boot/bzImage", "System.map"):
        if not (build_dir / required).exists():
            raise KbbError(f"{name}: build finished without {required}; see {log}")

    LabKernel(name=name, root=root, release=release).initramfs  # (made now, not on first boot)
    manifest = {
        "name": name,
        "release": release,
        "source_package": source.package,
        "source_version": source.version,
        "compiler": _compiler_id(),
        "recipe": RECIPE_VERSION,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    tmp = root / "lab.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(root / "lab.json")
    progress(f"built {name} ({release}) in {manifest['build_seconds']} s")
