"""``.ibt_endbr_seal``: ``endbr64`` of functions never called indirectly.

With IBT on, apply_seal_endbr() overwrites each listed endbr64 with a 4-byte nop.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, SITE,
)

LAYOUT = Layout(4, (Field("site", 0, "prel32"),))

SPECS = [TableSpec(
    name=".ibt_endbr_seal",
    bounds=Bounds("__ibt_endbr_seal", "__ibt_endbr_seal_end", ".ibt_endbr_seal"),
    layouts=lambda version: [LAYOUT],
    description="endbr64 to seal",
    refs=(CodeRef("site", SITE, expect="endbr64"),),
)]
