"""A relocatable object placed at addresses reads as a vmlinux does, and a
rewrite of it goes back to a relocatable object (issue 15)."""

import subprocess

import numpy as np
import pytest

from kbuild_bolt.analysis.crosscheck import check_relocations
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.elf.image import RELA, ET_EXEC, SHF_ALLOC, ElfImage, type_and_symbol
from kbuild_bolt.elf.place import (
    EXTERNAL_SECTION, UD2, place, records_outside_their_section, unplace,
)
from kbuild_bolt.errors import KbbError
from kbuild_bolt.rewrite.context import RewriteOptions
from kbuild_bolt.rewrite.module import is_module, module_name, rewrite_module

SOURCE = r"""
__attribute__((section(".modinfo"), used)) static const char vm[] =
    "vermagic=6.12.0-test SMP mod_unload ";
__attribute__((section(".modinfo"), used)) static const char nm[] = "name=demo";
struct module { int x; };
struct module __this_module __attribute__((section(".gnu.linkonce.this_module"))) = { 1 };
extern int printk(const char *, ...);
extern int other_counter;
static __attribute__((noinline)) int helper(int x) { return x * 7 + other_counter; }
int demo_a(int x)
{
    if (x > 3)
        return printk("big %d\n", helper(x));
    if (x < -100)
        return printk("small %d %d\n", x, helper(-x));
    return helper(x - 1);
}
int demo_b(int x)
{
    int s = 0;
    for (int i = 0; i < x; i++) {
        if (i & 1)
            s += demo_a(i);
        else
            s -= helper(i);
    }
    return s;
}
int demo_c(int x, int y)
{
    int s = 0;
    for (int i = 0; i < x; i++) {
        if (i % 3 == 0) s += printk("a %d\n", i);
        else if (i % 5 == 0) s -= helper(i + y);
        else if (i % 7 == 0) s ^= demo_a(i * y);
        else if (i % 11 == 0) s += printk("b %d %d\n", i, s);
        else if (i % 13 == 0) s -= other_counter;
        else s += i;
        if (s > 1000) s = printk("c\n");
    }
    return s;
}
int (*table[])(int) = { demo_a, demo_b };
/* a section the loader never sees, with relocations: what names symbols there
   must follow the symbol table when a rewrite adds symbols */
asm(".section .kbbnote,\"\",@progbits\n.quad demo_a\n.quad printk\n.previous");
"""


@pytest.fixture
def module(tmp_path):
    src = tmp_path / "demo.c"
    src.write_text(SOURCE)
    out = tmp_path / "demo.ko"
    subprocess.run(["gcc", "-O2", "-c", "-fno-pic", "-mcmodel=kernel", "-mno-red-zone",
                    "-fno-asynchronous-unwind-tables", "-falign-functions=16",
                    "-o", str(out), str(src)], check=True)
    return out


def sections(data):
    with ElfImage.from_bytes(data) as image:
        return [(s.name, s.type, s.flags, s.info, s.link, s.addralign,
                 bytes(image.buf[s.offset:s.offset + s.size]) if s.type != 8 else s.size)
                for s in image.sections]


def test_placed_module_reads_as_a_linked_kernel(module):
    placed, placement = place(module.read_bytes(), "demo.ko")
    image = ElfImage.from_bytes(placed, "demo.ko")
    assert int(image.header["type"]) == ET_EXEC
    text = image.section(".text")
    assert text.addr == int(placement.section_addr[text.index]) >= 0xFFFFFFFFC0000000
    # every allocated section has its own addresses
    spans = sorted((s.addr, s.end) for s in image.sections if s.flags & SHF_ALLOC and s.size)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # the undefined symbols are defined in a section of their own
    ext = image.section(EXTERNAL_SECTION)
    printk = image.symbols.address("printk")
    assert ext is not None and ext.addr <= printk < ext.end
    model = BinaryModel(image, jobs=1)
    assert model.is_module and model.version.release == "6.12.0-test"
    assert {"demo_a", "demo_b", "helper"} <= set(model.functions.names)
    assert model.external(np.array([printk, text.addr], np.uint64)).tolist() == [True, False]
    total, problems = check_relocations(model)
    assert total > 5 and problems == []
    # a call to printk decodes with printk as its target
    calls = np.flatnonzero(np.asarray(model.insns.ref) == np.uint64(printk))
    assert len(calls) >= 1


def test_unplacing_gives_the_module_back(module):
    data = module.read_bytes()
    for room in (False, True):
        placed, placement = place(data, "demo.ko", room=room)
        back = unplace(placed, data, placement, "demo.ko")
        assert sections(back) == sections(data)


def test_room_for_cold_code_starts_with_a_ud2(module):
    data = module.read_bytes()
    placed, placement = place(data, "demo.ko", room=True)
    with ElfImage.from_bytes(placed) as image, ElfImage.from_bytes(data) as built:
        text = image.section(".text")
        body = bytes(image.buf[text.offset:text.offset + text.size])
        at = placement.text_separator
        assert at >= built.section(".text").size and body[at:at + 2] == UD2
        assert set(body[at + 2:]) == {0xCC} and text.size - at >= 4096


def test_placed_room_is_a_hole_for_cold_code(module):
    from kbuild_bolt.rewrite.holes import find_holes

    placed, _ = place(module.read_bytes(), "demo.ko", room=True)
    assert find_holes(BinaryModel(ElfImage.from_bytes(placed), jobs=1))


