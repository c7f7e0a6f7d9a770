"""Every kernel self-patching table kbuild-bolt knows, one module per table."""

from kbuild_bolt.kernel.tables import (
    alternatives, bug_table, call_sites, ex_table, ibt_seal, jump_table, ksymtab, mcount,
    orc, paravirt, pci_fixup, retpoline_sites, return_sites, runtime_const, smp_locks,
    static_calls,
)
from kbuild_bolt.kernel.tables.base import TableData, TableSpec, read_table

MODULES = (
    jump_table, static_calls, alternatives, paravirt, smp_locks, ex_table, bug_table, orc,
    retpoline_sites, return_sites, call_sites, ibt_seal, mcount, pci_fixup, ksymtab,
    runtime_const,
)

SPECS: tuple[TableSpec, ...] = tuple(spec for module in MODULES for spec in module.SPECS)
BY_NAME = {spec.name: spec for spec in SPECS}


def specs_for(image) -> tuple[TableSpec, ...]:
    """The fixed specs plus those a module discovers in this image (one table per
    runtime constant, ...)."""
    found = []
    for module in MODULES:
        discover = getattr(module, "discover", None)
        if discover is not None:
            found.extend(discover(image))
    return SPECS + tuple(found)


def read_all(image, version: tuple[int, int]) -> dict[str, TableData]:
    """Every table this kernel has, by name (absent tables are left out)."""
    out = {}
    for spec in specs_for(image):
        data = read_table(image, spec, version)
        if data is not None:
            out[spec.name] = data
    return out


__all__ = ["SPECS", "BY_NAME", "read_all", "specs_for", "read_table", "TableData", "TableSpec"]
