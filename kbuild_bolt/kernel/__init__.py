"""What kbuild-bolt knows about the Linux kernel before decoding any code: the
vmlinux as a kernel image, its version, and its self-patching tables as data."""
