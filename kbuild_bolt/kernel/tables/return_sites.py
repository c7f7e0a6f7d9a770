"""``.return_sites``: every ``jmp __x86_return_thunk`` (rethunk builds).

apply_returns() turns them into ``ret; int3`` or the selected return thunk and
warns "missing return thunk" when an entry does not point at such a jump.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, SITE, WITH_REPLACEMENTS,
)

LAYOUT = Layout(4, (Field("site", 0, "prel32"),))

SPECS = [TableSpec(
    name=".return_sites",
    bounds=Bounds("__return_sites", "__return_sites_end", ".return_sites"),
    layouts=lambda version: [LAYOUT],
    description="return thunk jmp sites",
    refs=(CodeRef("site", SITE, expect="return_site", places=WITH_REPLACEMENTS),),
)]
