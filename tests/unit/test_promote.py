"""Indirect-call promotion on the synthetic kernel: which calls, the code the
direct path gets, its fallback, its relocations, and every table kept true."""

import numpy as np
import pytest
from iced_x86 import Decoder

from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.elf.image import R_X86_64_32S, R_X86_64_PLT32, type_and_symbol
from kbuild_bolt.profile.model import Profile
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite
from kbuild_bolt.x86 import encode as enc
from synthetic_kernel import build

DISPATCH = r"""
    .text
    .p2align 6, 0xcc
    .globl dispatch
    .type dispatch, @function
dispatch:
.Ld_reg:  call *%rax
.Ld_mem:  call *0x38(%rbx)
.Ld_r11:  call *%r11
    test %eax, %eax
    jne .Ld_join
.Ld_end:  call *(%r12)
.Ld_join: call *handler(%rip)
.Ld_tab:  call *handler(%rbx)
    test %ecx, %ecx
    jne .Ld_thunk
    nop
.Ld_thunk: call __x86_indirect_thunk_rax
    .pushsection .retpoline_sites, "a"
    .long .Ld_thunk - .
    .popsection
    xor %eax, %eax
    ret
    .size dispatch, . - dispatch
    .fill 128, 1, 0xcc
    .p2align 6, 0xcc
    .globl target_a
    .type target_a, @function
target_a: mov $1, %eax
    ret
    .size target_a, . - target_a
    .p2align 6, 0xcc
    .globl target_b
    .type target_b, @function
target_b: mov $2, %eax
    ret
    .size target_b, . - target_b
    .p2align 6, 0xcc
    .section .rodata
handler: .quad target_a
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("promote"), extra=DISPATCH)


def decode(model, addr, n=1):
    size = min(15 * n, model.image.section_at(addr).end - addr)
    return list(Decoder(64, model.image.read(addr, size), ip=addr))[:n]


def label(model, name):
    return int(model.image.symbols.value[model.image.symbols.names.index(name)])


def promoted_paths(model):
    """Every `cmp $imm32, X; jne F; call T` in the code: (cmp address, imm, call target,
    fallback address, address after the call)."""
    out = []
    for s in model.image.sections:
        if not (s.is_alloc and s.is_exec and s.size):
            continue
        insns = list(Decoder(64, model.image.read(s.addr, s.size), ip=s.addr))
        for a, b, c in zip(insns, insns[1:], insns[2:]):
            raw = model.image.read(a.ip, a.len)
            if raw[1:2] == b"\x81" and raw[0] & 0xF8 == 0x48 and (raw[2] >> 3) & 7 == 7 \
                    and model.image.read(b.ip, 1) in (b"\x75", b"\x0f") \
                    and model.image.read(c.ip, 1) == b"\xe8":
                imm = int.from_bytes(raw[-4:], "little", signed=True) & (2**64 - 1)
                out.append((a.ip, imm, c.near_branch_target, b.near_branch_target,
                            c.next_ip))
    return out


def relocations_at(model, offsets):
    found = {}
    for rela in model.image.rela_sections:
        r = model.image.relocations(rela)
        hit = np.isin(r["offset"], np.array(offsets, np.uint64))
        for rec in r[hit]:
            rtype, sym = type_and_symbol(np.array([rec["info"]], np.uint64))
            found[int(rec["offset"])] = (int(rtype[0]), int(sym[0]), int(rec["addend"]))
    return found


def test_cmp_templates_read_what_the_call_reads():
    assert enc.cmp_like_call(b"\xff\xd0") == b"\x48\x81\xf8" + bytes(4)       # %rax
    assert enc.cmp_like_call(b"\x41\xff\xd3") == b"\x49\x81\xfb" + bytes(4)   # %r11
    assert enc.cmp_like_call(b"\xff\x53\x38") == b"\x48\x81\x7b\x38" + bytes(4)
    assert enc.cmp_like_call(b"\x41\xff\x14\x24") == b"\x49\x81\x3c\x24" + bytes(4)
    assert enc.cmp_like_call(b"\xff\x15\0\0\0\0") is None                     # RIP-relative
    assert enc.cmp_like_call(b"\xff\x14\x25\0\0\0\0") is None                 # absolute
    assert enc.cmp_like_call(b"\x65\xff\x10") is None                         # %gs:
    assert enc.thunk_register("__x86_indirect_thunk_r11") == 11
    assert enc.cmp_register(11) == b"\x49\x81\xfb" + bytes(4)


@pytest.mark.parametrize("whole", [False, True], ids=["in-place", "functions-moved"])
def test_every_site_torture_keeps_every_table_and_relocation_true(kernel, tmp_path, whole):
    out = tmp_path / "every"
    moves = dict(reorder_functions="random", split_functions=True) if whole else {}
    result = rewrite(kernel, out, RewriteOptions(reorder_blocks="reverse", progress=False,
                                                 icp_every_site=True, seed=3, **moves))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    # dispatch: %rax (its function's entry), 0x38(%rbx), %r11, (%r12) (which ends its
    # block), handler(%rbx) (its displacement relocated), a thunk call a jump lands on
    # (its address names the cmp, its .retpoline_sites entry the fallback); second:
    # the thunk call. Not the RIP-relative one.
    # (with functions moving, a function that must stay keeps its calls)
    assert result.calls_promoted[0] == (6 if whole else 7)
    assert result.icp_skipped["operand depends on its place"] >= 1   # (and the pv call)
    before, after = BinaryModel.open(kernel, jobs=1), BinaryModel.open(out, jobs=1)
    paths = promoted_paths(after)
    assert len(paths) == result.calls_promoted[0]
    retpoline = after.tables[".retpoline_sites"].targets("site").tolist()
    disp_relocated = 0
    for cmp_at, imm, target, fallback, after_call in paths:
        assert imm == target          # compares with what it calls directly
        assert target in after.functions.start.tolist()     # a function's entry
        # the fallback: the original call, byte for byte, then a jump back
        call, back = decode(after, fallback, 2)
        assert back.near_branch_target == after_call
        assert call.is_call_near_indirect or call.is_call_near
        raw = after.image.read(fallback, call.len)
        if raw[0] == 0xE8:            # a retpoline call: its table entry followed it
            assert fallback in retpoline
            assert call.near_branch_target == label(after, "__x86_indirect_thunk_rax")
        # R_X86_64_32S at the immediate (KASLR), PLT32 at the direct call
        cmp_len = decode(after, cmp_at)[0].len
        found = relocations_at(after, [cmp_at + cmp_len - 4, after_call - 4, cmp_at + 3])
        assert found[cmp_at + cmp_len - 4][0] == R_X86_64_32S
        assert found[after_call - 4][0] == R_X86_64_PLT32
        if after.image.read(cmp_at, 3) == b"\x48\x81\xbb":    # cmpq $t, handler(%rbx)
            disp_relocated += 1
            rtype, sym, addend = found[cmp_at + 3]
            assert rtype == R_X86_64_32S
            assert int(after.image.symbols.value[sym]) + addend == label(after, "handler")
    # every site promoted is one the input called indirectly
    assert len({p[3] for p in paths}) == len(paths)
    assert disp_relocated == 1
    # the entry of dispatch and the jump to the thunk call both land on a cmp
    cmps = {p[0] for p in paths}
    assert label(after, "dispatch") in cmps
    entry = label(after, "dispatch")
    code = [i for r in (entry,) for i in decode(after, r, 80)]
    for fb in {p[3] for p in paths}:    # (the fallbacks, which may lie apart)
        code += decode(after, fb, 2)
    assert any(i.near_branch_target in cmps - {entry} and not i.is_call_near for i in code)
    del before


def test_profile_promotes_only_a_dominant_target(kernel, tmp_path):
    model = BinaryModel.open(kernel, jobs=1)
    start = label(model, "dispatch")
    a, b = label(model, "target_a"), label(model, "target_b")
    reg, mem, r11 = (label(model, n) for n in (".Ld_reg", ".Ld_mem", ".Ld_r11")) \
        if ".Ld_reg" in model.image.symbols.names else (start, start + 2, start + 5)
    profile = Profile(
        range_start=np.array([start], np.uint64), range_last=np.array([r11], np.uint64),
        range_count=np.array([1000], np.int64),
        # %rax: 90% target_a (promoted); 0x38(%rbx): 60% at most (not); %r11: 150 calls
        src=np.array([reg, reg, mem, mem, r11], np.uint64),
        dst=np.array([a, b, a, b, b], np.uint64),
        count=np.array([900, 100, 400, 600, 150], np.int64), source="test")
    out = tmp_path / "profiled"
    result = rewrite(kernel, out, RewriteOptions(profile=profile, progress=False,
                                                 dyno_stats=True, icp_min_calls=200, icp_share=70))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.calls_promoted == (1, 1000, 900)
    assert result.icp_skipped["no dominant target"] == 2
    after = BinaryModel.open(out, jobs=1)
    (cmp_at, imm, target, fallback, after_call), = promoted_paths(after)
    assert target == imm == a
    before, predicted = result.dyno
    assert before["INDIRECT_CALLS"] - predicted["INDIRECT_CALLS"] == 900
    assert predicted["ALL_TAKEN"] - before["ALL_TAKEN"] <= 2 * 100 + before["ALL_TAKEN"]
    # no promotion asked for: nothing promoted
    none = rewrite(kernel, tmp_path / "none", RewriteOptions(
        profile=profile, progress=False, indirect_call_promotion="none"))
    assert none.calls_promoted[0] == 0
    assert not promoted_paths(BinaryModel.open(tmp_path / "none", jobs=1))
