"""``__bug_table`` (asm-generic/bug.h, struct bug_entry, relative pointers).

Every BUG()/WARN() ``ud2`` site. The entry size depends on the kernel config:
12 bytes with CONFIG_DEBUG_BUGVERBOSE (file and line), 8 without; the layout
whose sites land on ``ud2`` instructions is the right one.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, DATA, SITE,
)

BUGFLAG_WARNING = 1 << 0
BUGFLAG_ONCE = 1 << 1
BUGFLAG_DONE = 1 << 2
BUGFLAG_NO_CUT_HERE = 1 << 3

VERBOSE = Layout(12, (
    Field("bug_addr", 0, "prel32"),
    Field("file", 4, "prel32"),
    Field("line", 8, "u16"),
    Field("flags", 10, "u16"),
), note="CONFIG_DEBUG_BUGVERBOSE")

TERSE = Layout(8, (
    Field("bug_addr", 0, "prel32"),
    Field("flags", 4, "u16"),
), note="no CONFIG_DEBUG_BUGVERBOSE")

UD2 = b"\x0f\x0b"


def points_at_ud2(image, data) -> bool:
    """Most sites of a correctly sized table are ``ud2`` in executable code."""
    if data.count == 0:
        return True
    targets = data.targets("bug_addr")
    sample = targets[:: max(1, len(targets) // 512)]
    hits = 0
    for addr in sample.tolist():
        section = image.section_at(addr)
        if section is not None and section.is_exec and image.read(addr, 2) == UD2:
            hits += 1
    return hits >= 0.9 * len(sample)


SPECS = [TableSpec(
    name="__bug_table",
    bounds=Bounds("__start___bug_table", "__stop___bug_table", "__bug_table"),
    layouts=lambda version: [VERBOSE, TERSE],
    probe=points_at_ud2,
    description="BUG/WARN ud2 sites",
    refs=(CodeRef("bug_addr", SITE, expect="ud2"), CodeRef("file", DATA)),
)]
