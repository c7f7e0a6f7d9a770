"""``.parainstructions`` (asm/paravirt_types.h, struct paravirt_patch_site).

Until 6.5 paravirt call sites had their own table with absolute addresses;
later kernels patch them through alternatives.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, RANGE,
)

LAYOUT = Layout(16, (
    Field("instr", 0, "abs64"),
    Field("type", 8, "u8"),
    Field("len", 9, "u8"),
))

SPECS = [TableSpec(
    name=".parainstructions",
    bounds=Bounds("__parainstructions", "__parainstructions_end", ".parainstructions"),
    layouts=lambda version: [LAYOUT] if version < (6, 5) else [],
    description="paravirt patch sites",
    refs=(CodeRef("instr", RANGE, expect="pv_call", other="len"),),
)]
