"""The kernel version, from ``linux_banner`` ("Linux version 6.12.117 (...) ...")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbuild_bolt.errors import KbbError

_BANNER = re.compile(rb"Linux version (\S+) ")
_NUMBERS = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class KernelVersion:
    release: str   # as uname -r prints it: "6.12.117", "6.1.0-56-amd64"
    banner: str
    major: int
    minor: int
    patch: int

    @property
    def series(self) -> tuple[int, int]:
        return (self.major, self.minor)

    def __str__(self) -> str:
        return self.release


def parse_banner(banner: str) -> KernelVersion:
    m = _BANNER.match(banner.encode())
    if not m:
        raise KbbError(f"unrecognized kernel banner {banner[:40]!r}")
    release = m.group(1).decode()
    n = _NUMBERS.match(release)
    if not n:
        raise KbbError(f"unrecognized kernel release {release!r}")
    return KernelVersion(release, banner, int(n.group(1)), int(n.group(2)), int(n.group(3) or 0))


def modinfo(image) -> dict[str, str] | None:
    """A module's .modinfo (``key=value`` strings; the first of each key), None
    for an image without one (not a module)."""
    section = image.section(".modinfo")
    if section is None or not section.has_bits:
        return None
    info: dict[str, str] = {}
    for item in bytes(image.section_data(section)).split(b"\0"):
        key, _, value = item.decode("utf-8", "replace").partition("=")
        if key:
            info.setdefault(key, value)
    return info


def module_version(image) -> KernelVersion | None:
    """The kernel a module was built for, from its .modinfo ``vermagic=6.12.117
    SMP ...`` (None: no .modinfo, not a module)."""
    vermagic = (modinfo(image) or {}).get("vermagic", "").strip()
    if not vermagic:
        return None
    return parse_banner(f"Linux version {vermagic.split()[0]} (module vermagic {vermagic})")


def kernel_version(image) -> KernelVersion:
    """Version of the kernel in ``image`` (needs the ``linux_banner`` symbol; a
    module: its vermagic)."""
    module = module_version(image)
    if module is not None:
        return module
    addr = image.symbols.address("linux_banner")
    if addr is None:
        return _scan_rodata(image)
    section = image.section_at(addr)
    if section is None:
        raise KbbError(f"{image.path}: linux_banner points outside every section")
    raw = image.read(addr, min(512, section.end - addr))
    banner = raw.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip("\n")
    return parse_banner(banner)


def _scan_rodata(image) -> KernelVersion:
    """Without symbols: the banner string is still in .rodata."""
    rodata = image.section(".rodata")
    if rodata is not None and rodata.has_bits:
        blob = bytes(image.section_data(rodata))
        for m in re.finditer(rb"Linux version \d+\.\d+[^\0]*", blob):
            if b"(" in m.group(0):  # the banner, not a format string
                return parse_banner(m.group(0).decode("utf-8", "replace").rstrip("\n"))
    raise KbbError(f"{image.path}: no Linux version banner (not a vmlinux?)")
