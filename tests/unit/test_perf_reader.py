"""perf at production scale (issue 14, part 3): the chunked numpy reader of
perf script text against the line-by-line reading it replaced (kept below as
the oracle), the running _text from perf's kernel map, perf.data read through a
pipe, and ``profile merge`` folding one profile at a time."""

from __future__ import annotations

import gc
import io
import os
import random
import shutil
import subprocess
import tracemalloc
import types
import weakref

import numpy as np
import pytest

from elfkit import tools_available
from kbuild_bolt.cli import main
from kbuild_bolt.errors import KbbError
from kbuild_bolt.profile import perf
from kbuild_bolt.profile.model import Profile, _sum_pairs, combine, read_profile, write_profile
# The oracle: the reader before issue 14 part 3.
from perf_reference import TEXT, reference_read, reference_sum

RUNNING = 0xFFFFFFFF9A200000                  # a KASLR _text
# The kernel map line as perf 6.1 printed it on this machine (--show-mmap-events).
MAP_LINE = ("    0 PERF_RECORD_MMAP -1/0: [0xffffffff81000000(0x1209988) @ 0xffffffff81000000]: "
            "x [kernel.kallsyms]_text")
needs_as = pytest.mark.skipif(not tools_available(), reason="binutils (as, ld) missing")


def assert_same(expected: Profile, got: Profile):
    for name in ("range_start", "range_last", "range_count", "src", "dst", "count"):
        a, b = getattr(expected, name), getattr(got, name)
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), name
    assert (expected.source, expected.sampled) == (got.source, got.sampled)


# ---------------------------------------------------------------------------
# perf script text, the way perf prints it and the odd things around it

HEADER = ["# ========", "# captured on    : Tue Dec  1 09:21:08 2026",
          "# cmdline : /usr/bin/perf record -a -e cycles:k -j any,k -- sleep 10 ",
          "# event : name = cycles:k, , id = { 12, 13 }, type = 0, size = 136, "
          "sample_type = IP|TID|PERIOD|BRANCH_STACK, branch_sample_type = ANY|KERNEL",
          "# ========", "#"]
USER_MAP = (" 3414 PERF_RECORD_MMAP2 3414/3414: [0x7f016e801000(0x2000) @ 0 00:00 0 0]: "
            "r-xp /usr/lib/x86_64-linux-gnu/libc.so.6")


