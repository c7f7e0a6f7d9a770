"""Whole-function layout on real kernels: random function orders, random block
orders and random hot/cold splits move nearly every function of the kernel (and
so exercise every fixup a real layout needs). The output must keep what the
kernel assumes about where functions are (regions, alignment, call padding,
same-named order, kallsyms), verify, pass x86's relocs tool, and boot clean with
KASLR on and off, the workload running under ftrace's function tracer (which
patches every function's fentry site) and /proc/kallsyms naming every function
and cold part at its new address."""

import numpy as np
import pytest

from kbuild_bolt.elf.image import STT_FUNC, ElfImage
from kbuild_bolt.elf.notes import build_id
from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
from kbuild_bolt.kernel.tables import kallsyms
from kbuild_bolt.kernel.text import PLAIN, text_layout
from kbuild_bolt.lab.kallsyms_check import kallsyms_problems, read_dump
from kbuild_bolt.lab.kernels import lab_kernel
from kbuild_bolt.qemu.runner import DEFAULT_TEXT, boot
from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

FLAVORS = ["6.12-regular", "6.12-hardened", "6.1-regular"]
SEEDS = {"6.12-regular": 11, "6.12-hardened": 12, "6.1-regular": 13, "distro": 14}
CODE = (".text", ".init.text", ".exit.text")

_REWRITES = {}


def random_layout(flavor, vmlinux, tmp_path_factory):
    """(output, result) of random functions + random blocks + random splits, every
    indirect call that may be promoted (to some function: its fallback runs),
    once per kernel."""
    if flavor not in _REWRITES:
        out = tmp_path_factory.mktemp(f"functions-{flavor}") / "vmlinux"
        result = rewrite(vmlinux, out, RewriteOptions(
            reorder_blocks="random", reorder_functions="random", split_functions=True,
            seed=SEEDS[flavor], progress=False, strip_debug=True, icp_every_site=True))
        _REWRITES[flavor] = (out, result)
    return _REWRITES[flavor]


def functions_of(image):
    """name -> sorted addresses of the function symbols in code sections."""
    symbols = image.symbols
    sections = [image.section(n).index for n in CODE if image.section(n) is not None]
    rows = np.flatnonzero((symbols.type == STT_FUNC) & np.isin(symbols.shndx, sections))
    out = {}
    for i in rows.tolist():
        out.setdefault(symbols.names[i], []).append(int(symbols.value[i]))
    return {name: sorted(v) for name, v in out.items()}


def layout_problems(before_path, after_path) -> tuple[int, list[str]]:
    """What the kernel assumes about function places, checked between input and
    output: each function stays in the text region it was linked into (the
    kernel tests membership by marker ranges; plain text is one region, and
    the 2 MiB padding after PTI's entry text none), keeps its 16-byte alignment and
    its call padding right in front, and cold parts lie in their function's
    region (plain text: also in plain gaps)."""
    before, after = ElfImage(before_path), ElfImage(after_path)
    layout = text_layout(before)   # (markers and regions stay where they were)
    kinds = [r.kind for r in layout.regions]
    f_before, f_after = functions_of(before), functions_of(after)
    problems, moved = [], 0
    for name, addrs in f_before.items():
        if name.endswith(".cold") or len(addrs) != 1 or len(f_after.get(name, [])) != 1:
            continue
        old, new = addrs[0], f_after[name][0]
        moved += old != new
        r_old, r_new = layout.region_index([old, new]).tolist()
        # (plain text has no marker test: any plain region will do)
        if r_old != r_new and not (kinds[r_old] == PLAIN and r_new >= 0
                                   and kinds[r_new] == PLAIN):
            problems.append(f"{name}: region {kinds[r_old]} -> "
                            f"{kinds[r_new] if r_new >= 0 else 'none'}")
        if old % 16 == 0 and new % 16:
            problems.append(f"{name}: {new:#x} lost its 16-byte alignment")
        pfx = f_before.get(f"__pfx_{name}")
        if pfx == [old - 16] and f_after.get(f"__pfx_{name}") != [new - 16]:
            problems.append(f"{name}: its __pfx_ padding did not move with it")
    for name, addrs in f_after.items():
        parent = name[:-len(".cold")]
        if not name.endswith(".cold") or len(f_before.get(parent, [])) != 1 or \
                name in f_before:
            continue
        r_parent = int(layout.region_index(f_before[parent])[0])
        for r in layout.region_index(addrs).tolist():
            plain_gap = r >= 0 and kinds[r] == PLAIN and kinds[r_parent] == PLAIN
            if r != r_parent and not plain_gap:
                problems.append(f"{name}: in {kinds[r] if r >= 0 else 'no region'}, "
                                f"its function in {kinds[r_parent]}")
    return moved, problems


