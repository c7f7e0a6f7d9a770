"""Profiles: where the kernel spends its time, from QEMU, perf or BOLT .fdata."""

from __future__ import annotations

import re

from kbuild_bolt.errors import KbbError

from kbuild_bolt.profile.model import Profile, load_profile, read_profile, write_profile


def resolve_profile(profile, model, cfg=None, log=None) -> Profile:
    """A Profile for this kernel from a Profile or a path (any supported format).

    A profile that recorded its functions' shapes is moved onto this kernel
    (unchanged functions keep their counts; changed ones by matching blocks)."""
    if not isinstance(profile, Profile):
        profile = load_profile(profile, model)
    _check_kernel(profile, model)
    if profile.shapes:
        from kbuild_bolt.binary.cfg import build_cfg
        from kbuild_bolt.profile.stale import adapt

        profile, report = adapt(profile, model, cfg if cfg is not None else build_cfg(model),
                                profile.shapes)
        if log:
            log(report.summary())
        if report.total and report.used < 0.05:
            raise KbbError(f"the profile does not match this kernel ({report.summary()})")
    return profile


def _series(release: str) -> str | None:
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _check_kernel(profile: Profile, model) -> None:
    """A profile of another kernel series cannot describe this one: refuse it
    (within a series, stale matching decides what still applies)."""
    version = getattr(model, "version", None)
    mine = _series(getattr(version, "release", "") or "")
    theirs = _series(profile.kernel)
    if mine and theirs and mine != theirs:
        raise KbbError(f"the profile was recorded on Linux {profile.kernel}, this vmlinux is "
                       f"Linux {version.release}: record a profile of this kernel")


__all__ = ["Profile", "load_profile", "read_profile", "write_profile", "resolve_profile"]
