"""What Kbuild and packagers call: boot images, modules, initramfs, hooks."""
