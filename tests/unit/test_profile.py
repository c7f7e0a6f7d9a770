"""Profiles without a kernel run: file format, perf and .fdata readers, stale
matching, ext-TSP and dyno-stats on the small assembled kernel."""

from pathlib import Path

import numpy as np
import pytest

from elfkit import tools_available
from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.errors import KbbError
from kbuild_bolt.layout.exttsp import edge_score, ext_tsp_order, _Layout
from kbuild_bolt.profile import fdata, perf
from kbuild_bolt.profile.attach import attach, function_edges
from kbuild_bolt.profile.dyno import RuntimeJumps, dyno_stats
from kbuild_bolt.profile.formats import load_profile
from kbuild_bolt.profile.model import Profile, combine, read_profile, write_profile
from kbuild_bolt.profile.stale import adapt, shapes_for
from synthetic_kernel import CODE, TABLES, build

DATA = Path(__file__).resolve().parents[1] / "data"
needs_as = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")


def test_profile_file_round_trip(tmp_path):
    p = Profile(np.array([0xFFFFFFFF81000000], np.uint64), np.array([0xFFFFFFFF81000010], np.uint64),
                np.array([7], np.int64), np.array([0xFFFFFFFF81000010], np.uint64),
                np.array([0xFFFFFFFF81000040], np.uint64), np.array([3], np.int64),
                kernel="6.12.0", source="test")
    write_profile(p, tmp_path / "p.kbb")
    q = read_profile(tmp_path / "p.kbb")
    assert q.kernel == "6.12.0" and q.source == "test"
    assert q.range_start.tolist() == p.range_start.tolist()
    assert q.count.tolist() == [3]


def test_combine_subtracts_and_clips():
    a = Profile(np.array([1, 5], np.uint64), np.array([2, 6], np.uint64), np.array([10, 4], np.int64))
    b = Profile(np.array([1, 5], np.uint64), np.array([2, 6], np.uint64), np.array([3, 9], np.int64))
    c = combine([a, b], [1.0, -1.0])
    assert c.range_start.tolist() == [1] and c.range_count.tolist() == [7]


def test_malformed_profile(tmp_path):
    (tmp_path / "bad.kbb").write_text("# kbuild-bolt profile v1\nR zz 1 2\n")
    with pytest.raises(KbbError, match="bad.kbb:2: malformed"):
        read_profile(tmp_path / "bad.kbb")
    # Records and shapes are read in bulk; a bad one is still named by its line.
    good = ["# kbuild-bolt profile v1", "kernel 6.12.0", "R ffffffff81000000 ffffffff81000010 7",
            "  R ffffffff81000020 ffffffff81000030 2", "B ffffffff81000010 ffffffff81000020 3",
            "H f 00000000000000aa ffffffff81000000 40", "K 0 10 00000000000000bb",
            "K 10 30 00000000000000cc"]
    (tmp_path / "ok.kbb").write_text("\n".join(good) + "\n")
    ok = read_profile(tmp_path / "ok.kbb")
    assert ok.range_count.tolist() == [7, 2] and ok.count.tolist() == [3]
    assert ok.shapes["f@ffffffff81000000"].blocks == [(0, 0x10, 0xbb), (0x10, 0x30, 0xcc)]
    for at, bad in ((3, "R ffffffff81000000 ffffffff81000010"), (5, "Bogus 1 2 3"),
                    (7, "K 0 zz 00000000000000bb"), (6, "H f 00aa ffffffff81000000"),
                    (4, "  R 1 2 3 4"), (3, "R 1 2 -"), (9, "B 1 2 3 4"),
                    (5, "B 1 ffffffffffffffffff 3"), (3, "R 1 2 99999999999999999999")):
        lines = good[:at - 1] + [bad] + good[at - 1:]
        (tmp_path / "bad.kbb").write_text("\n".join(lines) + "\n")
        with pytest.raises(KbbError, match=f"bad.kbb:{at}: malformed"):
            read_profile(tmp_path / "bad.kbb")
    (tmp_path / "junk").write_bytes(b"\x00\x01binary")
    with pytest.raises(KbbError, match="unknown profile format"):
        load_profile(tmp_path / "junk")
    with pytest.raises(KbbError, match="no such profile"):
        load_profile(tmp_path / "missing")


