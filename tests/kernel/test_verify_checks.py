"""Verification's checks of a rewritten lab kernel that run beside the decoding
of its code (in the parent, while a forked child decodes): a stale entry still
fails the rewrite, and nothing is written."""

from __future__ import annotations

import pytest

from kbuild_bolt.errors import KbbError
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite


def test_a_stale_orc_entry_fails_the_rewrite_by_its_state(lab_regular, tmp_path, capsys):
    """An .orc_unwind_ip entry left at its old address: the ORC states read back
    from the output no longer follow the moved code."""
    out = tmp_path / "out"
    with pytest.raises(KbbError, match="verification failed"):
        rewrite(lab_regular.vmlinux, out, RewriteOptions(
            reorder_blocks="reverse", plant_fault="orc", progress=False))
    summary = capsys.readouterr().err
    orc = [line for line in summary.splitlines() if "ORC states follow moved code" in line]
    assert orc and "bad" in orc[0], summary
    assert any(line.startswith("  ! ORC states follow moved code:") for line in orc), summary
    assert not out.exists()
    assert not list(tmp_path.iterdir())