def test_random_layout_of_a_module(module, tmp_path):
    out = tmp_path / "demo-random.ko"
    results = [rewrite_module(module, out, RewriteOptions(reorder_blocks="random", seed=seed,
                                                          progress=False))
               for seed in range(1, 9)]
    result = results[-1]
    assert result.module == "demo" and result.rewritten >= 1
    assert "verify: ok" in result.verify_summary
    assert any(r.fragments for r in results)     # (cold parts in the room, name.cold)
    cold = next(seed for seed, r in enumerate(results, 1) if r.fragments)
    rewrite_module(module, out, RewriteOptions(reorder_blocks="random", seed=cold,
                                               progress=False))
    with ElfImage(out) as image:
        names = image.symbols.names
        assert any(n.endswith(".cold") for n in names)
        rela = image.section(".rela.kbbnote")
        records = np.frombuffer(image.buf[rela.offset:rela.offset + rela.size], RELA)
        _, sym = type_and_symbol(records["info"])
        assert [names[int(i)] for i in sym] == ["demo_a", "printk"]
    data = out.read_bytes()
    assert is_module(out) and data != module.read_bytes()
    with ElfImage(out) as image:
        assert image.is_relocatable
        assert module_name(image, out) == "demo"
        # every relocated field is zero again, as the loader wants it
        for rela in image.rela_sections:
            target = image.sections[rela.info]
            if not target.is_alloc or target.type == 8:
                continue
            r = image.relocations(rela)
            rtype, _ = type_and_symbol(r["info"])
            body = np.frombuffer(image.buf[target.offset:target.offset + target.size], np.uint8)
            for off, t in zip(r["offset"].tolist(), rtype.tolist()):
                n = {1: 8, 24: 8}.get(t, 4)
                assert not body[off:off + n].any(), (rela.name, off)
    # placed again, it reads clean
    placed, _ = place(data, "out")
    assert check_relocations(BinaryModel(ElfImage.from_bytes(placed), jobs=1))[1] == []


def test_module_errors_are_one_line(module, tmp_path):
    from elfkit import assemble

    linked = assemble(tmp_path, ".text\n.globl f\n.type f, @function\nf:\n ret\n.size f, 1\n")
    with pytest.raises(KbbError, match="not a relocatable object"):
        place(linked.read_bytes(), "vmlinux")
    debug = tmp_path / "debug.ko"
    subprocess.run(["gcc", "-O2", "-g", "-c", "-fno-pic", "-mcmodel=kernel", "-o", str(debug),
                    "-x", "c", "-"], input=SOURCE.encode(), check=True)
    with pytest.raises(KbbError, match="debug info"):
        rewrite_module(debug, tmp_path / "x.ko", RewriteOptions(reorder_blocks="random",
                                                                 progress=False))
    assert not (tmp_path / "x.ko").exists()
    with pytest.raises(KbbError, match="no code of module demo"):
        from kbuild_bolt.profile.model import Profile
        rewrite_module(module, tmp_path / "x.ko", RewriteOptions(
            reorder_blocks="ext-tsp", profile=Profile(), progress=False))


def test_damaged_modules_give_one_line_errors(module):
    """Bytes of a module changed at random: placing it works or says why in one
    line (KbbError), never anything else."""
    import random

    data = module.read_bytes()
    rng = random.Random(5)
    outcomes = set()
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            placed, placement = place(bytes(damaged), "damaged.ko", room=True)
            unplace(placed, bytes(damaged), placement, "damaged.ko")
            outcomes.add("placed")
        except KbbError as err:
            assert "\n" not in str(err)
            outcomes.add("refused")
    assert outcomes == {"placed", "refused"}


def test_functions_of_a_module_move_and_split(module, tmp_path):
    """Whole functions laid out at random in .text, split into hot and cold
    parts: verified, and every record still names the section it points into."""
    out = tmp_path / "demo-functions.ko"
    result = rewrite_module(module, out, RewriteOptions(
        reorder_blocks="random", reorder_functions="random", split_functions=True, seed=3,
        progress=False))
    assert result.moved_functions >= 3 and "verify: ok" in result.verify_summary
    with ElfImage(out) as image:
        assert records_outside_their_section(image) == 0


def test_a_record_naming_another_code_section_is_counted(tmp_path):
    """What a packed placement hides (the loader puts sections apart): a record
    against a code section's symbol that points past that section."""
    src = tmp_path / "refs.c"
    # (a pointer into .text by its section symbol, as GAS writes `.text + 8`)
    src.write_text(SOURCE + 'asm(".pushsection .data.refs,\\"aw\\"\\n.quad .text + 8\\n'
                            '.popsection");\n')
    obj = tmp_path / "refs.ko"
    subprocess.run(["gcc", "-O2", "-c", "-fno-pic", "-mcmodel=kernel", "-o", str(obj),
                    str(src)], check=True)
    data = bytearray(obj.read_bytes())
    with ElfImage.from_bytes(bytes(data)) as image:
        assert records_outside_their_section(image) == 0
        text = image.section(".text")
        rela = next(r for r in image.rela_sections
                    if image.sections[r.info].name == ".data.refs")
        records = np.frombuffer(data, RELA, rela.size // RELA.itemsize, rela.offset)
        records["addend"][0] = text.size + 64
    with ElfImage.from_bytes(bytes(data)) as image:
        assert records_outside_their_section(image) == 1
