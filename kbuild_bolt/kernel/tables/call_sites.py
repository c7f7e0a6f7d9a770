"""``.call_sites``: direct calls, for call depth tracking (6.2+).

callthunks_patch_builtin_calls() redirects each call to the callee's
accounting thunk in its padding, so every entry must be a ``call rel32``.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, SITE, WITH_REPLACEMENTS,
)

LAYOUT = Layout(4, (Field("site", 0, "prel32"),))

SPECS = [TableSpec(
    name=".call_sites",
    bounds=Bounds("__call_sites", "__call_sites_end", ".call_sites"),
    layouts=lambda version: [LAYOUT],
    description="direct call sites (call depth tracking)",
    refs=(CodeRef("site", SITE, expect="direct_call", places=WITH_REPLACEMENTS),),
)]
