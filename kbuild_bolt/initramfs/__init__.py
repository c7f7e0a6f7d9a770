"""Initramfs archives: cpio (newc) and the compressions the kernel unpacks."""
