"""``__jump_table``: static keys (asm/jump_label.h, struct jump_entry).

Each entry: the patch site (a 2- or 5-byte jmp or nop), the jump target, and a
PC-relative pointer to the static_key whose low bits are flags: bit 0 is the
branch's sense (static_branch_likely), bit 1 marks sites in init text.

The kernel never writes a site at boot: it trusts the linked bytes to be what
the key's initial state selects (a jmp where ``enabled`` XOR the branch bit,
a nop otherwise), and when it switches the key it checks the site holds the
opposite form first (``jump_label: Fatal kernel bug, unexpected op``).
"""

import numpy as np

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
    check=lambda model, data: initial_forms(model, data),
    refs=(
        CodeRef("code", BRANCH, expect="static_key_site", other="target"),
        CodeRef("target", ENTRY),
        CodeRef("key", DATA),
    ),
)]


def initial_forms(model, data) -> list[tuple[int, str]]:
    """Entries whose site is not the form (jmp or nop) its key's initial state and
    branch sense select."""
    if not data.count:
        return []
    index = data.indices
    codes = data.targets("code")
    keys = data.targets("key")
    branch = (data.flags("key", index) & JUMP_TYPE_TRUE).astype(bool)
    # static_key.enabled (an atomic_t at the key's start): its value as linked
    enabled = model.read_bytes(keys, 4).view("<i4").ravel() > 0
    first = model.read_bytes(codes, 1)[:, 0]
    is_jmp = (first == 0xEB) | (first == 0xE9)
    # (a module's key defined elsewhere: the loader makes its sites match its
    # state, jump_label_add_module(); nothing here says what that is)
    wrong = np.flatnonzero((is_jmp != (enabled ^ branch)) & ~model.external(keys))
    return [(int(index[k]), f"site is a {'jmp' if is_jmp[k] else 'nop'} but its key is "
             f"{'enabled' if enabled[k] else 'disabled'} with the branch bit "
             f"{int(branch[k])}") for k in wrong.tolist()]
