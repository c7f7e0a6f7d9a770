"""An independent view of an ELF file through binutils' readelf, for cross-checks."""

import functools
import re
import subprocess

_SECTION = re.compile(
    r"^\s*\[\s*(\d+)\]\s+(\S+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)")


def sections(path):
    """{name: (index, type, addr, size, entsize)} from ``readelf -S -W``."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    result = {}
    for line in out.splitlines():
        m = _SECTION.match(line)
        if m:
            index, name, kind, addr, _off, size, entsize = m.groups()
            result.setdefault(name, (int(index), kind, int(addr, 16), int(size, 16),
                                     int(entsize, 16)))
    return result


def symbols(path):
    """[(value, size, type, bind, ndx, name)] from ``readelf -s -W`` (the .symtab)."""
    out = subprocess.run(["readelf", "-s", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    rows = []
    in_symtab = False
    for line in out.splitlines():
        if line.startswith("Symbol table"):
            in_symtab = "'.symtab'" in line
            continue
        if not in_symtab:
            continue
        parts = line.split()
        if len(parts) < 8 or not parts[0].endswith(":") or parts[0] == "Num:":
            continue
        num, value, size, kind, bind, _vis, ndx, name = parts[:8]
        size = int(size, 16) if size.startswith("0x") else int(size)
        rows.append((int(value, 16), size, kind, bind, ndx, name))
    return rows


def symbol_values(path):
    values = {}
    for value, _size, _kind, bind, _ndx, name in symbols(path):
        if name not in values or bind == "GLOBAL":
            values[name] = value
    return values


@functools.lru_cache(maxsize=4)
def relocations(path):
    """{rela section: [(offset, type)]} from ``readelf -r``."""
    out = subprocess.run(["readelf", "-r", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    result = {}
    current = None
    for line in out.splitlines():
        if line.startswith("Relocation section"):
            current = result.setdefault(line.split("'")[1], [])
            continue
        if current is not None and len(line) > 17 and line[16] == " ":
            parts = line.split(None, 3)
            if len(parts) >= 3 and re.fullmatch(r"[0-9a-f]{16}", parts[0]):
                current.append((int(parts[0], 16), parts[2]))
    return result