@pytest.mark.parametrize("flavor", FLAVORS + ["distro"])
def test_kallsyms_arrays_encode_back_to_the_same_bytes(flavor, request):
    """Decoding kallsyms and encoding it again in scripts/kallsyms.c's order gives
    the linked bytes: the rewriter can re-sort it for new addresses."""
    kernel = request.getfixturevalue("distro") if flavor == "distro" else lab_kernel(flavor)
    image = ElfImage(kernel.vmlinux)
    table = kallsyms.read(image)
    seq = np.arange(table.count)
    order = kallsyms.address_order(table.names, table.addresses, seq)
    assert (order == seq).all()
    encoded = kallsyms.encode(table, order, table.addresses[order])
    assert set(encoded) >= {"kallsyms_names", "kallsyms_num_syms", "kallsyms_markers"}
    for name, data in encoded.items():
        assert image.read(table.arrays[name], len(data)) == data, name
    # Every name compresses back to its record with the kernel's own tokens.
    records = [kallsyms.compress(n, table.tokens) for n in table.names[:2000]]
    assert all(r is not None for r in records)
    expanded = ["".join(table.tokens[b] for b in r[1 + (r[0] >> 7):]) for r in records]
    assert expanded == table.names[:2000]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_random_function_layout_boots_clean(flavor, tmp_path_factory, tmp_path):
    kernel = lab_kernel(flavor)
    out, result = random_layout(flavor, kernel.vmlinux, tmp_path_factory)
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.moved_functions > 0.95 * result.rewritten > 10000, result.summary()
    assert result.fragments > 3000, result.summary()
    assert result.calls_promoted[0] > 1000, result.summary()   # (their fallbacks run)
    assert result.unnamed == 0, result.summary()   # the lab kernels reserve kallsyms room
    assert result.sympos_changed == []
    # Functions that stay (head text, memcpy_orig behind memcpy's short jump, ...)
    # get their random block orders inside their own bytes: booting proves it.
    assert result.in_place > 0, result.summary()
    moved, problems = layout_problems(kernel.vmlinux, out)
    assert moved > 10000 and problems == [], problems[:10]

    bzimage = rebuild_bzimage(kernel.build_dir, out, tmp_path / "bzImage")
    dump = tmp_path / "kallsyms.txt"
    traced = boot(bzimage, kernel.initramfs, workload="files", kaslr=True, iterations=2,
                  ftrace="function", kallsyms_to=dump)
    assert traced.ok, traced.summary() + "\n" + "\n".join(traced.log_lines[-30:])
    assert {"module:test_static_keys", "ftrace-on:function", "ftrace-off:function"} \
        <= set(traced.markers)
    checked, problems = kallsyms_problems(out, dump)
    assert checked > 20000 and problems == [], problems[:10]
    # (kallsyms_problems checked every function symbol, cold parts included; and
    # the cold parts are all there under their names)
    cold = {n for n in functions_of(ElfImage(out)) if n.endswith(".cold")}
    assert len(cold) > 0.9 * result.fragments
    assert cold <= set(read_dump(dump))

    # A new binary, a new build-id: in the ELF note and in the loaded copy the
    # running kernel shows in /sys/kernel/notes (perf and debuginfod match by it).
    before, after = build_id(ElfImage(kernel.vmlinux)), build_id(ElfImage(out))
    assert after.value != before.value
    assert result.build_id == (before.hex(), after.hex())
    assert traced.notes is not None and after.value in traced.notes
    assert before.value not in traced.notes

    plain = boot(bzimage, kernel.initramfs, workload="server", kaslr=False, iterations=2)
    assert plain.ok, plain.summary() + "\n" + "\n".join(plain.log_lines[-30:])
    assert plain.text_base == DEFAULT_TEXT


