"""Module code in profiles: (module, section, offset), through every profile operation."""

import subprocess

import numpy as np
import pytest

from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile.model import (
    Profile, combine, in_modules, module_address, module_section_index, read_profile,
    write_profile,
)
from kbuild_bolt.profile.modules import (
    ModuleMap, add_sizes, describe_modules, module_shares, parse_sysfs_lines,
    read_module_sections, vmlinux_code_spans, without_other_code,
)
from kbuild_bolt.profile.qemu import parse_plugin_output

KERNEL = 0xFFFFFFFF81000000


@pytest.fixture
def small_vmlinux(tmp_path):
    from elfkit import assemble

    return assemble(tmp_path, """
        .text
        .globl f
        .type f, @function
    f:
        nop
        nop
        nop
        nop
        nop
        ret
        .size f, . - f
    """)


@pytest.fixture
def small_module(tmp_path):
    """A relocatable object with code, as a .ko is."""
    src = tmp_path / "m.c"
    src.write_text("int f(int x) { return x * 3 + 1; }\n")
    subprocess.run(["gcc", "-O2", "-c", "-o", str(tmp_path / "m.o"), str(src)], check=True)
    return tmp_path / "m.o"


def u64(*values):
    return np.array(values, np.uint64)


def i64(*values):
    return np.array(values, np.int64)


def with_modules():
    """A kernel range and transfer, two ranges in ext4's .text and one in loop's,
    a call from ext4 into the kernel and a jump inside ext4."""
    ext4, loop = module_address(0, 0), module_address(1, 0)
    return Profile(u64(KERNEL, ext4 + 0x10, ext4 + 0x40, loop + 8),
                   u64(KERNEL + 4, ext4 + 0x1c, ext4 + 0x48, loop + 12), i64(5, 7, 3, 2),
                   u64(KERNEL + 4, ext4 + 0x1c, ext4 + 0x20), u64(KERNEL + 0x100, KERNEL,
                                                                  ext4 + 0x40),
                   i64(5, 7, 3), kernel="6.12.117", source="qemu",
                   module_sections=(("ext4", ".text"), ("loop", ".text")))


def test_module_addresses_encode_section_and_offset_below_kernel_space():
    a = module_address(np.array([0, 3]), np.array([0x10, 0xFFFFFFFF]))
    assert in_modules(a).all() and not in_modules(u64(KERNEL)).any()
    assert module_section_index(a).tolist() == [0, 3]
    assert (a & np.uint64(0xFFFFFFFF)).tolist() == [0x10, 0xFFFFFFFF]


def test_kernel_only_and_module_part_split_the_records():
    p = with_modules()
    k = p.kernel_only()
    assert k.range_start.tolist() == [KERNEL] and k.src.tolist() == [KERNEL + 4]
    ext4 = p.module_part("ext4")
    assert len(ext4.range_start) == 2 and ext4.range_count.tolist() == [7, 3]
    # (the call into the kernel leaves the module: not an edge of its code)
    assert ext4.src.tolist() == [module_address(0, 0x20)]
    assert p.modules == ["ext4", "loop"]
    assert p.module_totals() == {"ext4": 10, "loop": 2}


def test_kaslr_shift_leaves_module_code_alone():
    p = with_modules()
    s = p.shifted(0x200000)
    assert s.range_start[0] == KERNEL - 0x200000
    assert (s.range_start[1:] == p.range_start[1:]).all()
    assert s.dst[1] == KERNEL - 0x200000 and s.src[1] == p.src[1]


def test_file_round_trip_keeps_module_sections(tmp_path):
    p = with_modules()
    write_profile(p, tmp_path / "p.kbb")
    q = read_profile(tmp_path / "p.kbb")
    assert q.module_sections == p.module_sections
    assert sorted(q.range_start.tolist()) == sorted(p.range_start.tolist())
    text = (tmp_path / "p.kbb").read_text()
    assert "M 0 ext4 .text\nM 1 loop .text\n" in text


