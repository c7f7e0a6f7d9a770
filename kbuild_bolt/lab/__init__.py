"""The kernel lab: real test kernels, their initramfs, and booting them in QEMU."""