class Text:
    """Random perf script output: kernel addresses from a small pool (so pairs
    repeat), LBR stacks chained as the CPU runs (a newer record's source a little
    after the older one's target), with what perf and people add around them."""

    def __init__(self, seed: int, base: int = TEXT, pool: int = 400):
        self.r = random.Random(seed)
        self.kernel = [base + self.r.randrange(0, 1 << 20) for _ in range(pool)]

    def kaddr(self):
        return self.r.choice(self.kernel)

    def uaddr(self):
        return self.r.choice([0x7F0000000000, 0x550000000000, 0x400000, 0x10, 0]) + \
            self.r.randrange(0, 1 << 20)

    def hexa(self, value):
        text = f"{value:x}"
        return text.upper() if self.r.random() < 0.02 else text

    def record(self, src, dst):
        flag = self.r.choice("PPPPPM-")
        tail = self.r.choice(["/-/-/0 ", "/-/-/12/ ", "/-/-/3/COND/- ", "/X/A/7 ", "/-/-/1"])
        if self.r.random() < 0.02:           # not records: the line reading skips them too
            return self.r.choice([f"0x{src:x}/0x{dst:x}/PN/-/-/1/ ",
                                  f"{src:x}/0x{dst:x}/P/-/-/0/ ",
                                  f"sym+0x1a/0x{dst:x}/P/ ", f"0x{src:x}/0x{dst:x} /P/ ",
                                  f"0x0x{src:x}/0x{dst:x}/P/ ", f"0x{src:x}/0x/P/ ",
                                  f"0x{src:x}/0x{dst:x}/"])
        return f"0x{self.hexa(src)}/0x{self.hexa(dst)}/{flag}{tail}"

    def lbr_line(self, pid=True, user=True):
        depth = self.r.choice([32] * 8 + [0, 1, 2, 3, 7, 16, 31])
        records, target = [], self.kaddr()
        for _ in range(depth):               # oldest first, written newest first
            if user and self.r.random() < 0.1:
                src, dst = self.uaddr(), self.r.choice([self.uaddr(), self.kaddr()])
            else:
                k = self.r.random()
                src = (target + self.r.randrange(0, 80) if k < 0.75 else self.kaddr() if k < 0.9
                       else target + self.r.choice([4095, 4096, 4097, -1]))   # (range limits)
                dst = self.kaddr() if self.r.random() < 0.9 else src - self.r.randrange(0, 64)
            records.append(self.record(src, dst))
            target = dst
        head = (f"{self.r.randrange(0, 4194304):5d} " if pid else "") + f" {self.kaddr():16x}"
        sep = self.r.choice([" ", "  ", "\t"])
        return head + (" " + sep.join(reversed(records)) if records else "")

    def sample_line(self, pid=True):
        k = self.r.random()
        ip = self.kaddr() if k < 0.7 else self.uaddr()
        pid_text = f"{self.r.randrange(0, 4194304):5d} " if pid else ""
        if k < 0.04:
            return self.r.choice([f"\t{ip:16x} func+0x3c ([kernel.kallsyms])",
                                  f"12345678 {ip:x}", f"{ip:x}", f"  {ip:x}\t",
                                  f"123456789012345678901 {ip:x}", f"1234 {ip:x}{ip:x}",
                                  f"99 {ip:x}zz", f"{ip:x} 1234", f"abcdef01 {ip:x}",
                                  f"{'f' * 20} x", "   ", f"1234 {ip & 0xFFFFFFF:x}"])
        return f"{pid_text} {ip:16x}" + self.r.choice(["", " perf_poll", " [unknown]"])

    def write(self, path, lines=1000, lbr=True, pid=True, user=True, map_line=None,
              final_newline=True):
        out = list(HEADER)
        if map_line:
            out.append(map_line)
        for _ in range(lines):
            k = self.r.random()
            if k < 0.02:
                out.append(self.r.choice(["", "   ", USER_MAP]))
            elif lbr and k < 0.04:
                out.append(self.sample_line(pid))      # (an empty stack: ignored with LBR)
            else:
                out.append(self.lbr_line(pid, user) if lbr else self.sample_line(pid))
        path.write_text("\n".join(out) + ("\n" if final_newline else ""))
        return path


VARIANTS = [dict(), dict(pid=False), dict(user=False), dict(final_newline=False),
            dict(lbr=False), dict(lbr=False, pid=False), dict(lbr=False, final_newline=False)]


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("seed", [1, 2])
def test_same_profile_as_the_line_reading(tmp_path, variant, seed):
    path = Text(seed).write(tmp_path / "perf.txt", **VARIANTS[variant])
    for text_base in (None, RUNNING):
        for kernel_only in (True, False):
            expected = reference_read(path, text_base, kernel_only=kernel_only)
            assert expected.total > 100
            for chunk in (64, 777, 1 << 20):
                got = perf.read_perf_script(path, text_base, kernel_only=kernel_only,
                                            chunk_bytes=chunk)
                assert_same(expected, got)


def test_records_cut_by_every_chunk_boundary(tmp_path):
    """Chunk sizes that cut records, addresses and line ends at every offset:
    the unfinished line is carried, lines longer than a chunk grow the buffer."""
    path = Text(3).write(tmp_path / "perf.txt", lines=60)
    expected = reference_read(path, RUNNING)
    for chunk in range(64, 64 + 97):
        reader = perf.PerfScriptReader(RUNNING, chunk_bytes=chunk)
        with open(path, "rb") as f:
            reader.feed(f)
        assert reader.chunks > 20
        assert_same(expected, reader.profile())


