"""A vmlinux as a kernel image: an x86-64 ELF file with kernel text."""

from __future__ import annotations

from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.errors import KbbError


def open_vmlinux(path) -> ElfImage:
    image = ElfImage(path)
    if image.section(".text") is None:
        raise KbbError(f"{path}: no .text section (not a vmlinux)")
    return image
