"""The package's imports point one way: down the layers of ../shared/ARCHITECTURE.md.

Every import in every module (top level or inside a function) is read with
``ast``; an import of a module in a higher layer, an arrow the architecture
forbids, or a module that belongs to no layer fails the test. Adding a
package means placing it here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kbuild_bolt"

# Lowest first. A module may import modules of its own layer and of any layer below.
LAYERS = [
    ("foundation", ["kbuild_bolt", "kbuild_bolt.errors", "kbuild_bolt.atomic",
                    "kbuild_bolt.memory", "kbuild_bolt.arrays", "kbuild_bolt.cache",
                    "kbuild_bolt.processes"]),
    ("elf", ["kbuild_bolt.elf"]),
    ("dwarf", ["kbuild_bolt.dwarf"]),
    ("x86", ["kbuild_bolt.x86"]),
    ("kernel tables", ["kbuild_bolt.kernel"]),
    ("binary", ["kbuild_bolt.binary"]),
    ("kernel analysis", ["kbuild_bolt.analysis"]),
    # Inside profile/: the model at the bottom, readers and matching above it,
    # format dispatch on top.
    ("profile model", ["kbuild_bolt.profile", "kbuild_bolt.profile.model",
                       "kbuild_bolt.profile.shapes"]),
    ("profile readers", ["kbuild_bolt.profile.*"]),
    ("profile formats", ["kbuild_bolt.profile.formats"]),
    ("layout", ["kbuild_bolt.layout"]),
    ("rewrite", ["kbuild_bolt.rewrite"]),
    ("kbuild", ["kbuild_bolt.kbuild", "kbuild_bolt.initramfs"]),
    ("report", ["kbuild_bolt.report"]),
    ("cli", ["kbuild_bolt.cli", "kbuild_bolt.__main__"]),
]

# Beside the layers: the QEMU runner sees only the foundation and ELF files and
# is used from profile recording up; the lab may use everything but the command
# line, and only the command line uses the lab.
SIDE = {
    "qemu runner": (["kbuild_bolt.qemu"], {"foundation", "elf"}, "profile readers"),
    "lab": (["kbuild_bolt.lab"], None, "cli"),
}

# Arrows that stay forbidden although they point down.
FORBIDDEN = {
    ("layout", "elf"), ("layout", "x86"),   # layout sees blocks, functions and counts
}

ORDER = [name for name, _ in LAYERS]


def layer_of(module: str) -> str | None:
    """The layer of a module: an exact name, else the longest package prefix
    (``pkg.*`` counts as longer than ``pkg``)."""
    best, best_len = None, -1
    entries = [(name, prefixes) for name, prefixes in LAYERS]
    entries += [(name, prefixes) for name, (prefixes, _, _) in SIDE.items()]
    for name, prefixes in entries:
        for prefix in prefixes:
            if prefix.endswith(".*"):
                base = prefix[:-2]
                hit = module.startswith(base + ".")
                length = len(base) + 0.5      # (beats the package itself as a prefix)
            else:
                hit = module == prefix or module.startswith(prefix + ".")
                length = len(prefix) + (1 if module == prefix else 0)
            if hit and length > best_len:
                best, best_len = name, length
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every kbuild_bolt import in a file, resolved to modules."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kbuild_bolt")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("kbuild_bolt"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((node.lineno, sub if is_module(sub) else base))
    return out


def arrow_problem(src_layer: str, dst_layer: str) -> str | None:
    """Why an import from ``src_layer`` of ``dst_layer`` is wrong (None: fine)."""
    if src_layer == dst_layer:
        return None
    if (src_layer, dst_layer) in FORBIDDEN:
        return "a forbidden arrow"
    if dst_layer in SIDE:
        _, _, lowest_user = SIDE[dst_layer]
        if src_layer in SIDE or ORDER.index(src_layer) >= ORDER.index(lowest_user):
            return None
        return f"only {lowest_user} and above may use {dst_layer}"
    if src_layer in SIDE:
        _, allowed, lowest_user = SIDE[src_layer]
        if allowed is None:
            ok = ORDER.index(dst_layer) < ORDER.index(lowest_user)
        else:
            ok = dst_layer in allowed
        return None if ok else f"{src_layer} must not depend on {dst_layer}"
    if ORDER.index(dst_layer) > ORDER.index(src_layer):
        return "points up"
    return None


def layer_problems() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        src_layer = layer_of(src)
        if src_layer is None:
            problems.append(f"{src}: in no layer (place it in tests/unit/test_layers.py)")
            continue
        for line, dst in imports_of(path):
            dst_layer = layer_of(dst)
            if dst_layer is None:
                problems.append(f"{src}:{line}: imports {dst}, which is in no layer")
                continue
            why = arrow_problem(src_layer, dst_layer)
            if why:
                problems.append(f"{src}:{line} ({src_layer}) imports {dst} ({dst_layer}): {why}")
    return problems


def test_imports_follow_the_layers():
    problems = layer_problems()
    assert not problems, "\n".join(problems)


def test_every_package_has_an_init():
    # (setuptools' find: skips directories without one: an installed wheel would miss them)
    missing = [str(d.relative_to(ROOT)) for d in PACKAGE.rglob("*")
               if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert not missing


@pytest.mark.parametrize("src, dst, bad", [
    ("kbuild_bolt.x86.patterns", "kbuild_bolt.binary.model", True),
    ("kbuild_bolt.binary.model", "kbuild_bolt.analysis.inventory", True),
    ("kbuild_bolt.profile.model", "kbuild_bolt.profile.stale", True),
    ("kbuild_bolt.profile.stale", "kbuild_bolt.profile.formats", True),
    ("kbuild_bolt.profile.formats", "kbuild_bolt.profile.stale", False),
    ("kbuild_bolt.profile.qemu", "kbuild_bolt.lab.kernels", True),
    ("kbuild_bolt.profile.qemu", "kbuild_bolt.qemu.runner", False),
    ("kbuild_bolt.rewrite.bisect", "kbuild_bolt.qemu.runner", False),
    ("kbuild_bolt.binary.model", "kbuild_bolt.qemu.runner", True),
    ("kbuild_bolt.qemu.runner", "kbuild_bolt.binary.model", True),
    ("kbuild_bolt.qemu.runner", "kbuild_bolt.elf.image", False),
    ("kbuild_bolt.lab.kernels", "kbuild_bolt.kbuild.hooks", False),
    ("kbuild_bolt.lab.kernels", "kbuild_bolt.cli", True),
    ("kbuild_bolt.layout.exttsp", "kbuild_bolt.x86.decode", True),
    ("kbuild_bolt.layout.exttsp", "kbuild_bolt.profile.attach", False),
    ("kbuild_bolt.kernel.tables.orc", "kbuild_bolt.rewrite.engine", True),
    ("kbuild_bolt.elf.image", "kbuild_bolt.errors", False),
    ("kbuild_bolt.cli", "kbuild_bolt.lab.kernels", False),
])
def test_the_rule_itself(src, dst, bad):
    """The checker catches the arrows this project once had (and allows the right ones)."""
    assert (arrow_problem(layer_of(src), layer_of(dst)) is not None) is bad
