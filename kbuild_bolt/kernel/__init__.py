"""What kbuild-bolt knows about the Linux kernel: version, self-patching tables."""
