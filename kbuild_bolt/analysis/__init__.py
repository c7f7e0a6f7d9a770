"""Kernel analysis over the binary model: the inventory ``info`` reports, the
cross-check of every table entry against the code, and ``dump``."""
