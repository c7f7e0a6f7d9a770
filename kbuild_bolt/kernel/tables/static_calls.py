"""``.static_call_sites`` and ``.static_call_tramp_key`` (linux/static_call_types.h).

A site is a call (or tail-call jmp) to a static call trampoline that the kernel
rewrites into a direct call of the current target. The key pointer's low bits
are flags: bit 0 tail call, bit 1 site in init text.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, DATA, FUNCTION, SITE,
)

STATIC_CALL_SITE_TAIL = 1
STATIC_CALL_SITE_INIT = 2

SITES = Layout(8, (Field("addr", 0, "prel32"), Field("key", 4, "prel32f", flag_mask=3)))
TRAMP_KEY = Layout(8, (Field("tramp", 0, "prel32"), Field("key", 4, "prel32")))

SPECS = [
    TableSpec(
        name=".static_call_sites",
        bounds=Bounds("__start_static_call_sites", "__stop_static_call_sites",
                      ".static_call_sites"),
        layouts=lambda version: [SITES],
        description="static call sites: calls to trampolines",
        refs=(CodeRef("addr", SITE, expect="static_call_site"), CodeRef("key", DATA)),
    ),
    TableSpec(
        name=".static_call_tramp_key",
        bounds=Bounds("__start_static_call_tramp_key", "__stop_static_call_tramp_key",
                      ".static_call_tramp_key"),
        layouts=lambda version: [TRAMP_KEY],
        description="exported static call trampolines and their keys",
        refs=(CodeRef("tramp", FUNCTION), CodeRef("key", DATA)),
    ),
]