def test_thunk_ways_same_as_line_reading(tmp_path):
    """Random stacks over a pool of addresses in and out of the indirect and
    return thunks: every state of ThunkWays (a way started, passed through a
    return thunk, left to the target, cut by a record from outside, cut by the
    end of the stack, a user-space target) is met, and the vectorized walk
    records the same calls as ThunkWays record by record."""
    thunk, via = TEXT + 0x800, TEXT + 0x900
    spans = ([(thunk, thunk + 32), (thunk + 32, thunk + 64)], [(via, via + 16)])
    for text_base in (None, RUNNING):
        delta = (text_base - TEXT) if text_base else 0
        r = random.Random(text_base or 5)
        inside = [thunk + 2, thunk + 40, thunk + 63, via + 1]
        pool = [a + delta for a in inside * 3 + [TEXT + 0x100 + 16 * i for i in range(8)]]
        lines = []
        for _ in range(3000):
            records = []
            for _ in range(r.randrange(0, 12)):
                src = r.choice(pool)
                dst = r.choice(pool + [0x7F0000001000])
                records.append(f"0x{src:x}/0x{dst:x}/P/-/-/1/")
            lines.append(" 1234  ffffffff81000000 " + " ".join(records))
        path = tmp_path / "thunks.txt"
        path.write_text("\n".join(lines) + "\n")
        for kernel_only in (True, False):
            expected = reference_read(path, text_base, kernel_only=kernel_only, thunks=spans)
            plain = reference_read(path, text_base, kernel_only=kernel_only)
            assert expected.count.sum() > plain.count.sum()      # (calls were followed)
            got = perf.read_perf_script(path, text_base, kernel_only=kernel_only, thunks=spans,
                                        chunk_bytes=4096)
            assert_same(expected, got)


# ---------------------------------------------------------------------------
# KASLR: the running _text from perf's kernel map

def test_running_text_from_the_kernel_map(tmp_path):
    map_line = MAP_LINE.replace("ffffffff81000000", f"{RUNNING:x}")
    path = Text(4, base=RUNNING).write(tmp_path / "perf.txt", map_line=map_line)
    assert perf.text_base_from_map_line(MAP_LINE.encode()) == TEXT      # (this machine's)
    assert perf.text_base_from_map_line(USER_MAP.encode()) is None
    reader = perf.PerfScriptReader(chunk_bytes=1000)
    with open(path, "rb") as f:
        reader.feed(f)
    assert (reader.text_base, reader.text_base_from) == (RUNNING, "perf")
    expected = reference_read(path, RUNNING)
    assert_same(expected, reader.profile())
    assert int(expected.src.min()) < TEXT + (1 << 20) <= int(expected.src.max()) + 0x1000
    # Given on the command line, the text base wins over the map.
    assert_same(reference_read(path, RUNNING + 0x1000),
                perf.read_perf_script(path, RUNNING + 0x1000))


def test_kernel_map_problems_are_one_line_errors(tmp_path):
    with pytest.raises(KbbError, match="kptr_restrict"):
        perf.text_base_from_map_line(MAP_LINE.replace("@ 0xffffffff81000000", "@ 0").encode())
    with pytest.raises(KbbError, match="_stext"):
        perf.text_base_from_map_line(MAP_LINE.replace("]_text", "]_stext").encode())
    body = Text(5).write(tmp_path / "body.txt", lines=50).read_text()
    late = tmp_path / "late.txt"
    late.write_text(body + MAP_LINE + "\n")
    with pytest.raises(KbbError, match="kernel map comes after samples"):
        perf.read_perf_script(late, thunks=([(TEXT, TEXT + 32)], []), chunk_bytes=256)
    two = tmp_path / "two.txt"
    two.write_text(MAP_LINE + "\n" + body + MAP_LINE.replace("81000000", "82000000") + "\n")
    with pytest.raises(KbbError, match="two kernel maps"):
        perf.read_perf_script(two)


# ---------------------------------------------------------------------------
# perf.data: perf script runs on it, read through a pipe

def fake_perf(tmp_path, text: str, status: int = 0):
    """An executable that prints ``text`` as perf script would, and its arguments to a file."""
    (tmp_path / "out.txt").write_text(text)
    tool = tmp_path / "perf"
    tool.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat {tmp_path}/out.txt\n"
                    f"echo 'perf: something went wrong' >&2\nexit {status}\n")
    tool.chmod(0o755)
    return str(tool)


