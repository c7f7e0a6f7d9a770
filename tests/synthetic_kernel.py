"""A small kernel assembled for tests: every table type over two real functions.

Functions are 64-byte aligned with int3 fill after them, like a vmlinux, so a
rewritten function has room to grow.
"""

from elfkit import assemble

CODE = r"""
    .text
    .globl startup_64
    .type startup_64, @function
startup_64:
.Lseal:  endbr64
.Lfentry: call __fentry__
.Lkey_nop2: .byte 0x66, 0x90
.Lkey_jmp5: .byte 0xe9
    .long .Lkey_jmp5_yes - . - 4
.Llock:  lock incl counter(%rip)
.Lwarn:  ud2
.Lsc:    call __SCT__tp_func_foo
.Lalt:   .byte 0x0f, 0x1f, 0x00
.Lalt_end:
.Lpv:    call *pv_ops+8(%rip)
.Lpv_end:
.Lex:    mov (%rdi), %rax
.Lrtc:   movabs $0x0123456789abcdef, %rax
.Lrtc_end:
.Lret:   jmp __x86_return_thunk
.Lkey_jmp5_yes:
    xor %eax, %eax
.Lkey_nop2_yes:
    mov $1, %eax
    jmp __x86_return_thunk
.Lfixup:
    mov $-14, %eax
    jmp __x86_return_thunk
    .size startup_64, . - startup_64
.Lstartup_end:
    .p2align 6, 0xcc

    .globl second
    .type second, @function
second:
.Lfentry2: call __fentry__
.Lcall:  call startup_64
.Lretpo: call __x86_indirect_thunk_rax
.Lbug:   ud2
    .size second, . - second
.Lsecond_end:
    .p2align 6, 0xcc

    .globl __fentry__, __x86_return_thunk, __x86_indirect_thunk_rax, __SCT__tp_func_foo
    .type __fentry__, @function
__fentry__: ret
    .size __fentry__, 1
    .type __x86_return_thunk, @function
__x86_return_thunk: ret
    int3
    .size __x86_return_thunk, 2
    .type __x86_indirect_thunk_rax, @function
__x86_indirect_thunk_rax: jmp *%rax
    .size __x86_indirect_thunk_rax, . - __x86_indirect_thunk_rax
    .type __SCT__tp_func_foo, @function
__SCT__tp_func_foo: .byte 0xc3, 0xcc, 0xcc, 0xcc, 0xcc
    .size __SCT__tp_func_foo, 5

    .type quirk, @function
quirk: ret
    .size quirk, 1

    .section .altinstr_replacement, "ax"
.Lrepl: .byte 0x0f, 0x01, 0xcb
.Lrepl_end:

    .data
    .globl counter, pv_ops, foo_key
counter: .long 0
pv_ops: .quad 0, 0
# (enabled, as STATIC_KEY_INIT_TRUE: the jmp site with branch bit 0 and the nop
# site with branch bit 1 are the forms that state selects)
foo_key: .long 1, 0
sc_key: .quad 0

    .section __ksymtab_strings, "a"
.Lname: .asciz "startup_64"
.Lns:   .asciz ""
"""

TABLES = {
    "jump": r"""
    .section __jump_table, "aw"
    .balign 8
    .long .Lkey_nop2 - ., .Lkey_nop2_yes - .
    .quad foo_key + 1 - .
    .long .Lkey_jmp5 - ., .Lkey_jmp5_yes - .
    .quad foo_key - .
""",
    "static_call": r"""
    .section .static_call_sites, "aw"
    .long .Lsc - ., sc_key - .
""",
    "smp_locks": r"""
    .section .smp_locks, "a"
    .long .Llock - .
""",
    "bug": r"""
    .section __bug_table, "a"
    .long .Lwarn - .
    .short 1
    .short 1
    .long .Lbug - .
    .short 0
    .short 0
""",
    "alt": r"""
    .section .altinstructions, "a"
    .long .Lalt - ., .Lrepl - .
    .long 0x10010
    .byte .Lalt_end - .Lalt, .Lrepl_end - .Lrepl
""",
    "ex": r"""
    .section __ex_table, "a"
    .long .Lex - ., .Lfixup - ., 3
""",
    "orc": r"""
    .section .orc_header, "a"
    .fill 20, 1, 0x5a
    .section .orc_unwind_ip, "a"
    .long startup_64 - ., .Lkey_jmp5_yes - ., .Lfixup - .
    .long .Lstartup_end - ., .Lstartup_end + 8 - ., .Lstartup_end + 16 - .
    .long .Lstartup_end + 24 - ., .Lstartup_end + 32 - .
    .long second - ., .Lbug - ., .Lsecond_end - ., .Lsecond_end + 8 - .
    .long .Lsecond_end + 16 - ., .Lsecond_end + 24 - .
    .section .orc_unwind, "a"
    .short 8, 0, 0x205, 16, 0, 0x205, 8, 0, 0x205
    .short 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
    .short 8, 0, 0x205, 16, 0, 0x205, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
""",
    "sites": r"""
    .section .retpoline_sites, "a"
    .long .Lretpo - .
    .section .return_sites, "a"
    .long .Lret - .
    .section .call_sites, "a"
    .long .Lcall - .
    .section .ibt_endbr_seal, "a"
    .long .Lseal - .
""",
    "mcount": r"""
    .section __mcount_loc, "a"
    .quad .Lfentry, 0, .Lfentry2
""",
    "pci": r"""
    .section .pci_fixup_header, "a"
    .short 0x8086, 0xffff
    .long 0, 0
    .long quirk - .
""",
    "ksym": r"""
    .section __ksymtab, "a"
    .long startup_64 - ., .Lname - ., .Lns - .
    .section __kcrctab, "a"
    .long 0x12345678
""",
    "runtime": r"""
    .section runtime_ptr_USER_PTR_MAX, "a"
    .long .Lrtc_end - 8 - .
""",
}

PARAVIRT = r"""
    .section .parainstructions, "a"
    .balign 8
    .quad .Lpv
    .byte 3, .Lpv_end - .Lpv
    .balign 8
"""

EXPECTED_612 = {
    "__jump_table": 2, ".static_call_sites": 1, ".smp_locks": 1, "__bug_table": 2,
    ".altinstructions": 1, "__ex_table": 1, ".orc_unwind_ip": 14, ".orc_unwind": 14,
    ".orc_header": 1, ".retpoline_sites": 1, ".return_sites": 1, ".call_sites": 1,
    ".ibt_endbr_seal": 1, "__mcount_loc": 2, ".pci_fixup": 1, "__ksymtab": 1, "__kcrctab": 1,
    "runtime_ptr_USER_PTR_MAX": 1,
}


def build(tmp_path, release="6.12.0-elfkit", replace=None, extra=""):
    tables = dict(TABLES)
    tables.update(replace or {})
    source = CODE + "".join(tables.values()) + extra
    return assemble(tmp_path, source, release=release)


