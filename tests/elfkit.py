"""Small ELF files assembled for tests, in the style of BOLT's linux-*.s tests.

The default linker script lays a vmlinux-like image out at the kernel's
address (0xffffffff81000000): code, read-only data with the kernel tables
bounded by __start_*/__stop_* symbols, data and init data, linked with
--emit-relocs like a real vmlinux.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

KERNEL_BASE = 0xFFFFFFFF81000000

LINKER_SCRIPT = """
ENTRY(startup_64)
SECTIONS
{
  . = 0xffffffff81000000;
  _text = .;
  .text : { *(.text .text.*) }
  _etext = .;
  . = ALIGN(4096);
  .rodata : {
    *(.rodata .rodata.*)
    . = ALIGN(8);
    __start___jump_table = .; KEEP(*(__jump_table)) __stop___jump_table = .;
    . = ALIGN(8);
    __start_static_call_sites = .; KEEP(*(.static_call_sites)) __stop_static_call_sites = .;
    __start_static_call_tramp_key = .; KEEP(*(.static_call_tramp_key)) __stop_static_call_tramp_key = .;
  }
  .pci_fixup : {
    __start_pci_fixups_early = .; KEEP(*(.pci_fixup_early)) __end_pci_fixups_early = .;
    __start_pci_fixups_header = .; KEEP(*(.pci_fixup_header)) __end_pci_fixups_header = .;
    __start_pci_fixups_suspend_late = .; KEEP(*(.pci_fixup_suspend_late)) __end_pci_fixups_suspend_late = .;
  }
  __ksymtab : { __start___ksymtab = .; KEEP(*(__ksymtab)) __stop___ksymtab = .; }
  __ksymtab_gpl : { __start___ksymtab_gpl = .; KEEP(*(__ksymtab_gpl)) __stop___ksymtab_gpl = .; }
  __kcrctab : { __start___kcrctab = .; KEEP(*(__kcrctab)) __stop___kcrctab = .; }
  __kcrctab_gpl : { __start___kcrctab_gpl = .; KEEP(*(__kcrctab_gpl)) __stop___kcrctab_gpl = .; }
  __ksymtab_strings : { *(__ksymtab_strings) }
  . = ALIGN(16);
  __ex_table : { __start___ex_table = .; KEEP(*(__ex_table)) __stop___ex_table = .; }
  . = ALIGN(8);
  __bug_table : { __start___bug_table = .; KEEP(*(__bug_table)) __stop___bug_table = .; }
  . = ALIGN(4);
  .orc_header : { __start_orc_header = .; KEEP(*(.orc_header)) __stop_orc_header = .; }
  .orc_unwind_ip : { __start_orc_unwind_ip = .; KEEP(*(.orc_unwind_ip)) __stop_orc_unwind_ip = .; }
  . = ALIGN(2);
  .orc_unwind : { __start_orc_unwind = .; KEEP(*(.orc_unwind)) __stop_orc_unwind = .; }
  . = ALIGN(4096);
  .data : { *(.data .data.*) }
  . = ALIGN(4096);
  .init.text : { *(.init.text) }
  .altinstr_aux : { *(.altinstr_aux) }
  .init.data : {
    *(.init.data)
    . = ALIGN(8);
    __start_mcount_loc = .; KEEP(*(__mcount_loc)) __stop_mcount_loc = .;
  }
  . = ALIGN(8);
  .parainstructions : { __parainstructions = .; KEEP(*(.parainstructions)) __parainstructions_end = .; }
  .retpoline_sites : { __retpoline_sites = .; KEEP(*(.retpoline_sites)) __retpoline_sites_end = .; }
  .return_sites : { __return_sites = .; KEEP(*(.return_sites)) __return_sites_end = .; }
  .call_sites : { __call_sites = .; KEEP(*(.call_sites)) __call_sites_end = .; }
  .ibt_endbr_seal : { __ibt_endbr_seal = .; KEEP(*(.ibt_endbr_seal)) __ibt_endbr_seal_end = .; }
  . = ALIGN(8);
  .altinstructions : { __alt_instructions = .; KEEP(*(.altinstructions)) __alt_instructions_end = .; }
  .altinstr_replacement : { *(.altinstr_replacement) }
  runtime_ptr_USER_PTR_MAX : { __start_runtime_ptr_USER_PTR_MAX = .; KEEP(*(runtime_ptr_USER_PTR_MAX)) __stop_runtime_ptr_USER_PTR_MAX = .; }
  . = ALIGN(4096);
  .smp_locks : { __smp_locks = .; KEEP(*(.smp_locks)) . = ALIGN(4096); __smp_locks_end = .; }
  .bss : { *(.bss) }
  _end = .;
  /DISCARD/ : { *(.note.gnu.property) }
}
"""

BANNER = """
    .section .rodata
    .globl linux_banner
    .type linux_banner, @object
linux_banner:
    .asciz "Linux version {release} (test@elfkit) (gcc) #1 SMP\\n"
    .size linux_banner, . - linux_banner
"""


def tools_available() -> bool:
    return shutil.which("as") is not None and shutil.which("ld") is not None


def assemble(tmp_path: Path, source: str, *, name: str = "vmlinux", release: str = "6.12.0-test",
             script: str = LINKER_SCRIPT, banner: bool = True, as_args=("--64",),
             ld_args=("-m", "elf_x86_64", "--emit-relocs", "-z", "noexecstack")) -> Path:
    """Assemble ``source`` and link it like a vmlinux; returns the ELF path."""
    tmp_path = Path(tmp_path)
    asm = tmp_path / f"{name}.s"
    text = textwrap.dedent(source)
    if banner:
        text += BANNER.format(release=release)
    asm.write_text(text)
    obj = tmp_path / f"{name}.o"
    lds = tmp_path / f"{name}.lds"
    lds.write_text(script)
    out = tmp_path / name
    subprocess.run(["as", *as_args, "-o", str(obj), str(asm)], check=True, capture_output=True,
                   text=True)
    subprocess.run(["ld", *ld_args, "-T", str(lds), "-o", str(out), str(obj)], check=True,
                   capture_output=True, text=True)
    return out
