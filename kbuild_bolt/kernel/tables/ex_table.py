"""``__ex_table`` (asm/extable.h, struct exception_table_entry).

A faulting instruction and its fixup, plus a data word (fixup type and
registers). sorttable sorts it by instruction address at build time; the kernel
binary-searches it, so it must stay sorted.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, ENTRY, SITE, WITH_REPLACEMENTS, sorted_by,
)


LAYOUT = Layout(12, (
    Field("insn", 0, "prel32"),
    Field("fixup", 4, "prel32"),
    Field("data", 8, "s32"),
))

SPECS = [TableSpec(
    name="__ex_table",
    bounds=Bounds("__start___ex_table", "__stop___ex_table", "__ex_table"),
    layouts=lambda version: [LAYOUT],
    description="exception fixups",
    refs=(CodeRef("insn", SITE, places=WITH_REPLACEMENTS), CodeRef("fixup", ENTRY, places=WITH_REPLACEMENTS)),
    check=lambda model, data: sorted_by(model, data, "insn"),
    sorted_field="insn",
)]
