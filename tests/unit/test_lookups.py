"""Whole-kernel lookups that have a fast path for many sorted addresses: they
must answer exactly as the plain binary search does."""

import numpy as np
import pytest

from kbuild_bolt.binary.functions import FunctionTable
from kbuild_bolt.x86 import decode as x86


def _functions(rng, n):
    start = np.unique(rng.integers(0, 50 * n, n)).astype(np.uint64)
    # sizes: some zero, some overlapping the next function, most ending before it
    size = rng.choice([0, 1, 5, 40, 400], len(start)).astype(np.uint64)
    return FunctionTable(start, start + size, np.zeros(len(start), np.int32),
                         np.arange(len(start)), [f"f{i}" for i in range(len(start))])


@pytest.mark.parametrize("seed", range(5))
def test_rows_containing_many_sorted_addresses_is_find(seed):
    rng = np.random.default_rng(seed)
    functions = _functions(rng, 200)
    addrs = np.sort(rng.integers(0, 50 * 220, 5000)).astype(np.uint64)   # the fast path
    got = functions.rows_containing(addrs)
    assert got.tolist() == [functions.find(int(a)) for a in addrs]
    few = addrs[::-40][:20]                                  # unsorted, few: the search
    assert functions.rows_containing(few).tolist() == [functions.find(int(a)) for a in few]
    assert 0 < (got >= 0).sum() < len(got)


def _decoded(addrs, tag):
    n = len(addrs)
    return x86.Decoded(np.asarray(addrs, np.uint64), np.full(n, tag, np.uint8),
                       np.zeros(n, np.uint8), np.zeros(n, np.uint64), np.zeros(n, np.uint8),
                       np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(n, bool))


@pytest.mark.parametrize("sizes", [(3, 40), (40, 3), (20, 20)])
def test_merge_keeps_address_order_and_a_first_at_equal_addresses(sizes):
    rng = np.random.default_rng(sum(sizes))
    a_addr = np.sort(rng.integers(0, 60, sizes[0]))
    b_addr = np.sort(np.concatenate([rng.integers(0, 60, sizes[1] - 1), a_addr[:1]]))
    merged = x86.Decoded.merge(_decoded(a_addr, 1), _decoded(b_addr, 2))
    expected = sorted([(a, 0) for a in a_addr.tolist()] + [(b, 1) for b in b_addr.tolist()])
    assert merged.addr.tolist() == [a for a, _ in expected]
    assert merged.length.tolist() == [1 if k == 0 else 2 for _, k in expected]


@pytest.mark.parametrize("seed", range(4))
def test_instruction_lookups_answer_as_a_walk_over_the_instructions(seed):
    """insn_containing and is_boundary work from starts and lengths (no column of
    ends): the same answers as looking at every instruction."""
    from types import SimpleNamespace

    from kbuild_bolt.binary.model import BinaryModel

    rng = np.random.default_rng(seed)
    # runs of back-to-back instructions with gaps between the runs
    length = rng.integers(1, 8, 400).astype(np.uint8)
    gap = np.where(rng.random(400) < 0.1, rng.integers(1, 20, 400), 0)
    addr = (1000 + np.cumsum(length.astype(np.int64) + gap) - length).astype(np.uint64)
    insns = x86.Decoded(addr, length, *(np.zeros(400, t) for t in
                                         (np.uint8, np.uint64, np.uint8, np.uint8, np.uint8,
                                          bool)))
    model = SimpleNamespace(insns=insns)
    for name in ("insn_index", "insn_containing", "in_int3_run", "is_int3_run"):
        setattr(model, name, (lambda f: lambda *a: f(model, *a))(getattr(BinaryModel, name)))
    probe = np.arange(990, int(addr[-1]) + 12, dtype=np.uint64)
    spans = list(zip(addr.tolist(), (addr + length).tolist()))
    containing = [next((k for k, (a, b) in enumerate(spans) if a <= p < b), -1)
                  for p in probe.tolist()]
    boundary = [any(p in (a, b) for a, b in spans) for p in probe.tolist()]
    assert BinaryModel.insn_containing(model, probe).tolist() == containing
    assert BinaryModel.is_boundary(model, probe).tolist() == boundary


