"""The kernel patches that hook kbuild-bolt into Kbuild, and installing them.

A patch is small and the same for 6.12 and 6.1 (both have ARCH_POSTLINK in
scripts/Makefile.vmlinux):

- ``scripts/Kconfig.bolt`` (kconfig/Kconfig.bolt), sourced from arch/x86/Kconfig;
- ``scripts/Makefile.bolt`` (Makefile.bolt), which scripts/Makefile.vmlinux
  makes the post-link pass when CONFIG_BOLT is set; the profile becomes a
  prerequisite of vmlinux and the BOLT options part of its link command, so a
  changed profile or option relinks (and re-optimizes) and nothing else does;
- scripts/Makefile.modfinal and scripts/Makefile.modinst: each module the
  profile saw is laid out again after its link (a build without debug info)
  or between its strip and its signature when installed (with debug info);

The committed patches under patches/ are generated here (``python -m
kbuild_bolt.kbuild.hooks --write``) and tests check they stay in sync.
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from kbuild_bolt.errors import KbbError

ROOT = Path(__file__).resolve().parents[2]
KCONFIG = ROOT / "kconfig" / "Kconfig.bolt"
MAKEFILE = ROOT / "Makefile.bolt"
PATCH_NAME = "0001-kbuild-bolt-post-link-optimization-hooks.patch"
SUPPORTED = ("6.12", "6.1")

VMLINUX_ANCHOR = "\t$(if $(ARCH_POSTLINK), $(MAKE) -f $(ARCH_POSTLINK) $@, true)\n"
VMLINUX_HOOK = """
# kbuild-bolt: lay vmlinux out again before the architecture's post-link pass
# (scripts/Makefile.bolt). A changed profile or BOLT option relinks vmlinux;
# a missing profile stops the build before the link.
ifdef CONFIG_BOLT
ARCH_POSTLINK := $(srctree)/scripts/Makefile.bolt
BOLT_PROFILE ?= $(patsubst "%",%,$(CONFIG_BOLT_PROFILE))
ifeq ($(BOLT_PROFILE)$(BOLT_LAYOUT)$(CONFIG_BOLT_LAYOUT_NONE)$(CONFIG_BOLT_LAYOUT_RANDOM)$(CONFIG_BOLT_LAYOUT_REVERSE),)
$(error CONFIG_BOLT: no profile (set CONFIG_BOLT_PROFILE or BOLT_PROFILE=..., or choose another BOLT layout))
endif
ifeq ($(BOLT_PROFILE)$(BOLT_FUNCTIONS)$(CONFIG_BOLT_FUNCTIONS_NONE)$(CONFIG_BOLT_FUNCTIONS_RANDOM)$(CONFIG_BOLT_FUNCTIONS_REVERSE),)
$(error CONFIG_BOLT: no profile for the function layout (set BOLT_PROFILE, or choose another BOLT function layout))
endif
ifneq ($(BOLT_PROFILE),)
ifeq ($(wildcard $(BOLT_PROFILE)),)
$(error BOLT_PROFILE=$(BOLT_PROFILE): no such file (relative paths start in $(objtree)))
endif
endif
cmd_link_vmlinux += ; : bolt $(BOLT_PROFILE) $(BOLT_LAYOUT) $(BOLT_FLAGS) $(BOLT_VERIFY) \\
	$(CONFIG_BOLT_LAYOUT_NONE)$(CONFIG_BOLT_LAYOUT_RANDOM)$(CONFIG_BOLT_LAYOUT_REVERSE) \\
	$(BOLT_FUNCTIONS) $(BOLT_SPLIT) $(CONFIG_BOLT_FUNCTIONS_HFSORT)$(CONFIG_BOLT_FUNCTIONS_NONE) \\
	$(CONFIG_BOLT_FUNCTIONS_RANDOM)$(CONFIG_BOLT_FUNCTIONS_REVERSE)$(CONFIG_BOLT_SPLIT_FUNCTIONS) \\
	$(CONFIG_BOLT_VERIFY)
