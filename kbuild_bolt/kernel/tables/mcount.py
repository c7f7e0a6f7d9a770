"""``__mcount_loc`` / ``__patchable_function_entries``: ftrace call sites.

Absolute addresses of every ``call __fentry__`` (turned into a 5-byte nop at
boot and back into calls when tracing). x86 uses ``__mcount_loc``, placed in
.init.data. Zero entries are padding the linker put between objects (or
references to discarded code); ftrace skips them. Other architectures' -fpatchable-function-entry lands in
``__patchable_function_entries``.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, SITE,
)

LAYOUT = Layout(8, (Field("site", 0, "abs64"),))

SPECS = [
    TableSpec(
        name="__mcount_loc",
        bounds=Bounds("__start_mcount_loc", "__stop_mcount_loc", "__mcount_loc"),
        layouts=lambda version: [LAYOUT],
        zero_padding="any",
        sorted_field="site",  # CONFIG_BUILDTIME_MCOUNT_SORT
        description="ftrace fentry sites",
        refs=(CodeRef("site", SITE, expect="fentry_site"),),
    ),
    TableSpec(
        name="__patchable_function_entries",
        bounds=Bounds(None, None, "__patchable_function_entries"),
        layouts=lambda version: [LAYOUT],
        description="patchable function entries",
        refs=(CodeRef("site", SITE),),
    ),
]