def test_verify_rejects_a_build_id_that_is_not_the_outputs(tmp_path_factory, tmp_path):
    from kbuild_bolt.rewrite.verify import verify

    kernel = lab_kernel("6.12-regular")
    out, _result = random_layout("6.12-regular", kernel.vmlinux, tmp_path_factory)
    note = build_id(ElfImage(out))
    for name, value in (("stale", build_id(ElfImage(kernel.vmlinux)).value),
                        ("wrong", bytes(b ^ 1 for b in note.value))):
        bad = tmp_path / name
        data = bytearray(out.read_bytes())
        data[note.offset:note.offset + note.size] = value
        bad.write_bytes(bytes(data))
        report = verify(bad, against=kernel.vmlinux)
        assert not report.ok
        assert [p for p in report.problems if "build-id" in p], report.problems


@pytest.mark.distro
def test_distro_random_function_layout_boots_clean(distro, tmp_path_factory, tmp_path):
    """Debian's kernel has no kallsyms room for new names: cold parts are named in
    .symtab only, and that is reported."""
    from kbuild_bolt.lab.initramfs import build_lab_initramfs

    out, result = random_layout("distro", distro.vmlinux, tmp_path_factory)
    assert result.verify_summary.startswith("verify: ok"), result.verify_summary
    assert result.moved_functions > 0.95 * result.rewritten > 20000, result.summary()
    assert result.unnamed > 0 and "kallsyms: no room" in result.summary()
    moved, problems = layout_problems(distro.vmlinux, out)
    assert moved > 20000 and problems == [], problems[:10]
    initrd = build_lab_initramfs(tmp_path / "initrd.gz")
    dump = tmp_path / "kallsyms.txt"
    outcome = boot(out, initrd, workload="files", iterations=2, memory="1G",
                   ftrace="function", kallsyms_to=dump)
    assert outcome.ok, outcome.summary() + "\n" + "\n".join(outcome.log_lines[-30:])
    # (name.cold, or name.cold.1 where GCC had split the function already)
    added = set(functions_of(ElfImage(out))) - set(functions_of(ElfImage(distro.vmlinux)))
    assert all(".cold" in n for n in added)
    checked, problems = kallsyms_problems(out, dump, missing_ok=added)
    assert checked > 30000 and problems == [], problems[:10]


def test_same_named_functions_keep_their_order(tmp_path_factory):
    """livepatch's sympos counts same-named functions by address: a layout that
    moves them keeps their order."""
    kernel = lab_kernel("6.12-regular")
    out, _result = random_layout("6.12-regular", kernel.vmlinux, tmp_path_factory)
    # .symtab keeps its symbols in their order (cold parts are added, not
    # interleaved among same names): the k-th symbol of a name is the same function.
    before, after = _by_symtab_order(kernel.vmlinux), _by_symtab_order(out)
    repeated = [n for n, v in before.items() if len(v) > 1]
    assert len(repeated) > 20
    moved = 0
    for name in repeated:
        old, new = np.array(before[name]), np.array(after[name])
        assert len(old) == len(new), name
        moved += int((old != new).any())
        assert (np.argsort(old, kind="stable") == np.argsort(new, kind="stable")).all(), name
    assert moved > 10


def _by_symtab_order(path):
    image = ElfImage(path)
    symbols = image.symbols
    sections = [image.section(n).index for n in CODE if image.section(n) is not None]
    out = {}
    for i in np.flatnonzero((symbols.type == STT_FUNC) & np.isin(symbols.shndx, sections)).tolist():
        out.setdefault(symbols.names[i], []).append(int(symbols.value[i]))
    return out
