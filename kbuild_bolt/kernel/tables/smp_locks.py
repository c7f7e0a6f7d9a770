"""``.smp_locks``: every ``lock`` prefix, so a uniprocessor boot can turn it off.

The output section is padded to a page with zero entries (vmlinux.lds.S), which
are not sites.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, SITE, WITH_REPLACEMENTS,
)

LAYOUT = Layout(4, (Field("site", 0, "prel32"),))

SPECS = [TableSpec(
    name=".smp_locks",
    bounds=Bounds("__smp_locks", "__smp_locks_end", ".smp_locks"),
    layouts=lambda version: [LAYOUT],
    zero_padding="trailing",
    description="lock prefixes",
    refs=(CodeRef("site", SITE, expect="lock_prefix", places=WITH_REPLACEMENTS),),
)]
