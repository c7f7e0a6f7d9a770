"""``.altinstructions`` (asm/alternative.h, struct alt_instr).

An entry names an original instruction range and its replacement in
``.altinstr_replacement``; the kernel copies the replacement over the original
(padded with nops) when the CPU has the feature. 6.12 widened the feature word
into cpuid:16 + flags:16 (14-byte entries); 6.1 has a u16 cpuid (12 bytes).
6.12 also folds paravirt patching into alternatives.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, RANGE,
)

LAYOUT_6_1 = Layout(12, (
    Field("instr", 0, "prel32"),
    Field("repl", 4, "prel32"),
    Field("cpuid", 8, "u16"),
    Field("instrlen", 10, "u8"),
    Field("replacementlen", 11, "u8"),
), note="6.1: u16 cpuid")

LAYOUT_6_12 = Layout(14, (
    Field("instr", 0, "prel32"),
    Field("repl", 4, "prel32"),
    Field("ft_flags", 8, "u32"),
    Field("instrlen", 12, "u8"),
    Field("replacementlen", 13, "u8"),
), note="6.3+: cpuid:16 flags:16")


def layouts(version):
    return [LAYOUT_6_12] if version >= (6, 3) else [LAYOUT_6_1]


SPECS = [TableSpec(
    name=".altinstructions",
    bounds=Bounds("__alt_instructions", "__alt_instructions_end", ".altinstructions"),
    layouts=layouts,
    description="alternatives: original site + replacement",
    refs=(
        CodeRef("instr", RANGE, other="instrlen"),
        CodeRef("repl", RANGE, other="replacementlen", places=(".altinstr_replacement",)),
    ),
)]
