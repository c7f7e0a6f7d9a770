"""Runtime constants (asm/runtime-const.h, 6.11+): ``runtime_ptr_<sym>``, ``runtime_shift_<sym>``.

Each entry points at the immediate operand inside an instruction, not at the
instruction: the 8-byte immediate of ``mov $imm64, %reg`` (ptr) or the 1-byte
immediate of ``shr $imm8, %reg`` (shift), which runtime_const_init() fills in
at boot. There is one table per constant, so they are discovered from the
section names.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, OPERAND,
)

LAYOUT = Layout(4, (Field("where", 0, "prel32"),))
KINDS = {"ptr": "imm64_operand", "shift": "imm8_operand"}


def discover(image) -> list[TableSpec]:
    specs = []
    for section in image.sections:
        for kind, expect in KINDS.items():
            prefix = f"runtime_{kind}_"
            if section.name.startswith(prefix) and section.is_alloc:
                specs.append(TableSpec(
                    name=section.name,
                    bounds=Bounds(f"__start_{section.name}", f"__stop_{section.name}",
                                  section.name),
                    layouts=lambda version: [LAYOUT],
                    description=f"runtime constant {section.name[len(prefix):]} ({kind})",
                    refs=(CodeRef("where", OPERAND, expect=expect),),
                ))
    return specs


SPECS: list[TableSpec] = []