def test_a_module_address_without_its_section_line_is_refused(tmp_path):
    p = with_modules()
    p.module_sections = (("ext4", ".text"),)        # loop's line missing
    write_profile(p, tmp_path / "p.kbb")
    with pytest.raises(KbbError, match="names no M line"):
        read_profile(tmp_path / "p.kbb")


def test_combine_numbers_sections_of_all_profiles_alike():
    a = with_modules()
    # The same code, its sections listed the other way round.
    b = Profile(u64(module_address(0, 8), module_address(1, 0x10)),
                u64(module_address(0, 12), module_address(1, 0x1c)), i64(1, 1),
                module_sections=(("loop", ".text"), ("ext4", ".text")))
    c = Profile(u64(module_address(0, 0)), u64(module_address(0, 4)), i64(9),
                module_sections=(("jbd2", ".text"),))
    total = combine([a, b, c])
    assert total.module_sections == (("ext4", ".text"), ("loop", ".text"), ("jbd2", ".text"))
    assert total.module_totals() == {"ext4": 11, "loop": 3, "jbd2": 9}
    ext4 = total.module_part("ext4")
    at = ext4.range_start.tolist().index(module_address(0, 0x10))
    assert ext4.range_count[at] == 8          # 7 + 1: the same range in both
    # (and a profile without modules sums with them)
    assert combine([a, Profile(u64(KERNEL), u64(KERNEL + 4), i64(1))]).module_totals() \
        == {"ext4": 10, "loop": 2}


SYSFS = b"""\
random console noise
/sys/module/ext4/sections/.text:0xffffffffc0400000
/sys/module/ext4/sections/.init.text:0xffffffffc0500000
/sys/module/ext4/sections/.data:0xffffffffc0600000
/sys/module/loop/sections/.text:0xffffffffc0300000
/sys/module/loop/sections/.text.unlikely:0x0000000000000000
[   12.3] /sys/module/jbd2/sections/.text:0xffffffffc0200000
"""


def test_sysfs_lines_name_the_code_sections():
    found = parse_sysfs_lines(SYSFS.splitlines())
    # (.init.text is freed after init: its memory goes to later modules)
    assert list(zip(found.module, found.section)) == [
        ("ext4", ".text"), ("loop", ".text"), ("jbd2", ".text")]
    # a reload moves a section: the last address counts
    parse_sysfs_lines(["/sys/module/loop/sections/.text:0xffffffffc0700000"], found)
    assert found.start[found.module.index("loop")] == 0xFFFFFFFFC0700000


def test_saved_list_without_lines_is_refused(tmp_path):
    (tmp_path / "m.txt").write_text("nothing\n")
    with pytest.raises(KbbError, match="grep . /sys/module"):
        read_module_sections(tmp_path / "m.txt")


def test_locate_uses_sizes_and_leaves_other_code_out():
    found = parse_sysfs_lines(SYSFS.splitlines())
    found.size[0] = 0x1000                       # ext4 .text is 4 KiB
    index, offset = found.locate(u64(0xFFFFFFFFC0400010, 0xFFFFFFFFC0401000,
                                     0xFFFFFFFFC0300040, 0xFFFFFFFFC0100000, KERNEL))
    assert index.tolist() == [0, -1, 1, -1, -1]
    assert offset[0] == 0x10 and offset[2] == 0x40
    # no size: up to the next section's start
    index, _ = found.locate(u64(0xFFFFFFFFC02FFFF0))
    assert index.tolist() == [2]