def test_perf_samples_from_a_real_recording():
    """perf script -F pid,ip,sym recorded on this kind of machine (no PMU: cpu-clock)."""
    path = DATA / "perf-script-ip.txt"
    assert perf.looks_like(path.read_bytes()[:4096])
    text_base = perf.text_base_from_kallsyms(DATA / "kallsyms-excerpt.txt")
    assert text_base == 0xFFFFFFFF81000000
    profile = perf.read_perf_script(path, text_base)
    kernel_lines = [line for line in path.read_text().splitlines()
                    if line.split()[1].startswith("ffffffff")]
    assert profile.sampled and profile.total == len(kernel_lines) > 10
    # The same KASLR shift moves every sample.
    shifted = perf.read_perf_script(path, text_base + 0x200000)
    assert (profile.range_start - shifted.range_start == np.uint64(0x200000)).all()


def test_perf_brstack_ranges_and_transfers(tmp_path):
    # Newest first, as perf prints them: ... 0xF/0xT/P/-/-/0
    line = ("  4242  ffffffff81000100  0xffffffff81000080/0xffffffff81000100/P/-/-/0 "
            "0xffffffff81000020/0xffffffff81000060/M/-/-/0 "
            "0xffffffff81000008/0xffffffff81000010/P/-/-/0\n")
    (tmp_path / "lbr.txt").write_text(line * 3)
    p = perf.read_perf_script(tmp_path / "lbr.txt", text_base=0xFFFFFFFF81000000)
    assert not p.sampled
    pairs = sorted(zip(p.src.tolist(), p.dst.tolist(), p.count.tolist()))
    assert (0xFFFFFFFF81000020, 0xFFFFFFFF81000060, 3) in pairs
    ranges = sorted(zip(p.range_start.tolist(), p.range_last.tolist(), p.range_count.tolist()))
    assert ranges == [(0xFFFFFFFF81000010, 0xFFFFFFFF81000020, 3),
                      (0xFFFFFFFF81000060, 0xFFFFFFFF81000080, 3)]


def test_kallsyms_errors(tmp_path):
    (tmp_path / "k").write_text("0000000000000000 T _text\n")
    with pytest.raises(KbbError, match="read /proc/kallsyms as root"):
        perf.text_base_from_kallsyms(tmp_path / "k")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("profile"))


@pytest.fixture(scope="module")
def model(kernel):
    m = BinaryModel.open(kernel, jobs=1)
    return m, build_cfg(m)


def sym(model, name, off=0):
    return int(model.image.symbols.address(name)) + off


def hot_profile(model):
    """startup_64 runs 100 times: its static-key jump is taken 60 times."""
    m = model
    start = sym(m, "startup_64")
    key_site = int(m.tables["__jump_table"].targets("code")[1])   # the 5-byte jmp site
    target = int(m.tables["__jump_table"].targets("target")[1])
    return Profile(np.array([start, target], np.uint64), np.array([key_site, target + 2], np.uint64),
                   np.array([100, 60], np.int64), np.array([key_site], np.uint64),
                   np.array([target], np.uint64), np.array([60], np.int64))


@needs_as
def test_attach_counts_and_edges(model):
    m, cfg = model
    cp = attach(m, hot_profile(m))
    assert cp.matched == 1.0
    row = m.functions.by_name("startup_64")
    counts, edges = function_edges(m, cfg, cp, row)
    assert counts[0] == 100
    assert sum(edges.values()) >= 60
    assert 60 in edges.values()