vmlinux: $(BOLT_PROFILE)
endif
"""
KCONFIG_HOOK = '\nsource "scripts/Kconfig.bolt"\n'

# Modules (6.12 and 6.1 alike): without debug info, scripts/Makefile.modfinal
# lays each one out as part of its link command; with debug info (which the
# build keeps for the debug packages), scripts/Makefile.modinst does, between
# the strip and the signature of each installed module.
MODFINAL_ANCHOR = "# Re-generate module BTFs if either module's .ko or vmlinux changed\n"
MODFINAL_HOOK = """# kbuild-bolt: a build without debug info lays each module the profile saw out
# again right after its link (scripts/Makefile.bolt); with debug info that is
# done by modules_install, once INSTALL_MOD_STRIP stripped the module. A
# changed profile or BOLT option links those modules again.
ifeq ($(CONFIG_BOLT),y)
ifndef CONFIG_DEBUG_INFO
bolt-modules-pass := y
include $(srctree)/scripts/Makefile.bolt
cmd_ld_ko_o += $(bolt-after-link)
$(call bolt-laid-out,$(filter %.ko,$(modules) $(modules:%.o=%.ko))): $(BOLT_PROFILE)
endif
endif

"""
MODINST_ANCHOR = "#\n# Signing\n"
MODINST_HOOK = """#
# kbuild-bolt: a build with debug info lays each installed module the profile
# saw out again, once stripped and before it is signed (without debug info,
# Makefile.modfinal did it at the link)
#
ifeq ($(CONFIG_BOLT)$(CONFIG_DEBUG_INFO)$(sign-only)$(modules_sign_only),yy)
bolt-modules-pass := y
include $(srctree)/scripts/Makefile.bolt
else
quiet_cmd_bolt_module :=
      cmd_bolt_module := :
endif

"""
MODINST_STEPS = ("\t$(call cmd,strip)\n\t$(call cmd,sign)\n",
                 "\t$(call cmd,strip)\n\t$(call cmd,bolt_module)\n\t$(call cmd,sign)\n")

# scripts/kallsyms.c: --reserve=N leaves zero fill after each array for N more
# entries (names BOLT_NAME_BYTES each), so kbuild-bolt can name the cold parts
# it splits off (name.cold) after the link. link-vmlinux.sh passes
# CONFIG_BOLT_KALLSYMS_RESERVE.
KALLSYMS_GLOBALS = """static int absolute_percpu;

/*
 * kbuild-bolt: room for names added after the link (CONFIG_BOLT_KALLSYMS_RESERVE):
 * zero fill after each array for this many more entries, names 20 bytes each.
 */
static unsigned int bolt_reserve;
#define BOLT_NAME_BYTES 20

static void bolt_fill(unsigned int bytes)
{
	if (bytes)
		printf("\\t.fill\\t%u, 1, 0\\n\\n", bytes);
}
"""
KALLSYMS_OPTION = ("\t\t\t{},\n\t\t};",
                   "\t\t\t{\"reserve\",         required_argument, NULL, 'r'},\n\t\t\t{},\n\t\t};")
KALLSYMS_PARSE = ("\t\tif (c != 0)\n\t\t\tusage();",
                  "\t\tif (c == 'r') {\n\t\t\tbolt_reserve = strtoul(optarg, NULL, 0);\n"
                  "\t\t\tcontinue;\n\t\t}\n\t\tif (c != 0)\n\t\t\tusage();")
NAMES_FILL = "\tbolt_fill(bolt_reserve * BOLT_NAME_BYTES);\n\n"
# Where each array ends, per series: (anchor, text to insert before it).
KALLSYMS_FILLS = {
    "6.12": [
        ('\toutput_label("kallsyms_markers");', NAMES_FILL),
        ('\toutput_label("kallsyms_token_table");',
         "\tbolt_fill(4 * ((table_cnt + bolt_reserve + 255) / 256 - markers_cnt));\n\n"),
        ('\toutput_label("kallsyms_relative_base");', "\tbolt_fill(bolt_reserve * 4);\n\n"),
        ("\t\t       table[i]->sym);\n\tprintf(\"\\n\");\n}",
         None),   # (the last array: fill after it)
    ],
    "6.1": [
        ('\tif (base_relative) {\n\t\toutput_label("kallsyms_relative_base");',
         "\tbolt_fill(bolt_reserve * (base_relative ? 4 : sizeof(long)));\n\n"),
        ('\toutput_label("kallsyms_markers");', NAMES_FILL),
        ('\tsort_symbols_by_name();\n\toutput_label("kallsyms_seqs_of_names");',
         "\tbolt_fill(4 * (((table_cnt + bolt_reserve + 255) >> 8) - ((table_cnt + 255) >> 8)));"
         "\n\n"),
        ('\toutput_label("kallsyms_token_table");', "\tbolt_fill(bolt_reserve * 3);\n\n"),
    ],
}
LINK_RESERVE = """\t# kbuild-bolt: room for the names it adds (CONFIG_BOLT_KALLSYMS_RESERVE)
\tlocal bolt_reserve
\tbolt_reserve=$(sed -n 's/^CONFIG_BOLT_KALLSYMS_RESERVE=//p' include/config/auto.conf)
\tif [ -z "${bolt_reserve}" ] && [ "${CONFIG_BOLT}" = y ]; then
\t\tbolt_reserve=16384	# make CONFIG_BOLT=y: Kconfig's default
\tfi
\tif [ -n "${bolt_reserve}" ] && [ "${bolt_reserve}" != 0 ]; then
\t\tkallsymopt="${kallsymopt} --reserve=${bolt_reserve}"
\tfi

