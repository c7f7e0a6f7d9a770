"""Debian's distro kernel as a real input: the debug vmlinux (with relocations)
from ``linux-image-<flavor>-dbg`` and the matching vmlinuz, config and modules
from the unsigned image package, fetched once into the cache. The flavor is
Debian's (``amd64``, ``cloud-amd64``, ``rt-amd64``): ``KBB_DISTRO_FLAVOR`` picks
another than ``amd64`` for the tests and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kbuild_bolt.errors import KbbError
from kbuild_bolt.cache import cache_root, locked
from kbuild_bolt.lab.kernels import progress, run

DEFAULT_FLAVOR = "amd64"
FLAVORS = ("amd64", "cloud-amd64", "rt-amd64")


@dataclass(frozen=True)
class DistroKernel:
    release: str         # 6.1.0-56-amd64
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / f"vmlinux-{self.release}"

    @property
    def vmlinuz(self) -> Path:
        return self.root / f"vmlinuz-{self.release}"

    @property
    def config(self) -> Path:
        return self.root / f"config-{self.release}"

    @property
    def system_map(self) -> Path:
        return self.root / f"System.map-{self.release}"

    @property
    def modules_root(self) -> Path:
        return self.root / "modules"


def _dbg_package(flavor: str) -> str:
    meta = f"linux-image-{flavor}-dbg"
    proc = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True)
    m = re.search(r"Depends: (linux-image-\S+-dbg)", proc.stdout)
    if proc.returncode != 0 or not m:
        raise KbbError(f"cannot resolve {meta} (apt-get update?)")
    return m.group(1)


def distro_flavor() -> str:
    """The flavor asked for by ``KBB_DISTRO_FLAVOR`` (``amd64`` by default)."""
    flavor = os.environ.get("KBB_DISTRO_FLAVOR", "").strip() or DEFAULT_FLAVOR
    if flavor not in FLAVORS:
        raise KbbError(f"KBB_DISTRO_FLAVOR={flavor}: not one of {', '.join(FLAVORS)}")
    return flavor


def distro_kernel(fetch: bool = True, flavor: str | None = None) -> DistroKernel:
    """Debian's current distro kernel of ``flavor`` (distro_flavor() by default),
    downloaded and unpacked on first use."""
    dbg = _dbg_package(flavor or distro_flavor())
    release = dbg[len("linux-image-"):-len("-dbg")]
    root = cache_root() / "distro" / release
    kernel = DistroKernel(release, root)
    if (root / "distro.ok").exists():
        return kernel
    if not fetch:
        raise KbbError(f"Debian's distro kernel {release} is not downloaded yet")
    with locked("distro"):
        if not (root / "distro.ok").exists():
            _fetch(kernel, dbg)
    return kernel


def _fetch(kernel: DistroKernel, dbg: str) -> None:
    unsigned = f"linux-image-{kernel.release}-unsigned"
    kernel.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kernel.root))
    try:
        progress(f"downloading {dbg} and {unsigned} (~930 MB)")
        run(["apt-get", "download", dbg, unsigned], cwd=work)
        debs = {p.name.split("_")[0]: p for p in work.glob("*.deb")}
        if dbg not in debs or unsigned not in debs:
            raise KbbError(f"apt-get download did not produce {dbg} and {unsigned}")
        progress(f"extracting vmlinux-{kernel.release}")
        extract = work / "x"
        extract.mkdir()
        _extract(debs[dbg], extract, f"*/boot/vmlinux-{kernel.release}")
        _extract(debs[unsigned], extract, None)
        found = list(extract.rglob(f"vmlinux-{kernel.release}"))
        if not found:
            raise KbbError(f"{dbg} holds no vmlinux-{kernel.release}")
        found[0].rename(kernel.vmlinux)
        for name in ("vmlinuz", "config", "System.map"):
            path = extract / "boot" / f"{name}-{kernel.release}"
            if path.exists():
                path.rename(kernel.root / path.name)
        modules = extract / "lib" / "modules"
        if modules.exists():
            (kernel.modules_root / "lib").mkdir(parents=True, exist_ok=True)
            modules.rename(kernel.modules_root / "lib" / "modules")
        (kernel.root / "distro.ok").write_text(f"{dbg}\n{unsigned}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(deb: Path, dest: Path, pattern: str | None) -> None:
    tar = ["tar", "-x", "-C", str(dest)]
    if pattern:
        tar += ["--wildcards", pattern]
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as src:
        proc = subprocess.run(tar, stdin=src.stdout, capture_output=True, text=True)
    if src.returncode != 0 or proc.returncode != 0:
        raise KbbError(f"cannot unpack {deb.name}: {proc.stderr.strip()[:200]}")
