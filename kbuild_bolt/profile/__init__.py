"""Profiles: where the kernel spends its time, from QEMU, perf or BOLT .fdata.

Layers inside: ``model`` (and ``shapes``, its part of the file format) at the
bottom; the readers and recorders (``qemu``, ``perf``, ``fdata``), stale
matching (``stale``) and attaching counts to the CFG (``attach``, ``dyno``)
above it; ``formats`` (which reader a file needs, a profile made ready for a
kernel) on top."""
