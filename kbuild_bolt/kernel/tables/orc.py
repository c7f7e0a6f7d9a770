"""ORC unwind tables (asm/orc_types.h): ``.orc_unwind_ip``, ``.orc_unwind``, ``.orc_header``.

Two parallel arrays sorted by address: an instruction address (PC-relative s32)
and the 6-byte ORC entry that holds from there up to the next address. 6.4+
also has ``.orc_header``, a 20-byte hash of the ORC format that modules must match.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, ORC_IP, sorted_by,
)

ORC_TYPE_UNDEFINED = 0
ORC_TYPE_END_OF_STACK = 1
ORC_TYPE_CALL = 2
ORC_TYPE_REGS = 3
ORC_TYPE_REGS_PARTIAL = 4

IP = Layout(4, (Field("ip", 0, "prel32"),))
ENTRY = Layout(6, (
    Field("sp_offset", 0, "s16"),
    Field("bp_offset", 2, "s16"),
    # sp_reg:4 bp_reg:4 type:3 signal:1 (6.12; 6.1: type:2 signal:1 end:1)
    Field("bits", 4, "u16"),
))
HEADER = Layout(20, (Field("hash", 0, "u32"),))

SPECS = [
    TableSpec(
        name=".orc_unwind_ip",
        bounds=Bounds("__start_orc_unwind_ip", "__stop_orc_unwind_ip", ".orc_unwind_ip"),
        layouts=lambda version: [IP],
        description="ORC: instruction addresses",
        refs=(CodeRef("ip", ORC_IP),),
        check=lambda model, data: sorted_by(model, data, "ip"),
    ),
    TableSpec(
        name=".orc_unwind",
        bounds=Bounds("__start_orc_unwind", "__stop_orc_unwind", ".orc_unwind"),
        layouts=lambda version: [ENTRY],
        description="ORC: unwind entries",
    ),
    TableSpec(
        name=".orc_header",
        bounds=Bounds("__start_orc_header", "__stop_orc_header", ".orc_header"),
        layouts=lambda version: [HEADER] if version >= (6, 4) else [],
        description="ORC: format hash",
    ),
]