def test_int3_fill_is_one_record_per_run_of_up_to_255_bytes():
    """A range of int3 fill is its first byte (what a label names), then records
    of at most FILL_RECORD bytes that tile it exactly (not a record per byte); a
    range with any other byte, or too short to be padding, is left to the decoder."""
    from types import SimpleNamespace

    from kbuild_bolt.binary.model import FILL_RECORD, _split_int3_fill

    data = np.full(0x1000, 0xCC, np.uint8)
    data[0x800] = 0x90                                   # a nop inside the second range
    section = SimpleNamespace(offset=0, addr=0x10000)
    image = SimpleNamespace(bytes=data, sections=[section])
    ranges = [(0, 0x10000, 0x10000 + 600), (0, 0x10700, 0x10900), (0, 0x10a00, 0x10a0a),
              (0, 0x10b00, 0x10b00 + FILL_RECORD)]
    fill, rest = _split_int3_fill(image, ranges)
    assert rest == [ranges[1], ranges[2]]
    assert fill.addr.tolist() == [0x10000, 0x10001, 0x10001 + 255, 0x10001 + 510, 0x10b00,
                                  0x10b01]
    assert fill.length.tolist() == [1, 255, 255, 89, 1, 254]
    assert set(fill.flow.tolist()) == {x86.INTERRUPT} and not np.asarray(fill.ref).any()
    assert not fill.field_size.any() and not fill.invalid.any()


def test_every_byte_of_a_run_of_int3_fill_is_an_instruction_boundary():
    """A run of int3 kept as one record: each of its bytes starts an instruction
    (a table entry may name one), a record that is not int3 fill keeps its inside."""
    from types import SimpleNamespace

    from kbuild_bolt.binary.model import BinaryModel

    base = 0x1000
    memory = np.full(0x400, 0x90, np.uint8)
    memory[0x10:0x10 + 300] = 0xCC
    memory[0x200:0x202] = [0xCD, 0x80]                   # int $0x80: two bytes, not fill
    # nop, a run of 255 + 45 int3, a 5-byte nop, int $0x80
    addr = np.array([0, 0x10, 0x10 + 255, 0x13c, 0x200], np.uint64) + np.uint64(base)
    length = np.array([1, 255, 45, 5, 2], np.uint8)
    flow = np.array([x86.NEXT, x86.INTERRUPT, x86.INTERRUPT, x86.NEXT, x86.INTERRUPT], np.uint8)
    n = len(addr)
    insns = x86.Decoded(addr, length, flow, np.zeros(n, np.uint64), np.zeros(n, np.uint8),
                        np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(n, bool))
    model = SimpleNamespace(insns=insns)
    model.read_bytes = lambda a, count: np.stack(
        [memory[np.asarray(a, np.int64) - base + k] for k in range(count)], axis=1)
    for name in ("insn_index", "insn_containing", "in_int3_run", "is_int3_run"):
        setattr(model, name, (lambda f: lambda *a: f(model, *a))(getattr(BinaryModel, name)))
    probe = np.arange(base, base + 0x210, dtype=np.uint64)
    run = (probe > base + 0x10) & (probe < base + 0x10 + 300) & (probe != base + 0x10 + 255)
    assert BinaryModel.in_int3_run(model, probe).tolist() == run.tolist()
    assert BinaryModel.is_int3_run(model, np.arange(n)).tolist() == [False, True, True, False,
                                                                      False]
    boundary = BinaryModel.is_boundary(model, probe)
    assert boundary[(probe >= base + 0x10) & (probe <= base + 0x10 + 300)].all()
    assert not boundary[(probe > base + 0x13c) & (probe < base + 0x141)].any()   # inside the nop
    assert not boundary[probe == base + 0x201].any()                            # inside int $0x80


def _symbol_table(entries):
    """A SymbolTable of (name, value, global) entries."""
    from kbuild_bolt.elf.image import SYM
    from kbuild_bolt.elf.symbols import SymbolTable

    strtab = bytearray(b"\0")
    raw = np.zeros(len(entries), SYM)
    for k, (name, value, is_global) in enumerate(entries):
        raw[k] = (len(strtab), (int(is_global) << 4) | 2, 0, 1, value, 1)
        strtab += name.encode() + b"\0"
    return SymbolTable(raw, strtab)


