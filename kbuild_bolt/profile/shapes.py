"""Function shapes: what a profile records of each function it saw, so that it can
be applied to a rebuilt kernel (hashes of the code with addresses masked, per
function and per block; see :mod:`kbuild_bolt.profile.stale` for the matching).
This module is the shapes' part of the profile file format (``H``/``K`` lines)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FunctionShape:
    name: str
    start: int
    size: int
    hash: int
    blocks: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, size, hash)


def write_shapes(shapes: dict[str, FunctionShape]) -> list[str]:
    lines = []
    for s in shapes.values():
        lines.append(f"H {s.name} {s.hash:016x} {s.start:x} {s.size:x}")
        for off, size, h in s.blocks:
            lines.append(f"K {off:x} {size:x} {h:016x}")
    return lines


def parse_shapes(lines: list[str]) -> dict[str, FunctionShape]:
    """The shapes of ``H`` lines, each with the ``K`` lines that follow it (K
    lines before the first H belong to none). ValueError or IndexError on a line
    that is not one."""
    shapes: dict[str, FunctionShape] = {}
    current = None
    for line in lines:
        parts = line.split()
        if parts[0] == "H":
            current = FunctionShape(parts[1], int(parts[3], 16), int(parts[4], 16),
                                    int(parts[2], 16))
            shapes[f"{current.name}@{current.start:x}"] = current
        elif parts[0] == "K":
            block = (int(parts[1], 16), int(parts[2], 16), int(parts[3], 16))
            if current is not None:
                current.blocks.append(block)
        else:
            raise ValueError(parts[0])
    return shapes
