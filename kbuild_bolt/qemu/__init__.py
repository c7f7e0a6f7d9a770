"""Booting a kernel in QEMU and judging the run by its console.

Used by ``boot``, profile recording, ``bisect`` and the lab alike, so it
depends on nothing above the ELF layer."""
