"""``kbuild-bolt check-modules``: do these modules load on this vmlinux?

A module loads when its vermagic matches the kernel's and, with
MODVERSIONS, every symbol it imports has the CRC the kernel exports (module.c
check_version()). kbuild-bolt never changes exports or CRCs, but a distro
pipeline that repacks modules next to an optimized vmlinux wants proof:

- vermagic of every .ko (.modinfo) against the vmlinux's ``vermagic`` string;
- every ``__versions`` entry of every .ko against the CRC of that symbol in the
  vmlinux's ``__ksymtab``/``__kcrctab`` (or another module's exports);
- the vmlinux's CRCs against Module.symvers, when given;
- ``depmod`` with the new System.map finds no unknown symbol.

Compressed modules (.ko.xz, .ko.zst, .ko.gz) are read too.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel.version import modinfo

MODVERSION_SIZE = 64  # struct modversion_info on 64-bit: unsigned long crc; char name[56]


@dataclass
class ModuleReport:
    modules: int = 0
    imports: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"check-modules: {self.modules} modules, {self.imports} imported symbols checked: "
                + ("ok" if self.ok else f"{len(self.problems)} PROBLEMS"))
        return "\n".join([head] + [f"  {p}" for p in self.problems[:50]])


def _cstring(blob: bytes, off: int) -> str:
    end = blob.find(b"\0", off)
    return blob[off:end if end >= 0 else len(blob)].decode("utf-8", "replace")


def kernel_vermagic(image: ElfImage) -> str:
    addr = image.symbols.address("vermagic")
    if addr is None:
        raise KbbError(f"{image.path}: no vermagic symbol (built without CONFIG_MODULES?)")
    section = image.section_at(addr)
    return _cstring(image.read(addr, min(256, section.end - addr)), 0)


def kernel_exports(image: ElfImage) -> dict[str, int | None]:
    """{symbol: CRC or None} exported by the vmlinux."""
    from kbuild_bolt.kernel.tables import read_table, specs_for
    from kbuild_bolt.kernel.version import kernel_version

    version = kernel_version(image).series
    specs = {s.name: s for s in specs_for(image)}
    out: dict[str, int | None] = {}
    for tab, crc in (("__ksymtab", "__kcrctab"), ("__ksymtab_gpl", "__kcrctab_gpl")):
        data = read_table(image, specs[tab], version)
        if data is None:
            continue
        crcs = read_table(image, specs[crc], version)
        names = data.targets("name")
        strings = image.section("__ksymtab_strings")
        blob = bytes(image.section_data(strings))
        for k, addr in enumerate(names.tolist()):
            name = _cstring(blob, addr - strings.addr)
            value = int(crcs.entries["crc"][k]) if crcs is not None and k < crcs.count else None
            out[name] = value
    return out


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        if shutil.which("zstd") is None:
            raise KbbError(f"{path}: zstd not found (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


@dataclass
class ModuleInfo:
    path: Path
    name: str
    vermagic: str
    imports: list[tuple[str, int]]
    exports: dict[str, int | None]


def read_module(path: Path) -> ModuleInfo:
    raw = _read_module(path)
    with tempfile.NamedTemporaryFile(suffix=".ko") as tmp:
        tmp.write(raw)
        tmp.flush()
        image = ElfImage(tmp.name)
        info = modinfo(image) or {}
        imports = []
        versions = image.section("__versions")
        if versions is not None:
            blob = bytes(image.section_data(versions))
            for off in range(0, len(blob) - MODVERSION_SIZE + 1, MODVERSION_SIZE):
                crc, = struct.unpack_from("<Q", blob, off)
                imports.append((_cstring(blob, off + 8), crc & 0xFFFFFFFF))
        # __crc_<sym> labels the 4-byte CRC inside __kcrctab(_gpl) (a relocatable
        # object: the value is the offset in that section).
        exports = {}
        symbols = image.symbols
        for i, n in enumerate(symbols.names):
            if not n.startswith("__crc_"):
                continue
            sec = int(symbols.shndx[i])
            if not 0 < sec < len(image.sections):
                continue
            section = image.sections[sec]
            off = section.offset + int(symbols.value[i])
            exports[n[len("__crc_"):]] = struct.unpack_from("<I", image.buf, off)[0]
        image.close()
    return ModuleInfo(path, info.get("name", path.name.split(".")[0]), info.get("vermagic", ""),
                      imports, exports)


def find_modules(modules_dir: Path) -> tuple[Path, list[Path]]:
    """The lib/modules/<release> directory (given it or an INSTALL_MOD_PATH) and its .ko files."""
    base = Path(modules_dir)
    if (base / "lib/modules").is_dir():
        releases = sorted((base / "lib/modules").iterdir())
        if len(releases) != 1:
            raise KbbError(f"{base}: expected one lib/modules/<release>, found {len(releases)}")
        base = releases[0]
    if not base.is_dir():
        raise KbbError(f"{modules_dir}: no such directory")
    kos = sorted(p for p in base.rglob("*") if p.name.endswith((".ko", ".ko.xz", ".ko.gz",
                                                                ".ko.zst")))
    return base, kos


MISSING = object()


def _crc_problem(name: str, crc: int, have) -> str | None:
    """What is wrong with symbol ``name`` wanted with ``crc`` when the kernel has ``have``
    (a CRC, None for an export without CRC, MISSING)."""
    if have is MISSING:
        return f"{name}, which nothing exports"
    if have is not None and have != crc:
        return f"{name} with CRC {crc:#010x}, but the kernel exports it with {have:#010x}"
    return None


def check_modules(vmlinux, modules_dir, symvers=None, system_map=None) -> ModuleReport:
    report = ModuleReport()
    with ElfImage(vmlinux) as image:
        vermagic = kernel_vermagic(image)
        exports = kernel_exports(image)
    base, kos = find_modules(Path(modules_dir))
    if not kos:
        raise KbbError(f"{base}: no kernel modules")
    modules = [read_module(p) for p in kos]
    report.modules = len(modules)
    module_exports: dict[str, int | None] = {}
    for m in modules:
        module_exports.update(m.exports)
    for m in modules:
        rel = m.path.relative_to(base)
        if m.vermagic != vermagic:
            report.problems.append(f"{rel}: vermagic '{m.vermagic}' but the kernel's is "
                                   f"'{vermagic}' (built against another kernel)")
        for name, crc in m.imports:
            report.imports += 1
            if name == "module_layout":
                continue
            problem = _crc_problem(name, crc, exports.get(name, module_exports.get(name, MISSING)))
            if problem:
                report.problems.append(f"{rel}: imports {problem}")
    if symvers:
        for line in Path(symvers).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2] == "vmlinux":
                problem = _crc_problem(parts[1], int(parts[0], 16),
                                       exports.get(parts[1], MISSING))
                if problem:
                    report.problems.append(f"Module.symvers lists {problem}")
    if system_map:
        report.problems += run_depmod(base, system_map, symvers)
    return report


def run_depmod(release_dir: Path, system_map, symvers=None) -> list[str]:
    """depmod against the (new) System.map in a scratch copy: unknown symbols are problems."""
    depmod = shutil.which("depmod") or "/sbin/depmod"
    if not os.path.exists(depmod):
        raise KbbError("depmod not found (apt-get install kmod)")
    release = release_dir.name
    with tempfile.TemporaryDirectory(prefix="kbuild-bolt-depmod-") as tmp:
        dest = Path(tmp) / "lib/modules" / release
        shutil.copytree(release_dir, dest, symlinks=True,
                        ignore=shutil.ignore_patterns("build", "source"))
        cmd = [depmod, "-b", tmp, "-e", "-F", str(system_map)]
        if symvers:
            cmd = [depmod, "-b", tmp, "-e", "-E", str(symvers)]
        proc = subprocess.run(cmd + [release], capture_output=True, text=True)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        if proc.returncode != 0 or lines:
            return [f"depmod: {line}" for line in lines] or [f"depmod failed ({proc.returncode})"]
    return []


__all__ = ["check_modules", "ModuleReport"]