def test_kallsyms_check_finds_each_name_at_its_address_among_all_of_that_name():
    """Verification's kallsyms check: static functions share names (each entry
    must match one of them, not the one the name index gives), per-cpu entries
    are not addresses, and an entry no symbol backs is reported."""
    from types import SimpleNamespace

    from kbuild_bolt.rewrite.verify import _kallsyms_problems

    symbols = _symbol_table([("dup", 0x100, False), ("dup", 0x200, False),
                             ("dup", 0x300, True), ("solo", 0x400, False),
                             ("moved", 0x500, True)])
    out = SimpleNamespace(image=SimpleNamespace(symbols=symbols))

    def table(entries, absolute=None, bare=False):
        # (as read for a new layout: names with their type; to check: bare names)
        return SimpleNamespace(names=None if bare else ["t" + n for n, _ in entries],
                               bare_names=[n for n, _ in entries] if bare else None,
                               count=len(entries),
                               addresses=np.array([a for _, a in entries], np.uint64),
                               absolute=None if absolute is None else np.array(absolute))

    good = [("dup", 0x100), ("dup", 0x200), ("dup", 0x300), ("solo", 0x400), ("moved", 0x500)]
    assert _kallsyms_problems(out, table(good)) == (5, [])
    bad = [("dup", 0x100), ("dup", 0x250), ("solo", 0x400), ("moved", 0x480), ("gone", 0x490)]
    count, problems = _kallsyms_problems(out, table(bad))
    assert [p.split(" at ")[0] for p in problems[:3]] == ["dup", "moved", "gone"]
    assert _kallsyms_problems(out, table(bad, bare=True)) == (count, problems)
    assert _kallsyms_problems(out, table(good, bare=True)) == (5, [])
    assert "entry 4 lies below the one before it" not in problems   # (0x480 < 0x490)
    # A per-cpu entry is an offset, not a symbol's address.
    percpu = [("dup", 0x100), ("pcpu_var", 0x8), ("solo", 0x400)]
    assert _kallsyms_problems(out, table(percpu, [False, True, False]))[1] == []
    assert _kallsyms_problems(out, table(percpu))[1][0].startswith("pcpu_var at 0x8")
    # Out of address order.
    swapped = [("solo", 0x400), ("dup", 0x100)]
    assert "entry 1 lies below the one before it" in _kallsyms_problems(out, table(swapped))[1]


def test_symbols_named_and_by_prefix_are_the_names_compared():
    """SymbolTable.named (by key, then compared) and names_start_with (in the
    string table) say what comparing every decoded name says: repeated names,
    names that are prefixes or tails of others (a shared string table tail),
    non-ASCII names, absent names and the empty set."""
    from kbuild_bolt.elf.image import SYM
    from kbuild_bolt.elf.symbols import SymbolTable

    names = ["dup", "dup", "__pfx_dup", "du", "dupe", "x_dup", "café", "", "__cfi_a",
             "__pfx_", "__pf", "__pfx_dup_a", "__pfx_dup_b", "__pfx_dup_ab"]
    strtab = bytearray(b"\0")
    raw = np.zeros(len(names) + 1, SYM)
    for k, name in enumerate(names):
        raw[k] = (len(strtab), 2, 0, 1, 0x100 * k, 1)
        strtab += name.encode() + b"\0"
    raw[-1] = (strtab.index(b"dup\0", 10), 2, 0, 1, 0, 1)    # (the tail of __pfx_dup)
    symbols = SymbolTable(raw, strtab)
    every = symbols.names
    assert every[-1] == "dup"
    for wanted in ({"dup"}, {"du", "café"}, {"nothing"}, set(), {"", "x_dup"},
                   {"__pfx_dup_a"}, {"__pfx_dup_c", "__pfx_dup_ab"}):
        assert symbols.named(wanted).tolist() == [n in wanted for n in every]
        # (before the names are decoded, and after)
        assert SymbolTable(raw, strtab).named(wanted).tolist() == [n in wanted for n in every]
    for prefixes in (("__pfx_", "__cfi_"), ("dup",), ("du", "x"), ("dup\0",)):
        assert symbols.names_start_with(prefixes).tolist() == \
            [n.startswith(prefixes) if "\0" not in prefixes[0] else n == prefixes[0][:-1]
             for n in every]


