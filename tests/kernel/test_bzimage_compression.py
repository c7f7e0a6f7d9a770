"""`kbuild-bolt bzimage` for every kernel compression (issue 14): a lab tree
switched to each CONFIG_KERNEL_* and its bzImage made again by make (only the
decompressor and the payload change), then `kbuild-bolt bzimage` replays the
chain for a rewritten vmlinux, outside make's environment, and the result
boots with KASLR."""

from __future__ import annotations

import pytest

from buildtree import KBUILD_BOLT, OverlayBuild
from kbuild_bolt.qemu.runner import boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

pytestmark = pytest.mark.xdist_group("kbuild-tree")

METHODS = ["GZIP", "BZIP2", "LZMA", "XZ", "LZO", "LZ4", "ZSTD"]


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    from kbuild_bolt.lab.kernels import lab_kernel

    kernel = lab_kernel("6.12-regular")
    out = tmp_path_factory.mktemp("bzimage-methods") / "vmlinux"
    result = rewrite(kernel.vmlinux, out, RewriteOptions(reorder_blocks="random", seed=21,
                                                         progress=False, strip_debug=True))
    assert result.verify_summary.startswith("verify: ok")
    return out


@pytest.mark.parametrize("method", METHODS)
def test_bzimage_for_every_compression(method, rewritten, tmp_path):
    tree = OverlayBuild("6.12-regular", tmp_path / "tree")
    config = str(tree.build_dir / ".config")
    others = [f"--disable KERNEL_{m}" for m in METHODS if m != method]
    tree.run(["sh", "-c", f"{tree.source}/scripts/config --file {config} "
              f"{' '.join(others)} --enable KERNEL_{method}"])
    tree.make("olddefconfig")
    tree.make("bzImage")
    payload = {"GZIP": "gz", "BZIP2": "bz2", "LZMA": "lzma", "XZ": "xz", "LZO": "lzo",
               "LZ4": "lz4", "ZSTD": "zst"}[method]
    assert tree.exists(f"arch/x86/boot/compressed/vmlinux.bin.{payload}")
    out = tmp_path / "bzImage"
    # (outside make: no $XZ, $KGZIP, ... in the environment)
    proc = tree.run(["env", "-u", "XZ", "-u", "KGZIP", KBUILD_BOLT, "bzimage", str(rewritten),
                     "--build-dir", str(tree.build_dir), "-o", str(out)], check=False)
    assert proc.returncode == 0, proc.stdout
    outcome = boot(out, tree.kernel.initramfs, workload="none", kaslr=True)
    assert outcome.ok and outcome.kaslr, outcome.summary()
    if method == "XZ":
        # A step failing inside a pipeline (xz_wrap.sh with no xz) names its own
        # error, instead of leaving an empty payload behind.
        proc = tree.run(["env", "XZ=/nonexistent/xz", KBUILD_BOLT, "bzimage", str(rewritten),
                         "--build-dir", str(tree.build_dir), "-o", str(tmp_path / "bz")],
                        check=False)
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stdout
        assert "vmlinux.bin.xz" in lines[0] and "/nonexistent/xz" in lines[0], lines[0]