def test_perf_data_read_through_perf_script(tmp_path):
    map_line = MAP_LINE.replace("ffffffff81000000", f"{RUNNING:x}")
    path = Text(6, base=RUNNING).write(tmp_path / "expected.txt", map_line=map_line)
    tool = fake_perf(tmp_path, path.read_text())
    reader = perf.read_perf_data(tmp_path / "perf.data", perf=tool, chunk_bytes=512)
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["script", "-i", str(tmp_path / "perf.data")]
    assert "--show-mmap-events" in args and "pid,ip,brstack" in args
    assert (reader.text_base, reader.text_base_from) == (RUNNING, "perf")
    assert_same(reference_read(path, RUNNING), reader.profile())

    tool = fake_perf(tmp_path, "", status=255)
    with pytest.raises(KbbError, match="exit status 255.*something went wrong"):
        perf.read_perf_data(tmp_path / "perf.data", perf=tool)
    with pytest.raises(KbbError, match="not found"):
        perf.read_perf_data(tmp_path / "perf.data", perf=str(tmp_path / "no-perf"))


def test_perf_data_of_this_machine(tmp_path):
    """A real perf record (cpu-clock: no PMU needed) read back with its kernel map."""
    if shutil.which("perf") is None:
        pytest.skip("perf not installed")
    data = tmp_path / "perf.data"
    rec = subprocess.run(["perf", "record", "-q", "-a", "-e", "cpu-clock", "-o", str(data), "--",
                          "sleep", "0.2"], capture_output=True)
    if rec.returncode != 0 or not data.exists():
        pytest.skip(f"perf record does not work here: {rec.stderr.decode()[-200:]}")
    with open(data, "rb") as f:
        assert perf.is_perf_data(f.read(8))
    reader = perf.read_perf_data(data)
    assert reader.text_base_from == "perf" and reader.samples > 0
    with open("/proc/kallsyms") as f:
        text = next((int(line.split()[0], 16) for line in f if line.split()[2:3] == ["_text"]), 0)
    if text:
        assert reader.text_base == text


# ---------------------------------------------------------------------------
# Bad input: one line, never a traceback

def test_bad_input(tmp_path, monkeypatch):
    with pytest.raises(KbbError, match="no such file"):
        perf.read_perf_script(tmp_path / "missing.txt")
    with pytest.raises(KbbError, match="a directory"):
        perf.read_perf_script(tmp_path)
    (tmp_path / "user.txt").write_text(" 1234  7f0000001000\n" * 10)
    with pytest.raises(KbbError, match="user.txt: no kernel samples"):
        perf.read_perf_script(tmp_path / "user.txt")
    (tmp_path / "wide.txt").write_text(" 1 ffffffff81000000 0x1ffffffff81000000/0xffffffff81000010/"
                                       "P/-/-/0/\n")
    with pytest.raises(KbbError, match="longer than 64 bits"):
        perf.read_perf_script(tmp_path / "wide.txt")
    monkeypatch.setattr(perf, "MAX_LINE_BYTES", 4096)
    (tmp_path / "binary.bin").write_bytes(bytes(range(1, 10)) * 2000)
    with pytest.raises(KbbError, match="line longer than"):
        perf.read_perf_script(tmp_path / "binary.bin", chunk_bytes=1024)


# ---------------------------------------------------------------------------
# Bounded memory

def test_memory_is_a_chunk_not_the_file(tmp_path, monkeypatch):
    """The numpy and Python memory of reading a 4 MB file in 64 KB chunks stays
    a small multiple of the chunk, and does not grow with the file: the pairs
    are folded in batches into the distinct ones."""
    monkeypatch.setattr(perf._PairCounts, "BATCH", 1 << 14)
    text = Text(7)
    lines = [text.lbr_line(user=False) for _ in range(400)]
    peaks = []
    for repeat in (10, 20):
        path = tmp_path / f"perf{repeat}.txt"
        path.write_text("\n".join(lines * repeat) + "\n")
        gc.collect()
        tracemalloc.start()
        reader = perf.PerfScriptReader(RUNNING, chunk_bytes=64 << 10)
        with open(path, "rb") as f:
            reader.feed(f)
        profile = reader.profile()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert reader.chunks > 30 and profile.count.sum() > 10 * len(profile.count)
    size = os.path.getsize(path)
    assert peaks[1] < size / 4 and peaks[1] < 1.5 * peaks[0], (peaks, size)