"""
LINK_ANCHORS = {"6.12": '\tinfo KSYMS "${2}.S"\n', "6.1": "\tinfo KSYMS ${2}\n"}

HEADER = """From: kbuild-bolt <kbuild-bolt@localhost>
Subject: [PATCH] kbuild: post-link optimization with kbuild-bolt

Add CONFIG_BOLT (scripts/Kconfig.bolt) and run kbuild-bolt on vmlinux as the
post-link pass (scripts/Makefile.bolt) before the architecture's own one, so
vmlinux.relocs, bzImage and packages are built from the optimized vmlinux.
scripts/kallsyms reserves room (CONFIG_BOLT_KALLSYMS_RESERVE) for the names of
the cold parts kbuild-bolt splits off functions. Each module the profile saw
is laid out after its link (without debug info) or as modules_install
installs it, after stripping it and before signing it (with debug info).
Generated by kbuild-bolt for Linux {series}.

"""


def _sources() -> tuple[str, str]:
    if not KCONFIG.exists() or not MAKEFILE.exists():
        raise KbbError(f"kbuild-bolt's {KCONFIG.name}/{MAKEFILE.name} not found under {ROOT} "
                       "(install kbuild-bolt from its source tree)")
    return KCONFIG.read_text(), MAKEFILE.read_text()


def _diff(path: str, old: str | None, new: str) -> str:
    a = old.splitlines(keepends=True) if old is not None else []
    b = new.splitlines(keepends=True)
    lines = list(difflib.unified_diff(a, b, "/dev/null" if old is None else f"a/{path}",
                                      f"b/{path}", n=3))
    return "".join(lines)


def patch_text(tree: Path, series: str) -> str:
    """The patch for the (pristine) kernel tree ``tree``."""
    kconfig, makefile = _sources()
    vmlinux = (tree / "scripts/Makefile.vmlinux").read_text()
    if VMLINUX_ANCHOR not in vmlinux:
        raise KbbError(f"{tree}: scripts/Makefile.vmlinux has no ARCH_POSTLINK pass to hook into")
    new_vmlinux = vmlinux.replace(VMLINUX_ANCHOR, VMLINUX_ANCHOR + VMLINUX_HOOK, 1)
    arch = (tree / "arch/x86/Kconfig").read_text()
    new_arch = arch + KCONFIG_HOOK
    kallsyms = (tree / "scripts/kallsyms.c").read_text()
    link = (tree / "scripts/link-vmlinux.sh").read_text()
    modfinal = (tree / "scripts/Makefile.modfinal").read_text()
    new_modfinal = _replace_once(modfinal, MODFINAL_ANCHOR, MODFINAL_HOOK + MODFINAL_ANCHOR,
                                 "scripts/Makefile.modfinal")
    modinst = (tree / "scripts/Makefile.modinst").read_text()
    new_modinst = _replace_once(modinst, MODINST_ANCHOR, MODINST_HOOK + MODINST_ANCHOR,
                                "scripts/Makefile.modinst")
    new_modinst = _replace_once(new_modinst, *MODINST_STEPS, "scripts/Makefile.modinst")
    return (HEADER.format(series=series)
            + _diff("arch/x86/Kconfig", arch, new_arch)
            + _diff("scripts/Kconfig.bolt", None, kconfig)
            + _diff("scripts/Makefile.bolt", None, makefile)
            + _diff("scripts/Makefile.modfinal", modfinal, new_modfinal)
            + _diff("scripts/Makefile.modinst", modinst, new_modinst)
            + _diff("scripts/Makefile.vmlinux", vmlinux, new_vmlinux)
            + _diff("scripts/kallsyms.c", kallsyms, _kallsyms_reserve(kallsyms, series))
            + _diff("scripts/link-vmlinux.sh", link, _link_reserve(link, series)))


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        raise KbbError(f"{what}: cannot find where the kbuild-bolt hook goes")
    return text.replace(old, new)


def _kallsyms_reserve(text: str, series: str) -> str:
    text = _replace_once(text, "static int absolute_percpu;\n", KALLSYMS_GLOBALS,
                         "scripts/kallsyms.c")
    text = _replace_once(text, *KALLSYMS_OPTION, "scripts/kallsyms.c")
    text = _replace_once(text, *KALLSYMS_PARSE, "scripts/kallsyms.c")
    for anchor, fill in KALLSYMS_FILLS[series]:
        if fill is None:   # after the last array, at the end of write_src()
            end = anchor[:-1] + "\tbolt_fill(bolt_reserve * 3);\n}"
            text = _replace_once(text, anchor, end, "scripts/kallsyms.c")
        else:
            text = _replace_once(text, anchor, fill + anchor, "scripts/kallsyms.c")
    return text


def _link_reserve(text: str, series: str) -> str:
    anchor = LINK_ANCHORS[series]
    return _replace_once(text, anchor, LINK_RESERVE + anchor, "scripts/link-vmlinux.sh")


def committed_patch(series: str) -> Path:
    return ROOT / "patches" / f"linux-{series}" / PATCH_NAME


def tree_series(tree: Path) -> str:
    """``major.minor`` of a kernel source tree, from its top Makefile."""
    makefile = tree / "Makefile"
    if not makefile.exists():
        raise KbbError(f"{tree}: not a kernel source tree (no Makefile)")
    text = makefile.read_text(errors="replace")
    version = re.search(r"^VERSION = (\d+)", text, re.M)
    patchlevel = re.search(r"^PATCHLEVEL = (\d+)", text, re.M)
    if not version or not patchlevel:
        raise KbbError(f"{tree}: not a kernel source tree (no VERSION/PATCHLEVEL)")
    return f"{version.group(1)}.{patchlevel.group(1)}"


def hooks_installed(tree: Path) -> bool:
    mk = tree / "scripts/Makefile.bolt"
    return mk.exists() and "scripts/Makefile.bolt" in (tree / "scripts/Makefile.vmlinux").read_text()


def install_hooks(tree, quiet: bool = False) -> str:
    """Apply the patch for this tree's version; returns what happened."""
    tree = Path(tree)
    series = tree_series(tree)
    if series not in SUPPORTED:
        raise KbbError(f"{tree}: Linux {series} is not supported (kbuild-bolt has hooks for "
                       f"{', '.join(SUPPORTED)}; use the no-patch mode: make ARCH_POSTLINK=...)")
    patch = committed_patch(series)
    if not patch.exists():
        raise KbbError(f"{patch} missing from the kbuild-bolt tree")
    if hooks_installed(tree):
        _, makefile = _sources()
        if (tree / "scripts/Makefile.bolt").read_text() == makefile:
            return f"kbuild-bolt hooks already in {tree} (Linux {series})"
        raise KbbError(f"{tree}: an older kbuild-bolt hook is installed; revert it first "
                       f"(patch -R -p1 < old patch)")
    if shutil.which("patch") is None:
        raise KbbError("patch not found (apt-get install patch)")
    check = subprocess.run(["patch", "-p1", "--dry-run", "--forward", "-s", "-i", str(patch)],
                           cwd=tree, capture_output=True, text=True)
    if check.returncode != 0:
        detail = (check.stdout + check.stderr).strip().splitlines()
        raise KbbError(f"{tree}: the Linux {series} patch does not apply cleanly: "
                       f"{detail[0] if detail else 'patch failed'}")
    subprocess.run(["patch", "-p1", "--forward", "-s", "-i", str(patch)], cwd=tree, check=True)
    return f"kbuild-bolt hooks installed in {tree} (Linux {series})"


def write_patches(trees: dict[str, Path]) -> list[Path]:
    """Regenerate the committed patches from pristine trees (series -> tree)."""
    written = []
    for series, tree in trees.items():
        out = committed_patch(series)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(patch_text(tree, series))
        written.append(out)
    return written


if __name__ == "__main__":
    # python -m kbuild_bolt.kbuild.hooks --write TREE-6.12 TREE-6.1 (pristine trees)
    if len(sys.argv) != 4 or sys.argv[1] != "--write":
        print("usage: python -m kbuild_bolt.kbuild.hooks --write TREE-6.12 TREE-6.1",
              file=sys.stderr)
        sys.exit(2)
    for path in write_patches({"6.12": Path(sys.argv[2]), "6.1": Path(sys.argv[3])}):
        print(path)
