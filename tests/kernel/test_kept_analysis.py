"""The input's analysis kept between rewrites (issue 14: a Kbuild step as fast as
BOLT's): the same vmlinux is not decoded twice, the output does not change, and a
file that is not the vmlinux's own analysis is never used."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from kbuild_bolt.binary import saved
from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite
from kbuild_bolt.x86.decode import FIELDS

pytestmark = pytest.mark.xdist_group("kept-analysis")


def test_second_rewrite_keeps_the_analysis_and_the_output(lab_regular, tmp_path, capsys):
    cache = tmp_path / "cache"
    outputs, said = [], []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = rewrite(lab_regular.vmlinux, out, RewriteOptions(
            reorder_blocks="random", reorder_functions="random", split_functions=True,
            seed=3, cache_dir=str(cache)))
        assert result.verify_summary.startswith("verify: ok"), result.verify_summary
        outputs.append(out.read_bytes())
        said.append("kept from an earlier run" in capsys.readouterr().err)
    assert said == [False, True]
    assert outputs[0] == outputs[1]
    assert len(list(cache.glob("analysis-*.npz"))) == 1


def test_kept_analysis_is_the_analysis(lab_regular, tmp_path):
    image = ElfImage(lab_regular.vmlinux)
    model = BinaryModel(image)
    cfg = build_cfg(model)
    key = saved.analysis_key(image)
    saved.save(tmp_path, key, model.insns, cfg, model.fill_insn)
    kept = saved.load(tmp_path, key)
    for name in FIELDS:
        assert np.array_equal(getattr(kept.insns, name), getattr(model.insns, name)), name
    for name in cfg.__dataclass_fields__:
        assert np.array_equal(getattr(kept.cfg, name), getattr(cfg, name)), name
    assert np.array_equal(kept.fill_insn, model.fill_insn)
    assert 0 < kept.fill_insn.sum() < len(kept.fill_insn)
    # Another vmlinux (one code byte changed, same build-id): another key.
    other = tmp_path / "other"
    shutil.copy(lab_regular.vmlinux, other)
    text = image.section(".text")
    data = bytearray(other.read_bytes())
    data[text.offset + 100] ^= 0xFF
    other.write_bytes(bytes(data))
    assert saved.analysis_key(ElfImage(other)) != key
    # A damaged file is ignored.
    path = next(tmp_path.glob("analysis-*.npz"))
    path.write_bytes(path.read_bytes()[:1000])
    assert saved.load(tmp_path, key) is None


def test_moved_functions_are_not_decoded_again(lab_regular, tmp_path, monkeypatch):
    """verify reads the output with the input's decoding of every function that
    only moved (read again, its targets from the new bytes): the same as decoding.
    (Functions in a random order, their blocks as they were.)"""
    out = tmp_path / "out"
    rewrite(lab_regular.vmlinux, out, RewriteOptions(
        reorder_blocks="none", reorder_functions="random", seed=5, verify=False))
    inp = BinaryModel.open(lab_regular.vmlinux)
    fresh = BinaryModel.open(out)
    from kbuild_bolt.binary import model as model_module

    decoded = []
    real = model_module.decode_all
    monkeypatch.setattr(model_module, "decode_all", lambda image, ranges, jobs: (
        decoded.append(sum(end - start for _, start, end in ranges)),
        real(image, ranges, jobs))[1])
    reused = BinaryModel.open(out, like=inp)
    for name in FIELDS:
        assert np.array_equal(getattr(reused.insns, name), getattr(fresh.insns, name)), name
    code = sum(s.size for s in inp.image.sections if s.is_exec)
    assert decoded[0] < 0.5 * code       # (int3 fill and code between functions)


def test_bytes_under_a_relocation_that_fills_no_field_are_decoded_again(tmp_path):
    """An R_X86_64_NONE (6.1's __warn has one inside a nop) names bytes that are
    not a field: changed there, the code is decoded again, not taken from before."""
    from kbuild_bolt.lab.kernels import lab_kernel

    vmlinux = lab_kernel("6.1-regular").vmlinux
    inp = BinaryModel.open(vmlinux)
    rel = inp.code_relocations
    none = rel.offset[rel.type == 0]
    if not len(none):
        pytest.skip("no R_X86_64_NONE in this kernel's code")
    at = int(inp.insns.addr[inp.insn_containing(none[:1])[0]])
    length = int(inp.insns.length[inp.insn_containing(none[:1])[0]])
    section = inp.image.section_at(at)
    data = bytearray(open(vmlinux, "rb").read())
    offset = section.offset + at - section.addr
    data[offset:offset + length] = b"\x0f\x0b" + b"\x90" * (length - 2)     # ud2, nops
    patched = tmp_path / "patched"
    patched.write_bytes(bytes(data))
    fresh, reused = BinaryModel.open(patched), BinaryModel.open(patched, like=inp)
    for name in FIELDS:
        assert np.array_equal(getattr(reused.insns, name), getattr(fresh.insns, name)), name


def test_a_passed_input_check_is_kept_for_that_very_file(lab_regular, tmp_path, monkeypatch):
    """The input's cross-check (tables, relocations) is not run again on the same
    file; a file with the same analysis key but another byte anywhere (here in
    .comment, which the key does not cover) is checked again."""
    from kbuild_bolt.rewrite import engine

    cache = tmp_path / "cache"
    checks = []
    real = engine.check_all
    monkeypatch.setattr(engine, "check_all", lambda model: (checks.append(1), real(model))[1])
    options = dict(reorder_blocks="random", seed=4, cache_dir=str(cache))
    for run in range(2):
        rewrite(lab_regular.vmlinux, tmp_path / "out", RewriteOptions(**options))
    assert checks == [1]
    assert len(list(cache.glob("analysis-*.checked"))) == 1
    other = tmp_path / "other"
    shutil.copy(lab_regular.vmlinux, other)
    image = ElfImage(lab_regular.vmlinux)
    comment = image.section(".comment")
    raw = bytearray(other.read_bytes())
    raw[comment.offset] ^= 0x20          # ("GCC: ..." -> "gCC: ...")
    other.write_bytes(bytes(raw))
    assert saved.analysis_key(ElfImage(other)) == saved.analysis_key(image)
    rewrite(other, tmp_path / "out2", RewriteOptions(**options))
    assert checks == [1, 1]


def test_int3_fill_kept_as_runs_lays_out_as_one_record_per_byte(lab_regular, tmp_path,
                                                               monkeypatch):
    """Fill between functions is one record per run of up to 255 int3 bytes, not one
    per byte: the layout is the one a record per byte gives, byte for byte. Whole
    functions placed anew (random order, split) take free room up to labels and
    region bounds that lie in such runs, and the output, whose fill runs differ from
    the input's, verifies."""
    from kbuild_bolt.binary import model as binary_model

    outputs = {}
    for record in (1, binary_model.FILL_RECORD):
        monkeypatch.setattr(binary_model, "FILL_RECORD", record)
        out = tmp_path / f"out{record}"
        result = rewrite(lab_regular.vmlinux, out, RewriteOptions(
            reorder_blocks="random", reorder_functions="random", split_functions=True,
            seed=8, verify=record != 1))
        outputs[record] = out.read_bytes()
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert outputs[1] == outputs[binary_model.FILL_RECORD]


@pytest.mark.parametrize("layout", [
    dict(reorder_blocks="random", split_functions=True, seed=6),
    dict(reorder_blocks="random", reorder_functions="random", split_functions=True, seed=7)],
    ids=["blocks-split", "functions"])
def test_new_code_decoded_beside_is_taken_only_where_it_is_the_output(
        lab_regular, tmp_path, monkeypatch, layout):
    """The new code, decoded while the output is made, gives the output's model
    exactly what decoding the output gives, and spares most of that decoding;
    pieces whose bytes, places or bounds are not the output's (flipped bytes,
    shifted, cut, ud2 at their ends, random code) change nothing but the time."""
    from kbuild_bolt.binary import model as model_module
    from kbuild_bolt.binary.model import KnownCode
    from kbuild_bolt.rewrite.context import RewriteContext

    pieces = {}
    real_start = RewriteContext.start_beside

    def start_beside(self, name, fn, *args):
        if name == "new code":
            pieces["args"] = tuple(np.array(a) for a in args)
        return real_start(self, name, fn, *args)

    monkeypatch.setattr(RewriteContext, "start_beside", start_beside)
    out = tmp_path / "out"
    result = rewrite(lab_regular.vmlinux, out, RewriteOptions(**layout))
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    code, start, offset, length = pieces["args"]
    inp = BinaryModel.open(lab_regular.vmlinux)
    fresh = BinaryModel.open(out, like=inp).insns
    decoded = []     # (bytes given to the decoder, per model)
    real = model_module._decode_chunk
    monkeypatch.setattr(model_module, "_decode_chunk", lambda chunk: (
        decoded.append(sum(int(end - start) for _, start, end in chunk)), real(chunk))[1])
    rng = np.random.default_rng(2)
    flipped = code.copy()
    flipped[rng.integers(0, len(code), 300)] ^= 0x5A
    ud2 = code.copy()
    ends = (offset + length)[length > 4]
    ud2[ends - 2], ud2[ends - 1] = 0x0F, 0x0B
    variants = [(code, start, offset, length), (flipped, start, offset, length),
                (code, start + np.uint64(1), offset, length),
                (code, start, offset + 3, np.maximum(length - 3, 0)),
                (code, start, offset, length // 2), (ud2, start, offset, length),
                (rng.integers(0, 256, len(code), dtype=np.uint8), start, offset, length)]
    if "reorder_functions" in layout:     # (the pieces of functions placed anew)
        variants = variants[:2]
    for k, args in enumerate(variants):
        got = BinaryModel.open(out, like=inp, known=KnownCode.decode(*args), jobs=1).insns
        for name in FIELDS:
            if name == "ref":
                assert np.array_equal(got.ref.index, fresh.ref.index), k
                assert np.array_equal(got.ref.values, fresh.ref.values), k
            else:
                assert np.array_equal(getattr(got, name), getattr(fresh, name)), (k, name)
    BinaryModel.open(out, like=inp, jobs=1)
    # (the pieces as written: at most a tenth of what is decoded without them)
    assert len(decoded) == len(variants) + 1
    assert decoded[0] * 10 < decoded[-1], decoded