def test_symbol_names_and_the_name_index_as_read_one_by_one():
    """Names read by one split of the string table are each symbol's string
    read on its own (names starting a string, tails the linker shares, empty
    names, an offset past the table), and the name index gives a global before
    locals of the same name, and among equals the first."""
    from kbuild_bolt.elf.image import SYM
    from kbuild_bolt.elf.symbols import SymbolTable

    rng = np.random.default_rng(3)
    words = ["a", "ab", "b_ab", "dup", "x", "tail_dup", "", "pfx_a"]
    strtab = bytearray(b"\0")
    at = {}
    for w in words[:6] + ["pfx_a"]:
        at[w] = len(strtab)
        strtab += w.encode() + b"\0"
    offsets = [at["a"], at["ab"], at["b_ab"] + 2, at["dup"], at["tail_dup"] + 5, 0,
               at["pfx_a"] + 4, at["x"], len(strtab) + 7, at["dup"], at["dup"]]
    raw = np.zeros(len(offsets) * 4, SYM)
    for k in range(len(raw)):
        raw[k] = (offsets[rng.integers(len(offsets))], int(rng.integers(3)) << 4, 0, 1, k, 1)
    symbols = SymbolTable(raw, strtab)

    def one(o):
        return bytes(strtab[o:]).split(b"\0", 1)[0].decode() if o < len(strtab) else ""

    assert symbols.names == [one(int(o)) for o in raw["name"]]
    wanted = sorted(set(symbols.names)) + ["nothing"]
    expect = []
    for name in wanted:
        rows = [i for i, n in enumerate(symbols.names) if n == name]
        globals_ = [i for i in rows if raw["info"][i] >> 4]
        expect.append((globals_ or rows)[0] if rows and name else -1)
    # Looked up by keys (a few names), then through the name index (many).
    fresh = SymbolTable(raw, strtab)
    assert fresh.rows_of(wanted).tolist() == expect
    assert [fresh.index(n) for n in wanted] == [None if e < 0 else e for e in expect]
    assert "_index_by_name" not in fresh.__dict__
    for _ in range(300):
        fresh.index("dup")
    assert "_index_by_name" in fresh.__dict__
    assert [fresh.index(n) for n in wanted] == [None if e < 0 else e for e in expect]
    assert fresh.rows_of(wanted).tolist() == expect


def test_name_keys_are_the_keys_of_the_names():
    """Keys taken from the string table in bulk are name_key of each decoded
    name: short and long names, names sharing their first eight bytes, tails,
    an empty name, an offset past the table, and (decoded with replacements)
    a table that is not ASCII."""
    from kbuild_bolt.elf.image import SYM
    from kbuild_bolt.elf.symbols import SymbolTable, name_key

    words = ["a", "abcdefgh", "abcdefghi", "abcdefghj", "__pfx_do_fork", "", "x" * 40]
    for extra in (b"", "café".encode(), b"bad\xff"):
        strtab = bytearray(b"\0")
        offsets = []
        for w in [w.encode() for w in words] + ([extra] if extra else []):
            offsets.append(len(strtab))
            strtab += w + b"\0"
        offsets += [offsets[1] + 3, len(strtab) + 5, 0]
        raw = np.zeros(len(offsets), SYM)
        raw["name"] = offsets
        symbols = SymbolTable(raw, strtab)
        assert symbols.name_keys.tolist() == [name_key(n) for n in symbols.names]
        # (one key for both: found apart by comparing the names)
        assert symbols.name_keys[2] == symbols.name_keys[3]
        for name in symbols.names:
            row = SymbolTable(raw, strtab).index(name)
            assert row is not None and symbols.names[row] == name if name else row is None


def test_sympos_changes_are_the_names_whose_functions_changed_order():
    """livepatch's sympos: the names of same-named functions whose order by
    address a layout changed. Names that share their key (first eight bytes and
    length) but not their text are not one group."""
    from types import SimpleNamespace

    from kbuild_bolt.rewrite.engine import sympos_changes

    entries = [("dup", 0x100, False), ("abcdefghX", 0x200, False), ("dup", 0x300, False),
               ("abcdefghY", 0x400, False), ("solo", 0x500, True), ("kept", 0x600, False),
               ("kept", 0x700, False), ("abcdefghX", 0x800, False)]
    symbols = _symbol_table(entries)
    ctx = SimpleNamespace(model=SimpleNamespace(image=SimpleNamespace(symbols=symbols)))
    values = symbols.value.copy()
    ctx.symbol_values = values
    assert sympos_changes(ctx) == []
    values = symbols.value.copy()
    values[[0, 2]] = values[[2, 0]]          # the two "dup" swap places
    values[3] = 0x900                        # alone of its name: no rank to change
    values[[1, 7]] = [0x810, 0x820]          # still in their order
    ctx.symbol_values = values
    assert sympos_changes(ctx) == ["dup"]
    values[[1, 7]] = [0x820, 0x810]
    assert sympos_changes(ctx) == ["dup", "abcdefghX"]     # (in the order of the symbols)
