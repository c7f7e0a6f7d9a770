"""``__jump_table``: static keys (asm/jump_label.h, struct jump_entry).

Each entry: the patch site (a 2- or 5-byte jmp or nop), the jump target, and a
PC-relative pointer to the static_key whose low bits are flags: bit 0 is the
branch's default sense (static_branch_likely), bit 1 marks sites in init text.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, BRANCH, DATA, ENTRY,
)

JUMP_TYPE_TRUE = 1
JUMP_TYPE_INIT = 2

LAYOUT = Layout(16, (
    Field("code", 0, "prel32"),
    Field("target", 4, "prel32"),
    Field("key", 8, "prel64f", flag_mask=3),
))

SPECS = [TableSpec(
    name="__jump_table",
    bounds=Bounds("__start___jump_table", "__stop___jump_table", "__jump_table"),
    layouts=lambda version: [LAYOUT],
    description="static keys: jmp/nop sites",
    refs=(
        CodeRef("code", BRANCH, expect="static_key_site", other="target"),
        CodeRef("target", ENTRY),
        CodeRef("key", DATA),
    ),
)]
