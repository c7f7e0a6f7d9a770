"""``.retpoline_sites``: indirect calls/jumps through ``__x86_indirect_thunk_<reg>``.

apply_retpolines() rewrites each into the mitigation the CPU needs (or a plain
indirect branch); a stale entry makes it patch the wrong bytes.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, SITE, WITH_REPLACEMENTS,
)

LAYOUT = Layout(4, (Field("site", 0, "prel32"),))

SPECS = [TableSpec(
    name=".retpoline_sites",
    bounds=Bounds("__retpoline_sites", "__retpoline_sites_end", ".retpoline_sites"),
    layouts=lambda version: [LAYOUT],
    description="retpoline thunk call/jmp sites",
    refs=(CodeRef("site", SITE, expect="retpoline_site", places=WITH_REPLACEMENTS),),
)]