def test_plugin_output_keeps_module_code_and_counts_instructions(tmp_path):
    out = tmp_path / "tb.txt"
    out.write_text(f"""# kbuild-bolt qemu profile v1
T {KERNEL:x} {KERNEL + 8:x} 3 100
T ffffffffc0400010 ffffffffc0400020 5 40
T ffffffffc0300000 ffffffffc0300004 2 10
E {KERNEL:x} {KERNEL + 8:x} ffffffffc0400010 ffffffffc0400020 40
L 0 0
G 1
""")
    found = parse_sysfs_lines(SYSFS.splitlines())
    p = parse_plugin_output(out, found)
    assert set(p.module_sections) == {("ext4", ".text"), ("loop", ".text")}
    assert p.stats["instructions"] == 300 + 200 + 20
    assert p.stats["instructions:ext4"] == 200 and p.stats["instructions:loop"] == 20
    what, share, shares = module_shares(p)
    assert what == "instructions" and share == pytest.approx(220 / 520)
    assert list(shares) == ["ext4", "loop"]
    assert "42.3% of the instructions in 2 modules (ext4 38.5%, loop 3.8%)" \
        == describe_modules(p)
    # the call from the kernel into ext4: its target is module code
    assert in_modules(p.dst).tolist() == [True]


def test_code_neither_vmlinux_nor_a_module_is_left_out(tmp_path, small_vmlinux):
    from kbuild_bolt.elf.image import ElfImage

    with ElfImage(small_vmlinux) as image:
        text = image.section(".text")
        inside = text.addr + 4
    p = Profile(u64(inside, 0xFFFFFFFFC0001000, module_address(0, 0)),
                u64(inside, 0xFFFFFFFFC0001004, module_address(0, 4)), i64(1, 2, 3),
                module_sections=(("m", ".text"),))
    kept, other = without_other_code(p, vmlinux_code_spans(small_vmlinux))
    assert other == 2 and kept.range_count.tolist() == [1, 3]


def test_sizes_come_from_the_ko_files(tmp_path, small_module):
    tree = tmp_path / "lib/modules/6.12.117"
    tree.mkdir(parents=True)
    (tree / "my-mod.ko").write_bytes(small_module.read_bytes())
    found = ModuleMap()
    found.add("my_mod", ".text", 0xFFFFFFFFC0000000)
    assert add_sizes(found, tmp_path) == 1 and found.size[0] > 0


def two_text_module(tmp_path):
    """A relocatable object with .text, an .init.text and a .text.unlikely (its
    code in two core sections, 16-byte aligned)."""
    src = tmp_path / "two.c"
    src.write_text("""
        __attribute__((section(".modinfo"), used)) static const char vm[] =
            "vermagic=6.12.0 SMP mod_unload ";
        struct module { int x; } __this_module
            __attribute__((section(".gnu.linkonce.this_module"))) = { 1 };
        __attribute__((section(".init.text"))) int init_f(int x) { return x + 7; }
        int f(int x) { return x * 3 + 1; }
        __attribute__((cold, noinline)) int g(int x) { return x ^ 0x55; }
        int h(int x) { return x ? g(x) : f(x); }
    """)
    out = tmp_path / "two-mod.ko"
    subprocess.run(["gcc", "-O2", "-c", "-falign-functions=16", "-freorder-functions",
                    "-o", str(out), str(src)], check=True)
    return out


def installed_two_text_module(tmp_path):
    """The two-section module in a modules tree under ``tmp_path``, its core
    text at the address perf's map says: (path, text start, .text.unlikely's)."""
    from kbuild_bolt.profile.modules import text_layout

    path = two_text_module(tmp_path)
    tree = tmp_path / "lib/modules/6.12.0"
    tree.mkdir(parents=True)
    (tree / path.name).write_bytes(path.read_bytes())
    layout = {name: offset for name, offset, _ in text_layout(path.read_bytes())}
    base = 0xFFFFFFFFC0591000
    return path, base, base + layout[".text.unlikely"]


def test_core_text_laid_out_as_the_loader_does(tmp_path):
    from kbuild_bolt.elf.image import ElfImage
    from kbuild_bolt.profile.modules import text_layout

    path = two_text_module(tmp_path)
    layout = text_layout(path.read_bytes())
    names = [name for name, _, _ in layout]
    assert ".init.text" not in names and ".text" in names and ".text.unlikely" in names
    with ElfImage(path) as image:
        order = [s.name for s in image.sections if s.name in names]
        sizes = {s.name: s.size for s in image.sections}
        aligns = {s.name: max(s.addralign, 1) for s in image.sections}
    assert names == order                    # (section header order)
    end = 0
    for name, offset, size in layout:
        assert offset % aligns[name] == 0 and offset >= end and offset - end < aligns[name]
        assert size == sizes[name]
        end = offset + size


