"""``.pci_fixup`` (linux/pci.h, struct pci_fixup with a PC-relative hook).

Eight consecutive sub-tables (early, header, final, enable, resume, suspend,
resume_early, suspend_late) of quirk functions matched by vendor/device/class.
"""

from kbuild_bolt.kernel.tables.base import (
    Bounds, CodeRef, Field, Layout, TableSpec, FUNCTION,
)

LAYOUT = Layout(16, (
    Field("vendor", 0, "u16"),
    Field("device", 2, "u16"),
    Field("class", 4, "u32"),
    Field("class_shift", 8, "u32"),
    Field("hook", 12, "prel32"),
))

PHASES = ("early", "header", "final", "enable", "resume", "suspend", "resume_early",
          "suspend_late")

SPECS = [TableSpec(
    name=".pci_fixup",
    bounds=Bounds("__start_pci_fixups_early", "__end_pci_fixups_suspend_late", ".pci_fixup"),
    layouts=lambda version: [LAYOUT],
    description="PCI quirk hooks",
    refs=(CodeRef("hook", FUNCTION),),
)]