@needs_as
def test_fdata_round_trip(model, tmp_path):
    m, cfg = model
    profile = hot_profile(m)
    n = fdata.write_fdata(profile, m, tmp_path / "p.fdata")
    assert n >= 1
    text = (tmp_path / "p.fdata").read_text()
    assert "1 startup_64 " in text
    assert fdata.looks_like(text.encode())
    # perf2bolt names locals "name/N": the reader drops the suffix.
    (tmp_path / "p2.fdata").write_text(text.replace("startup_64 ", "startup_64/1 "))
    back = fdata.read_fdata(tmp_path / "p2.fdata", m)
    cp_a, cp_b = attach(m, profile), attach(m, back)
    row = m.functions.by_name("startup_64")
    edges_a = function_edges(m, cfg, cp_a, row)[1]
    edges_b = function_edges(m, cfg, cp_b, row)[1]
    taken = [k for k, v in edges_a.items() if v == 60]
    assert taken and all(edges_b.get(k) == 60 for k in taken)
    (tmp_path / "bad.fdata").write_text("1 nosuchfunction 0 1 other 4 0 9\n")
    with pytest.raises(KbbError, match="another kernel"):
        fdata.read_fdata(tmp_path / "bad.fdata", m)


@needs_as
def test_stale_profile_moves_and_matches(model, tmp_path):
    m, cfg = model
    profile = hot_profile(m)
    shapes = shapes_for(m, cfg, profile)
    # A rebuild: a new function in front shifts startup_64; second changes.
    changed = CODE.replace("    .text\n    .globl startup_64",
                           "    .text\n    .globl pad_fn\n    .type pad_fn, @function\n"
                           "pad_fn: ret\n    .size pad_fn, 1\n    .p2align 6, 0xcc\n"
                           "    .globl startup_64", 1)
    changed = changed.replace(".Lcall:  call startup_64", ".Lcall:  call startup_64\n    nop")
    from elfkit import assemble
    path = assemble(tmp_path, changed + "".join(TABLES.values()), release="6.12.1-elfkit")
    m2 = BinaryModel.open(path, jobs=1)
    cfg2 = build_cfg(m2)
    moved, report = adapt(profile, m2, cfg2, shapes)
    assert report.functions_same == 1  # startup_64 only moved
    assert report.used == 1.0
    delta = sym(m2, "startup_64") - sym(m, "startup_64")
    assert delta == 64
    assert (moved.range_start - profile.range_start == np.uint64(delta)).all()


@needs_as
def test_profile_of_this_very_build_applies_without_matching_again(tmp_path, monkeypatch):
    """A profile says which build it describes (the vmlinux's GNU build-id, kept
    in the file and by sums of profiles of that build). On that build it applies
    as stale matching would apply it, without working out a single function's
    shape again; on any other build it is matched as before."""
    from dataclasses import replace

    from elfkit import assemble
    from kbuild_bolt.profile import stale

    ld = ("-m", "elf_x86_64", "--emit-relocs", "-z", "noexecstack", "--build-id=sha1")
    m = BinaryModel.open(assemble(tmp_path, CODE + "".join(TABLES.values()), ld_args=ld), jobs=1)
    cfg = build_cfg(m)
    profile = hot_profile(m)
    stale.describe_build(profile, m, cfg)
    assert len(profile.build_id) == 40 and profile.shapes
    write_profile(profile, tmp_path / "p.kbb")
    assert read_profile(tmp_path / "p.kbb").build_id == profile.build_id
    assert combine([profile, profile]).build_id == profile.build_id
    assert combine([profile, replace(profile, build_id="")]).build_id == ""
    matched, matched_report = adapt(replace(profile, build_id=""), m, cfg, profile.shapes)

    def no_shapes(*args, **kwargs):
        raise AssertionError("a shape worked out again for a profile of this build")

    monkeypatch.setattr(stale, "function_shape", no_shapes)
    same, report = adapt(profile, m, cfg, profile.shapes)
    assert report.summary() == matched_report.summary() and report.functions_same >= 1
    for column in ("range_start", "range_last", "range_count", "src", "dst", "count"):
        assert np.array_equal(getattr(same, column), getattr(matched, column)), column
    assert same.used == matched.used == 1.0
    # Another build (here: the build-id of another one) is matched function by function.
    with pytest.raises(AssertionError, match="worked out again"):
        adapt(replace(profile, build_id="00" * 20), m, cfg, profile.shapes)


