"""A writable copy of a cached lab kernel's build, for tests that run ``make``.

The copy is an overlay mount over the lab kernel's directory, at the same path,
inside a private mount namespace (``unshare --mount``): make sees the tree it
built, writes go to a scratch directory, and the cache (which other tests read
at the same time) never changes. The same path matters: objtool's build records
absolute paths, so a build directory moved or copied elsewhere rebuilds objtool
and then every object that depends on it (measured: a full 10-minute rebuild).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from kbuild_bolt.lab.kernels import lab_kernel

KBUILD_BOLT = str(Path(sys.executable).with_name("kbuild-bolt"))
BUILD_ENV = {
    "KBUILD_BUILD_USER": "kbuild-bolt",
    "KBUILD_BUILD_HOST": "lab",
    "KBUILD_BUILD_TIMESTAMP": "Thu Jan  1 00:00:00 UTC 2026",
    "LC_ALL": "C",
}
_MOUNT = ('mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$1" '
          '&& shift 3 && exec "$@"')


class OverlayBuild:
    def __init__(self, flavor: str, scratch: Path):
        self.kernel = lab_kernel(flavor)
        from kbuild_bolt.lab.kernels import kernel_source

        self.source = kernel_source(self.kernel.series).tree
        self.lower = self.kernel.root
        self.upper = Path(scratch) / "upper"
        self.work = Path(scratch) / "work"
        self.upper.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.build_dir = self.kernel.build_dir   # the path make sees, inside the namespace

    def run(self, argv: list[str], *, check: bool = True, cwd: Path | None = None,
            env: dict | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
        """Run ``argv`` with the overlay mounted; output captured (stdout+stderr)."""
        if shutil.which("unshare") is None:
            raise RuntimeError("unshare (util-linux) is needed for writable lab build trees")
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _MOUNT, "sh",
               str(self.lower), str(self.upper), str(self.work), *argv]
        proc = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, **BUILD_ENV, **(env or {})),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise AssertionError(f"{' '.join(argv[:6])}... failed ({proc.returncode}):\n{tail}")
        return proc

    def make(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return self.run(["make", "-C", str(self.source), f"O={self.build_dir}", "ARCH=x86_64",
                         f"-j{os.cpu_count() or 1}", f"KBUILD_BOLT={KBUILD_BOLT}", *args],
                        check=check, **kw)

    def path(self, rel: str) -> Path:
        """Where the file make sees at build_dir/rel is, outside the namespace."""
        relative = (self.build_dir / rel).relative_to(self.lower)
        upper = self.upper / relative
        if os.path.lexists(upper):
            if stat.S_ISCHR(os.lstat(upper).st_mode):   # overlay whiteout: deleted
                raise FileNotFoundError(self.build_dir / rel)
            return upper
        return self.lower / relative

    def exists(self, rel: str) -> bool:
        try:
            return self.path(rel).exists()
        except FileNotFoundError:
            return False

    def new_files(self, pattern: str) -> list[Path]:
        """Files written in the overlay (relative to the lab kernel's root) matching ``pattern``
        (bindeb-pkg puts its packages beside the build directory)."""
        return sorted(p for p in self.upper.glob(pattern) if p.is_file())


def enable_in_config(tree: OverlayBuild, profile: Path, tmp_path: Path) -> None:
    """CONFIG_BOLT=y with a profile in .config, as a distro config carries it (the
    package targets build without the command line's options)."""
    copy = tmp_path / "distro.kbb"
    shutil.copyfile(profile, copy)
    tree.run([str(tree.source / "scripts/config"), "--file", str(tree.build_dir / ".config"),
              "--enable", "BOLT", "--set-str", "BOLT_PROFILE", str(copy)])
    tree.make("olddefconfig")
    config = tree.path(".config").read_text()
    assert "CONFIG_BOLT=y" in config and "CONFIG_BOLT_VERIFY=y" in config
