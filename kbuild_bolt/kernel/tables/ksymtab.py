"""Exported symbols: ``__ksymtab``/``__ksymtab_gpl`` and their CRCs ``__kcrctab``/``__kcrctab_gpl``.

With relative pointers (x86) an entry is three PC-relative s32: the symbol,
its name and its namespace (0 when it has none: 6.1's assembly exports). CRCs
are plain u32 values (MODVERSIONS), one per ksymtab entry in the same order;
modules are checked against them at load.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, DATA, SYMBOL,
)

KSYM = Layout(12, (
    Field("value", 0, "prel32"),
    Field("name", 4, "prel32"),
    Field("namespace", 8, "prel32", null_if_zero=True),
))
KSYM_REFS = (CodeRef("value", SYMBOL), CodeRef("name", DATA), CodeRef("namespace", DATA))
KCRC = Layout(4, (Field("crc", 0, "u32"),))

SPECS = [
    TableSpec(
        name="__ksymtab",
        bounds=Bounds("__start___ksymtab", "__stop___ksymtab", "__ksymtab"),
        layouts=lambda version: [KSYM],
        description="exported symbols",
        refs=KSYM_REFS,
    ),
    TableSpec(
        name="__ksymtab_gpl",
        bounds=Bounds("__start___ksymtab_gpl", "__stop___ksymtab_gpl", "__ksymtab_gpl"),
        layouts=lambda version: [KSYM],
        description="GPL-only exported symbols",
        refs=KSYM_REFS,
    ),
    TableSpec(
        name="__kcrctab",
        bounds=Bounds("__start___kcrctab", "__stop___kcrctab", "__kcrctab"),
        layouts=lambda version: [KCRC],
        description="CRCs of exported symbols",
    ),
    TableSpec(
        name="__kcrctab_gpl",
        bounds=Bounds("__start___kcrctab_gpl", "__stop___kcrctab_gpl", "__kcrctab_gpl"),
        layouts=lambda version: [KCRC],
        description="CRCs of GPL-only exported symbols",
    ),
]
