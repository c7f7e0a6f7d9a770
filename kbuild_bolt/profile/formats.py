"""Which reader a profile file needs, and a profile made ready for one kernel.

This sits above every reader (kbuild-bolt's own format, BOLT .fdata, perf
script, stale matching): the model below knows none of them."""

from __future__ import annotations

import os
import re

from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile import fdata, perf
from kbuild_bolt.profile.model import MAGIC, Profile, read_profile
from kbuild_bolt.profile.stale import adapt


def load_profile(path, model=None) -> Profile:
    """Any supported profile file: kbuild-bolt's own, BOLT .fdata (needs the
    vmlinux ``model`` to turn function offsets into addresses)."""
    if not os.path.exists(path):
        raise KbbError(f"{path}: no such profile")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(MAGIC.encode()):
        return read_profile(path)
    if fdata.looks_like(head):
        if model is None:
            raise KbbError(f"{path}: a BOLT .fdata profile needs the vmlinux it was taken on")
        return fdata.read_fdata(path, model)
    if perf.looks_like(head):
        raise KbbError(f"{path}: perf script output needs the running kernel's _text; "
                       "convert it with `kbuild-bolt profile convert --vmlinux V --text-base A`")
    raise KbbError(f"{path}: unknown profile format")


def resolve_profile(profile, model, cfg=None, log=None) -> Profile:
    """A Profile for this kernel (its vmlinux part: module code is left out) from
    a Profile or a path (any supported format).

    A profile that recorded its functions' shapes is moved onto this kernel
    (unchanged functions keep their counts; changed ones by matching blocks)."""
    if not isinstance(profile, Profile):
        profile = load_profile(profile, model)
    _check_kernel(profile, model)
    profile = profile.kernel_only()
    if profile.shapes:
        profile, report = adapt(profile, model, cfg if cfg is not None else build_cfg(model),
                                profile.shapes)
        if log:
            log(report.summary())
            for line in report.details():
                log(f"profile: {line}")
        if report.total and report.used < 0.05 and log:
            log("profile: warning: little of it applies to this kernel (its code changed); "
                "what does not apply keeps the compiler's layout: record a profile of this build")
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
