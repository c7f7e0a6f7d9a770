"""A real Debian initramfs for a lab kernel, made by initramfs-tools' mkinitramfs.

mkinitramfs reads modules from /lib/modules/<release> only; the lab kernel's are
in the cache. Inside a private mount namespace an overlay on /usr/lib adds
``modules/<release>`` (copied from the lab) without touching the host.

The configuration is Debian's, trimmed for a lab kernel: MODULES=list with
test_static_keys, busybox, the chosen compression; an early cpio in front made
the way intel-microcode's hook makes it (prepend_earlyinitramfs); and one
init-premount script (run after initramfs-tools loaded the modules) that prints
lab markers and powers off, because there is no root file system to mount.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

INITRAMFS_CONF = """\
MODULES=list
BUSYBOX=y
KEYMAP=n
COMPRESS={compress}
DEVICE=
NFSROOT=auto
RUNSIZE=10%
FSTYPE=auto
"""

EARLY_HOOK = """\
#!/bin/sh
# Like intel-microcode's hook: an uncompressed cpio in front of the initramfs.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
early="$(mktemp -d "${TMPDIR:-/var/tmp}/kbb-early.XXXXXX")"
mkdir -p "$early/kernel/x86/microcode"
# Not microcode; the kernel checks the blob and the TCG CPU is AuthenticAMD anyway.
printf 'kbuild-bolt test blob, not microcode\\n' > "$early/kernel/x86/microcode/GenuineIntel.bin"
(cd "$early" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible) > "$early.cpio"
prepend_earlyinitramfs "$early.cpio"
rm -rf "$early" "$early.cpio"
"""

PREMOUNT = """\
#!/bin/sh
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0;; esac
echo "KBB-PLAN initramfs-tools test_static_keys"
echo "KBB-MARK initramfs-tools"
cat /proc/modules
if grep -q '^test_static_keys ' /proc/modules; then
    echo "KBB-MARK test_static_keys"
else
    echo "KBB-FAIL test_static_keys not loaded"
fi
poweroff -f
"""


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def make_debian_initramfs(modules_root: Path, release: str, config: Path, output: Path,
                          scratch: Path, compress: str = "zstd") -> Path:
    """mkinitramfs for ``release`` with the modules under ``modules_root/lib/modules``
    (and the kernel's ``config``, which mkinitramfs reads as /boot/config-<release>)."""
    if shutil.which("mkinitramfs") is None:
        raise RuntimeError("mkinitramfs missing (apt-get install initramfs-tools-core)")
    conf = scratch / "initramfs-tools"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    (conf / "initramfs.conf").write_text(INITRAMFS_CONF.format(compress=compress))
    (conf / "modules").write_text("test_static_keys\n")
    _script(conf / "hooks/kbb-early-cpio", EARLY_HOOK)
    _script(conf / "scripts/init-premount/kbb-lab", PREMOUNT)
    overlays = scratch / "overlays"
    shutil.rmtree(overlays, ignore_errors=True)
    for name in ("usr-lib", "boot"):
        (overlays / name / "upper").mkdir(parents=True)
        (overlays / name / "work").mkdir()
    shutil.copytree(Path(modules_root) / "lib/modules" / release,
                    overlays / "usr-lib/upper/modules" / release,
                    symlinks=True, ignore=shutil.ignore_patterns("build", "source"))
    shutil.copyfile(config, overlays / f"boot/upper/config-{release}")
    mounts = " && ".join(
        f'mount -t overlay overlay -o "lowerdir={target},upperdir=$1/{name}/upper,'
        f'workdir=$1/{name}/work" {target}'
        for name, target in (("usr-lib", "/usr/lib"), ("boot", "/boot")))
    script = f'{mounts} && shift && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(overlays), "mkinitramfs", "-d", str(conf), "-o", str(output), release],
        capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                             "TMPDIR": str(scratch)})
    if proc.returncode != 0:
        raise RuntimeError(f"mkinitramfs failed: {proc.stderr.strip()[-2000:]}")
    return output