def test_ext_tsp_prefers_fall_throughs():
    # 0 -> 1 (cold) / 0 -> 2 (hot) -> 3; entry stays first; cold goes last.
    sizes = {0: 10, 1: 30, 2: 10, 3: 5}
    counts = {0: 100, 1: 0, 2: 100, 3: 100}
    edges = {(0, 2): 100, (2, 3): 100, (0, 1): 0}
    order = ext_tsp_order([0, 1, 2, 3], sizes, counts, edges, {0: True})
    assert order == [0, 2, 3, 1]
    layout = _Layout(sizes, edges, {0: True})
    assert layout.score(order) > layout.score([0, 1, 2, 3])


def test_ext_tsp_keeps_entry_first_and_handles_loops():
    sizes = {b: 8 for b in range(5)}
    counts = {0: 1, 1: 50, 2: 50, 3: 50, 4: 1}
    edges = {(0, 3): 1, (3, 1): 50, (1, 2): 50, (2, 3): 49, (3, 4): 1}
    order = ext_tsp_order(list(range(5)), sizes, counts, edges, {3: True, 2: False})
    assert order[0] == 0 and sorted(order) == list(range(5))
    # the loop body stays together
    pos = {b: i for i, b in enumerate(order)}
    assert abs(pos[1] - pos[2]) == 1


def test_edge_score_weights():
    assert edge_score(10, 10, 5, True) == 5.0
    assert edge_score(10, 10, 5, False) == pytest.approx(5.25)
    assert edge_score(10, 10 + 512, 1, True) == pytest.approx(0.05)
    assert edge_score(1000, 1000 - 640, 1, True) == 0.0
    assert edge_score(10, 5000, 1, True) == 0.0


@needs_as
def test_dyno_stats_count_jumps_as_they_ran(model):
    """A ``jmp __x86_return_thunk`` patched into ``ret`` at boot (no return thunk
    on the CPU) is no jump: an exact profile that never saw it reach the thunk
    says so. A retpoline call that went elsewhere ran as an indirect call.
    Sampled profiles keep the file's view."""
    from kbuild_bolt.profile.attach import CodeProfile

    m, _cfg = model
    ret_site = int(m.tables[".return_sites"].targets("site")[0])
    retpoline_site = int(m.tables[".retpoline_sites"].targets("site")[0])
    i_ret, i_retpoline = (int(i) for i in m.insn_index(np.array([ret_site, retpoline_site],
                                                                 np.uint64)))
    thunk, callee = sym(m, "__x86_return_thunk"), sym(m, "startup_64")
    key_site = int(m.insn_index(np.array([m.tables["__jump_table"].targets("code")[1]],
                                         np.uint64))[0])

    def profile(taken, sampled=False):
        src, dst, count = zip(*taken) if taken else ((), (), ())
        return CodeProfile(np.zeros(len(m.insns.addr), np.int64), np.array(src, np.int64),
                           np.array(dst, np.uint64), np.array(count, np.int64), 1.0,
                           sampled=sampled, call_src=np.array([i_retpoline], np.int64),
                           call_dst=np.array([callee], np.uint64),
                           call_count=np.array([7], np.int64))

    static_key = (key_site, int(m.tables["__jump_table"].targets("target")[1]), 60)
    as_thunk = RuntimeJumps(m, profile([static_key, (i_ret, thunk, 100)]))
    assert as_thunk.jumps_out(i_ret, 100) == (100, 0)
    as_ret = RuntimeJumps(m, profile([static_key]))
    assert as_ret.jumps_out(i_ret, 100) == (0, 0)
    assert as_ret.indirect_calls(i_retpoline, i_retpoline + 1) == 7
    sampled = RuntimeJumps(m, profile([], sampled=True))
    assert sampled.jumps_out(i_ret, 100) == (100, 0)
    assert sampled.indirect_calls(i_retpoline, i_retpoline + 1) == 0


