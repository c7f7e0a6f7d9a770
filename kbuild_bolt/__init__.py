"""kbuild-bolt: a post-link optimizer for the Linux kernel."""

__version__ = "0.1.0"
