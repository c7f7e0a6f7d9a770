"""Profiles: where the kernel spends its time, from QEMU, perf or BOLT .fdata."""

from __future__ import annotations

from kbuild_bolt.profile.model import Profile, load_profile, read_profile, write_profile


def resolve_profile(profile, model) -> Profile:
    """A Profile object from a Profile or a path (any supported format)."""
    if isinstance(profile, Profile):
        return profile
    return load_profile(profile, model)


__all__ = ["Profile", "load_profile", "read_profile", "write_profile", "resolve_profile"]