# ---------------------------------------------------------------------------
# Sums of pairs, and profile merge one profile at a time

def test_sum_of_pairs_matches_unique_rows():
    rng = np.random.default_rng(8)
    for span in (1 << 20, 1 << 40, 1 << 63):     # one sort key, or (a, b) sorted by lexsort
        a = (np.uint64(TEXT) + rng.integers(0, 64, 5000).astype(np.uint64)
             * np.uint64(span // 64))
        b = a + rng.integers(0, 3, 5000).astype(np.uint64)
        counts = rng.integers(-5, 50, 5000)
        for x, y in zip(_sum_pairs(a, b, counts), reference_sum(a, b, counts)):
            assert x.dtype == y.dtype and x.tolist() == y.tolist()
    empty = np.zeros(0, np.uint64)
    assert [len(x) for x in _sum_pairs(empty, empty, np.zeros(0, np.int64))] == [0, 0, 0]


def reference_combine(profiles, weights=None):
    """combine() before: every profile in memory, one merge."""
    weights = weights or [1.0] * len(profiles)
    parts = [p.scaled(w) if w != 1 else p for p, w in zip(profiles, weights)]
    r = reference_sum(np.concatenate([p.range_start for p in parts]),
                      np.concatenate([p.range_last for p in parts]),
                      np.concatenate([p.range_count for p in parts]))
    t = reference_sum(np.concatenate([p.src for p in parts]),
                      np.concatenate([p.dst for p in parts]),
                      np.concatenate([p.count for p in parts]))
    out = Profile(*r, *t, profiles[0].kernel, "+".join(sorted({p.source for p in profiles
                                                               if p.source})),
                  {k: v for p in profiles for k, v in p.shapes.items()},
                  any(p.sampled for p in profiles))
    names = set.intersection(*(set(p.stats) for p in parts))
    out.stats = {k: max(0, sum(p.stats[k] for p in parts)) for k in sorted(names)}
    keep = out.range_count > 0
    out.range_start, out.range_last, out.range_count = (out.range_start[keep],
                                                         out.range_last[keep],
                                                         out.range_count[keep])
    keep = out.count > 0
    out.src, out.dst, out.count = out.src[keep], out.dst[keep], out.count[keep]
    return out


def fleet(n: int, seed: int = 9):
    rng = np.random.default_rng(seed)
    pool = np.uint64(TEXT) + rng.integers(0, 1 << 22, 3000).astype(np.uint64)
    for i in range(n):
        size = int(rng.integers(0, 400))
        start = pool[rng.integers(0, len(pool), size)]
        yield Profile(start, start + rng.integers(0, 64, size).astype(np.uint64),
                      rng.integers(1, 100, size), pool[rng.integers(0, len(pool), size)],
                      pool[rng.integers(0, len(pool), size)], rng.integers(1, 100, size),
                      kernel="6.12.0", source=f"host{i % 3}", sampled=i == 7,
                      stats={"l1i_fetches": i, **({"l1i_misses": 1} if i != 5 else {})}).merged()


def test_streaming_merge_equals_the_merge_in_memory():
    profiles = list(fleet(40))
    weights = [1.0] * 39 + [-1.0]
    for batch in (1, 50, 1 << 22):
        for w in (None, weights):
            got = combine(iter(profiles), w, batch=batch)
            expected = reference_combine(profiles, w)
            assert_same(expected, got)
            assert (got.kernel, got.source, got.stats) == (expected.kernel, expected.source,
                                                           expected.stats)
            assert got.sampled
    assert combine(iter([])).total == 0


def test_merge_reads_one_profile_at_a_time():
    """combine() keeps no input profile once it has taken its records: with a
    small batch, only the profile being read is alive."""
    alive = set()

    def profiles():
        for i, p in enumerate(fleet(30)):
            alive.add(i)
            weakref.finalize(p, alive.discard, i)
            yield p
            gc.collect()
            assert alive <= {i}, alive

    assert combine(profiles(), batch=100).total > 0


def test_profile_merge_command(tmp_path, capsys):
    paths = []
    for i, p in enumerate(fleet(12)):
        paths.append(str(tmp_path / f"p{i}.kbb"))
        write_profile(p, paths[-1])
    assert main(["profile", "merge", *paths, "-o", str(tmp_path / "all.kbb")]) == 0
    assert "12 merged" in capsys.readouterr().out
    expected = reference_combine([read_profile(p) for p in paths])
    assert_same(expected, read_profile(tmp_path / "all.kbb"))


@needs_as
def test_profile_convert_takes_kaslr_from_perf(tmp_path, capsys, monkeypatch):
    """`profile convert` of perf script text with perf's kernel map: the offset
    is applied and said; the same with --text-base, and from standard input; a
    perf.data goes through perf."""
    from synthetic_kernel import build

    vmlinux = build(tmp_path)
    from kbuild_bolt.binary.model import BinaryModel
    model = BinaryModel.open(vmlinux, jobs=1)
    text = model.image.symbols.address("_text")
    running = text + 0x3E00000
    start = model.image.symbols.address("startup_64") - text + running
    lines = [MAP_LINE.replace("ffffffff81000000", f"{running:x}")]
    lines += [f" 1234  {start:x} 0x{start + 8:x}/0x{start:x}/P/-/-/1/  "
              f"0x{start + 4:x}/0x{start + 2:x}/P/-/-/1/"] * 5
    (tmp_path / "perf.txt").write_text("\n".join(lines) + "\n")
    assert main(["profile", "convert", str(tmp_path / "perf.txt"), "--vmlinux", str(vmlinux),
                 "-o", str(tmp_path / "a.kbb")]) == 0
    err = capsys.readouterr().err
    assert f"running _text {running:#x} (from perf's kernel map), KASLR offset 0x3e00000" in err
    assert main(["profile", "convert", str(tmp_path / "perf.txt"), "--vmlinux", str(vmlinux),
                 "--text-base", f"{running:x}", "-o", str(tmp_path / "b.kbb")]) == 0
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(
        buffer=io.BufferedReader(io.BytesIO((tmp_path / "perf.txt").read_bytes()))))
    assert main(["profile", "convert", "-", "--vmlinux", str(vmlinux), "-o",
                 str(tmp_path / "c.kbb")]) == 0
    assert "from perf's kernel map" in capsys.readouterr().err
    a, b = read_profile(tmp_path / "a.kbb"), read_profile(tmp_path / "b.kbb")
    assert_same(a, b)
    assert_same(a, read_profile(tmp_path / "c.kbb"))
    assert a.range_start.tolist() == [text + (start - running) + 2]
    (tmp_path / "bad.data").write_bytes(b"PERFILE2" + bytes(64))
    assert main(["profile", "convert", str(tmp_path / "bad.data"), "--vmlinux", str(vmlinux),
                 "-o", str(tmp_path / "d.kbb")]) == 2
    assert "perf script -i" in capsys.readouterr().err


def test_convert_refuses_counts_that_miss_the_code_when_kaslr_is_unknown(tmp_path, capsys):
    """perf text with no kernel map and no --text-base/--kallsyms: the link address
    is assumed and checked; a KASLR-moved run lands off the code and is refused."""
    from synthetic_kernel import build
    from kbuild_bolt.binary.model import BinaryModel

    vmlinux = build(tmp_path)
    model = BinaryModel.open(vmlinux, jobs=1)
    addrs = [int(a) for a in model.insns.addr[:50]]
    for name, shift in (("at-link.txt", 0), ("moved.txt", 0x3E00000)):
        (tmp_path / name).write_text("".join(f" 1234  {a + shift:x}\n" for a in addrs) * 3)
    assert main(["profile", "convert", str(tmp_path / "at-link.txt"), "--vmlinux", str(vmlinux),
                 "-o", str(tmp_path / "a.kbb")]) == 0
    capsys.readouterr()
    assert main(["profile", "convert", str(tmp_path / "moved.txt"), "--vmlinux", str(vmlinux),
                 "-o", str(tmp_path / "b.kbb")]) == 2
    err = capsys.readouterr().err
    assert "KASLR?" in err and "--kallsyms" in err and not (tmp_path / "b.kbb").exists()