def test_perf_module_maps_place_module_code(tmp_path):
    from kbuild_bolt.profile.modules import from_text_bases
    from kbuild_bolt.profile.perf import PerfScriptReader, module_from_map_line

    path, base, unlikely = installed_two_text_module(tmp_path)
    mapline = (f"  0 PERF_RECORD_MMAP -1/0: [{base:#x}(0x7000) @ 0 00:00 0 0]: x "
               f"/lib/modules/6.12.0/kernel/{path.name}\n")
    assert module_from_map_line(mapline.encode()) == ("two_mod", base)
    assert module_from_map_line(b"  0 PERF_RECORD_MMAP -1/0: [0xffffffffc0591000(0x7000) "
                                b"@ 0 00:00 0 0]: x [loop]") == ("loop", 0xFFFFFFFFC0591000)
    text = (mapline + f"  4242  {base + 4:x}  {base + 4:#x}/{unlikely:#x}/P/-/-/0 "
            f"{base + 0x6000:#x}/{base:#x}/P/-/-/0\n")
    (tmp_path / "script.txt").write_text(text)
    reader = PerfScriptReader(name="script")
    with open(tmp_path / "script.txt", "rb") as f:
        reader.feed(f)
    assert reader.module_bases == {"two_mod": base}
    reader.modules, missing = from_text_bases(reader.module_bases, tmp_path)
    assert missing == []
    p = reader.profile()
    pairs = set(zip(p.src.tolist(), p.dst.tolist()))
    sections = list(p.module_sections)
    text_i, unlikely_i = sections.index(("two_mod", ".text")), \
        sections.index(("two_mod", ".text.unlikely"))
    # base + 4 -> .text.unlikely: both ends placed; base + 0x6000 is past the
    # module's code: left out with its record.
    assert pairs == {(module_address(text_i, 4), module_address(unlikely_i, 0))}
    # without the .ko files, module code is left out, not taken for the kernel's
    reader = PerfScriptReader(name="script")
    with open(tmp_path / "script.txt", "rb") as f:
        reader.feed(f)
    p = reader.profile()
    assert not len(p.src) and not p.module_sections


def test_module_shapes_travel_with_their_module(tmp_path):
    from kbuild_bolt.profile.shapes import FunctionShape

    p = with_modules()
    at = module_address(0, 0x10)
    p.shapes = {"vfs_read@ffffffff81000000": FunctionShape("vfs_read", KERNEL, 16, 7),
                f"ext4:ext4_map_blocks@{at:x}": FunctionShape("ext4:ext4_map_blocks", at, 64,
                                                              9, [(0, 64, 5)])}
    write_profile(p, tmp_path / "p.kbb")
    q = read_profile(tmp_path / "p.kbb")
    assert set(q.shapes) == set(p.shapes)
    assert list(q.kernel_only().shapes) == ["vfs_read@ffffffff81000000"]
    ext4 = q.module_part("ext4")
    assert [s.name for s in ext4.shapes.values()] == ["ext4:ext4_map_blocks"]
    assert not q.module_part("loop").shapes


