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
    that is not one. (The K lines, most of a profile's shape lines, are read in
    bulk.)"""
    heads = [i for i, line in enumerate(lines) if line[:1] == "H"]
    blocks = [line for line in lines if line[:1] != "H"]
    tokens = " ".join(blocks).split()
    if len(tokens) != 4 * len(blocks) or any(t != "K" for t in tokens[0::4]):
        raise ValueError("K")
    values = list(zip([int(x, 16) for x in tokens[1::4]], [int(x, 16) for x in tokens[2::4]],
                      [int(x, 16) for x in tokens[3::4]]))
    shapes: dict[str, FunctionShape] = {}
    # (the K lines before the j-th H line: its index less the H lines before it)
    first = [i - j for j, i in enumerate(heads)] + [len(blocks)]
    for j, i in enumerate(heads):
        parts = lines[i].split()
        if parts[0] != "H":
            raise ValueError("H")
        shape = FunctionShape(parts[1], int(parts[3], 16), int(parts[4], 16), int(parts[2], 16),
                              values[first[j]:first[j + 1]])
        shapes[f"{shape.name}@{shape.start:x}"] = shape
    return shapes