@needs_as
def test_dyno_stats_before_and_after(model):
    m, cfg = model
    cp = attach(m, hot_profile(m))
    row = m.functions.by_name("startup_64")
    before = dyno_stats(m, cfg, cp, rows=[row])
    assert before["INSTRUCTIONS"] > 100
    assert before["ALL_BRANCHES"] == before["ALL_CONDITIONAL"] + before["UNCOND_BRANCHES"]
    assert before["ALL_TAKEN"] == before["TAKEN_CONDITIONAL"] + before["UNCOND_BRANCHES"]
    blocks = list(cfg.blocks_of(row))
    after = dyno_stats(m, cfg, cp, orders={row: blocks[:1] + blocks[:0:-1]}, rows=[row])
    assert after["INSTRUCTIONS"] == before["INSTRUCTIONS"]


def test_plugin_output_with_calls_followed_through_thunks(tmp_path):
    from kbuild_bolt.profile.qemu import parse_plugin_output

    out = tmp_path / "tb.txt"
    out.write_text("# kbuild-bolt qemu profile v1\n"
                   "T ffffffff81000000 ffffffff81000010 4 7\n"
                   "E ffffffff81000000 ffffffff81000010 ffffffff81000100 ffffffff81000104 7\n"
                   "C ffffffff81000010 ffffffff81000200 5\n"
                   "C ffffffff81000010 ffffffff81000300 2\n"
                   "L 10 1\n")
    p = parse_plugin_output(out)
    pairs = dict(zip(zip(p.src.tolist(), p.dst.tolist()), p.count.tolist()))
    assert pairs == {(0xFFFFFFFF81000010, 0xFFFFFFFF81000100): 7,     # into the thunk
                     (0xFFFFFFFF81000010, 0xFFFFFFFF81000200): 5,     # where it went
                     (0xFFFFFFFF81000010, 0xFFFFFFFF81000300): 2}
    assert p.stats == {"l1i_fetches": 10, "l1i_misses": 1, "instructions": 4 * 7}


@needs_as
def test_thunk_ranges_for_the_plugin(kernel, tmp_path):
    """The indirect thunks start a followed call, the return thunk is passed
    through; offsets in a 2 MiB window (KASLR moves by multiples of it). Not an
    ELF (a bzImage has no symbols): nothing to follow."""
    from kbuild_bolt.elf.image import ElfImage
    from kbuild_bolt.profile.qemu import thunk_arguments

    args = thunk_arguments(kernel)
    with ElfImage(kernel) as image:
        thunk = image.symbols.address("__x86_indirect_thunk_rax")
        ret = image.symbols.address("__x86_return_thunk")
    assert f"thunk={thunk % (1 << 21):x}:2" in args      # (its 2 bytes: jmp *%rax)
    assert f"via={ret % (1 << 21):x}:2" in args
    (tmp_path / "bzImage").write_bytes(b"MZ" + bytes(600))
    assert thunk_arguments(tmp_path / "bzImage") == []


@needs_as
def test_lbr_stack_follows_retpoline_calls(model, tmp_path):
    """An LBR stack (newest first) holding a call of a retpoline thunk and the
    thunk's jump: the call's real target is recorded as its transfer."""
    from kbuild_bolt.profile.attach import indirect_calls
    from kbuild_bolt.profile.thunks import thunk_ranges

    m, _cfg = model
    site = int(m.tables[".retpoline_sites"].targets("site")[0])
    thunk, target = sym(m, "__x86_indirect_thunk_rax"), sym(m, "startup_64")
    script = tmp_path / "perf.txt"
    script.write_text(f"  1234 {target:x} {thunk:#x}/{target:#x}/P/-/-/1  "
                      f"{site:#x}/{thunk:#x}/P/-/-/1\n" * 3)
    profile = perf.read_perf_script(script, thunks=thunk_ranges(m.image))
    calls = indirect_calls(m, attach(m, profile))
    assert calls.by_site() == [(int(m.insn_index(np.array([site], np.uint64))[0]), 3,
                                [(target, 3)])]
    plain = perf.read_perf_script(script)          # (without the thunks: not followed)
    assert not len(indirect_calls(m, attach(m, plain)).site)