def test_placed_profile_moves_counts_and_shapes_to_the_module(tmp_path):
    from kbuild_bolt.elf.image import ElfImage
    from kbuild_bolt.elf.place import place
    from kbuild_bolt.profile.shapes import FunctionShape
    from kbuild_bolt.rewrite.module import placed_profile

    path = two_text_module(tmp_path)
    placed, _ = place(path.read_bytes())
    image = ElfImage.from_bytes(placed)
    text, unlikely = image.section(".text"), image.section(".text.unlikely")
    sections = (("two_mod", ".text"), ("two_mod", ".text.unlikely"), ("other", ".text"))
    at = module_address(1, 0)
    p = Profile(u64(module_address(0, 4), at, module_address(2, 0)),
                u64(module_address(0, 8), at + 2, module_address(2, 4)), i64(3, 4, 5),
                u64(module_address(0, 8)), u64(at), i64(3),
                module_sections=sections,
                shapes={f"two_mod:g@{at:x}": FunctionShape("two_mod:g", at, 8, 1)})
    q = placed_profile(p, "two_mod", image)
    assert sorted(q.range_start.tolist()) == [text.addr + 4, unlikely.addr]
    assert q.src.tolist() == [text.addr + 8] and q.dst.tolist() == [unlikely.addr]
    assert list(q.shapes) == [f"g@{unlikely.addr:x}"] and not q.module_sections


def test_profile_convert_keeps_module_code_with_the_ko_files(tmp_path, capsys):
    """`profile convert` of perf script text whose module maps perf printed:
    with --modules (the .ko files) module code is kept as (module, section,
    offset) and said; without, it is left out and said; a saved sysfs list
    (--module-sections) places it too."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from synthetic_kernel import build
    from kbuild_bolt.binary.model import BinaryModel
    from kbuild_bolt.cli import main

    vmlinux = build(tmp_path)
    model = BinaryModel.open(vmlinux, jobs=1)
    text = model.image.symbols.address("_text")
    start = model.image.symbols.address("startup_64")
    path, base, unlikely = installed_two_text_module(tmp_path)
    lines = [f"    0 PERF_RECORD_MMAP -1/0: [{text:#x}(0x1000000) @ {text:#x}]: x "
             "[kernel.kallsyms]_text",
             f"    0 PERF_RECORD_MMAP -1/0: [{base:#x}(0x7000) @ 0 00:00 0 0]: x "
             f"/lib/modules/6.12.0/kernel/{path.name}"]
    lines += [f" 1234  {start:x} 0x{start + 8:x}/0x{start:x}/P/-/-/1/  "
              f"0x{start + 4:x}/0x{start + 2:x}/P/-/-/1/  "
              f"0x{base + 4:x}/0x{unlikely:x}/P/-/-/1/"] * 5
    (tmp_path / "perf.txt").write_text("\n".join(lines) + "\n")
    argv = ["profile", "convert", str(tmp_path / "perf.txt"), "--vmlinux", str(vmlinux)]
    assert main(argv + ["--modules", str(tmp_path), "-o", str(tmp_path / "a.kbb")]) == 0
    err = capsys.readouterr().err
    assert "modules: 1 of 1 in perf's module maps laid out from" in err
    a = read_profile(tmp_path / "a.kbb")
    assert a.modules == ["two_mod"]
    assert sorted(a.kernel_only().src.tolist()) == [start + 4, start + 8]
    assert len(a.src) == 3 and in_modules(a.src).sum() == 1      # (the module's own jump)
    assert main(argv + ["-o", str(tmp_path / "b.kbb")]) == 0
    assert "their code left out (--modules DIR" in capsys.readouterr().err
    b = read_profile(tmp_path / "b.kbb")
    assert not b.module_sections and not in_modules(b.src).any()
    assert sorted(b.src.tolist()) == [start + 4, start + 8]
    (tmp_path / "sections.txt").write_text(
        f"/sys/module/two_mod/sections/.text:{base:#x}\n"
        f"/sys/module/two_mod/sections/.text.unlikely:{unlikely:#x}\n")
    assert main(argv + ["--module-sections", str(tmp_path / "sections.txt"), "--modules",
                        str(tmp_path), "-o", str(tmp_path / "c.kbb")]) == 0
    c = read_profile(tmp_path / "c.kbb")
    assert c.module_sections == a.module_sections
    assert_same_records(a, c)


def assert_same_records(a, b):
    for name in ("range_start", "range_last", "range_count", "src", "dst", "count"):
        assert sorted(getattr(a, name).tolist()) == sorted(getattr(b, name).tolist()), name
