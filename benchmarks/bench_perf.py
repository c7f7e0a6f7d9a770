"""Benchmark: perf script text to a profile at production scale (issue 14, part 3).

    .venv/bin/python benchmarks/bench_perf.py [--records 50e6] [--old-records 5e6]
                                              [--profiles 100] [--keep DIR]

Generates, in a temporary directory:

- ``perf script -F pid,ip,brstack`` text as perf 6.1 prints it (``%5d``
  pid, ``%16lx`` ip, records `` 0xFROM/0xTO/P/-/-/CYCLES/ ``), 32 records a
  sample (some shorter stacks), newest first, chained the way LBR stacks are:
  the newer record's source lies a little after the older record's target
  (fall-through code), 1 in 5 records a call, return or interrupt to a branch
  site picked by a Zipf law over 1 M sites in a 30 MB kernel text;
- the no-LBR form (``-F pid,ip``: one address a line, ~20% user space);
- 100 kbuild-bolt profiles of one kernel on a "fleet" of hosts (write_fleet).

Then times, each in a child process whose peak RSS is measured (wait4):
the chunked reader (``read_perf_script``), the line-by-line regular-expression
reader it replaced (tests/perf_reference.py's ``reference_read``, run on a prefix of
``--old-records`` records and compared on that prefix with the new one),
``profile merge`` of the 100 profiles, and perf2bolt-22 where it can run.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from kbuild_bolt.profile.model import Profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import measure  # noqa: E402
# The reader before (the tests' oracle too)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from perf_reference import reference_read, reference_sum  # noqa: E402

KASLR_TEXT = 0xFFFFFFFF9A200000     # a runtime _text (KASLR on)
LINK_TEXT = 0xFFFFFFFF81000000
TEXT_BYTES = 30 << 20
SITES = 1 << 20
_HEXDIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


# ---------------------------------------------------------------------------
# Input

def _hex16(values: np.ndarray) -> np.ndarray:
    """n x 16 ASCII hex digits of uint64 values."""
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    return _HEXDIGITS[((values[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]


def _decimal(values: np.ndarray, width: int, pad: int) -> np.ndarray:
    """n x width ASCII decimal digits, right-aligned, ``pad`` before."""
    out = np.full((len(values), width), pad, np.uint8)
    v = values.astype(np.int64).copy()
    for col in range(width - 1, -1, -1):
        digit = (v % 10).astype(np.uint8) + ord("0")
        out[:, col] = np.where((v > 0) | (col == width - 1), digit, out[:, col])
        v //= 10
    return out


class Kernel:
    """Branch sites of a synthetic 30 MB kernel text, each with a target."""

    def __init__(self, rng):
        self.sites = np.sort(rng.choice(TEXT_BYTES, SITES, replace=False)).astype(np.uint64) \
            + np.uint64(KASLR_TEXT)
        self.targets = self.sites[rng.integers(0, SITES, SITES)] + \
            rng.integers(1, 64, SITES).astype(np.uint64)
        weights = 1.0 / np.arange(1, SITES + 1) ** 1.1
        self.popular = rng.permutation(SITES)
        self.cdf = np.cumsum(weights / weights.sum())

    def pick(self, rng, n):
        return self.popular[np.minimum(np.searchsorted(self.cdf, rng.random(n)), SITES - 1)]


def write_brstack(path: str, records: int, seed: int = 14, chunk_lines: int = 20_000) -> int:
    """perf script -F pid,ip,brstack text with about ``records`` records; returns how many."""
    rng = np.random.default_rng(seed)
    kernel = Kernel(rng)
    slot = 48                                   # " 0x" 16 "/0x" 16 "/F/-/-/" ccc "/ "
    written = 0
    with open(path, "wb") as f:
        while written < records:
            lines = min(chunk_lines, (records - written) // 32 + 1)
            depth = np.where(rng.random(lines) < 0.9, 32, rng.integers(1, 32, lines))
            # Oldest first: each newer record starts a little after the older one's target.
            site = kernel.pick(rng, lines)
            src = np.empty((lines, 32), np.uint64)
            dst = np.empty((lines, 32), np.uint64)
            for col in range(31, -1, -1):
                src[:, col] = kernel.sites[site]
                dst[:, col] = kernel.targets[site]
                after = np.minimum(np.searchsorted(kernel.sites, kernel.targets[site]), SITES - 1)
                jump = rng.random(lines) < 0.2
                site = np.where(jump, kernel.pick(rng, lines), after)
            body = np.full((lines, 32, slot), 0xFF, np.uint8)       # 0xFF: removed below
            body[:, :, 0:3] = np.frombuffer(b" 0x", np.uint8)
            body[:, :, 3:19] = _hex16(src.ravel()).reshape(lines, 32, 16)
            body[:, :, 19:22] = np.frombuffer(b"/0x", np.uint8)
            body[:, :, 22:38] = _hex16(dst.ravel()).reshape(lines, 32, 16)
            body[:, :, 38] = ord("/")
            body[:, :, 39] = np.frombuffer(b"PPPPPPPM-", np.uint8)[rng.integers(0, 9, (lines, 32))]
            body[:, :, 40:45] = np.frombuffer(b"/-/-/", np.uint8)
            cycles = rng.geometric(0.05, (lines, 32)).clip(1, 999)
            body[:, :, 45:48] = _decimal(cycles.ravel(), 3, 0xFF).reshape(lines, 32, 3)
            tail = np.full((lines, 32, 2), 0xFF, np.uint8)
            tail[:, :, :] = np.frombuffer(b"/ ", np.uint8)
            body = np.concatenate([body, tail], axis=2)
            body[np.arange(32)[None, :] >= depth[:, None]] = 0xFF    # shorter stacks
            head = np.full((lines, 23), ord(" "), np.uint8)
            head[:, 0:5] = _decimal(rng.integers(1, 99999, lines), 5, ord(" "))
            head[:, 7:23] = _hex16(src[:, 0] + np.uint64(2))
            line = np.concatenate([head, body.reshape(lines, -1),
                                   np.full((lines, 1), ord("\n"), np.uint8)], axis=1)
            f.write(line[line != 0xFF].tobytes())
            written += int(depth.sum())
    return written


def write_samples(path: str, samples: int, seed: int = 15) -> int:
    """perf script -F pid,ip text (no LBR): ``samples`` lines."""
    rng = np.random.default_rng(seed)
    kernel = Kernel(rng)
    with open(path, "wb") as f:
        for start in range(0, samples, 1_000_000):
            n = min(1_000_000, samples - start)
            ips = kernel.sites[kernel.pick(rng, n)]
            user = rng.random(n) < 0.2
            ips[user] = np.uint64(0x7F0000000000) + rng.integers(0, 1 << 32, int(user.sum()),
                                                                   dtype=np.uint64)
            line = np.full((n, 24), ord(" "), np.uint8)
            line[:, 0:5] = _decimal(rng.integers(1, 99999, n), 5, ord(" "))
            digits = _hex16(ips)
            digits[user, :4] = ord(" ")            # (user addresses: 12 digits, right-aligned)
            line[:, 7:23] = digits
            line[:, 23] = ord("\n")
            f.write(line.tobytes())
    return samples


def copy_prefix(path: str, out: str, nbytes: int) -> None:
    """The whole lines of the first ``nbytes`` of a file (streamed: the parent
    stays small)."""
    with open(path, "rb") as f, open(out, "wb") as o:
        while nbytes > 0:
            block = f.read(min(nbytes, 1 << 20))
            if not block:
                break
            nbytes -= len(block)
            o.write(block if nbytes > 0 else block[:block.rfind(b"\n") + 1])


# ---------------------------------------------------------------------------
# The reader kbuild-bolt had before issue 14 part 3 (the baseline)

def old_merged(profile):
    """Profile.merged() as it was: np.unique over (a, b) rows."""
    out = Profile(source=profile.source, sampled=profile.sampled, kernel=profile.kernel)
    if len(profile.range_start):
        out.range_start, out.range_last, out.range_count = reference_sum(
            profile.range_start, profile.range_last, profile.range_count)
    if len(profile.src):
        out.src, out.dst, out.count = reference_sum(profile.src, profile.dst, profile.count)
    return out


def old_merge(paths: list[str], output: str) -> None:
    """profile merge as it was: every profile read into memory, then one merge."""
    from kbuild_bolt.profile.model import read_profile, write_profile
    profiles = [read_profile(p) for p in paths]
    total = old_merged(Profile(*(np.concatenate([getattr(p, name) for p in profiles])
                                 for name in ("range_start", "range_last", "range_count", "src",
                                              "dst", "count")), kernel=profiles[0].kernel,
                               source="perf-lbr"))
    write_profile(total, output)


# ---------------------------------------------------------------------------
# Child processes: everything big runs in one, so that each measured process
# starts from this small parent (ru_maxrss counts the parent's memory at the fork)

def child(args) -> int:
    if args.child == "generate":
        kind, count = args.input.split(":")
        made = {"lbr": write_brstack, "samples": write_samples}[kind](args.output, int(count))
        print(f"made {made}")
        return 0
    if args.child == "fleet":
        write_fleet(args.output, int(args.input))
        return 0
    if args.child == "old-merge":
        old_merge(sorted(glob.glob(os.path.join(args.input, "*.kbb"))), args.output)
        return 0
    from kbuild_bolt.profile.model import write_profile
    from kbuild_bolt.profile.perf import read_perf_data, read_perf_script

    started = time.perf_counter()
    if args.child == "new":
        profile = read_perf_script(args.input, text_base=KASLR_TEXT, vmlinux_text=LINK_TEXT)
    elif args.child == "perf-data":
        reader = read_perf_data(args.input)
        profile = reader.profile()
        print(f"samples {reader.samples} records {reader.records} kernel {profile.total}")
    else:
        profile = reference_read(args.input, KASLR_TEXT, LINK_TEXT)
    seconds = time.perf_counter() - started
    write_profile(profile, args.output)
    print(f"seconds {seconds:.3f} ranges {len(profile.range_start)} transfers {len(profile.src)}")
    return 0


def timed(command: list[str]):
    """(the run, the seconds the child measured itself: reading only)."""
    run = measure(command)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.output[-3000:]}")
    inner = re.search(r"seconds ([\d.]+)", run.output)
    return run, float(inner.group(1)) if inner else run.seconds


def write_fleet(directory: str, profiles: int, picks: int = 300_000) -> list[str]:
    """Profiles of one kernel on many hosts: 300 k LBR records each, 70% from
    the fleet's common hot paths, 30% from the host's own; a record's range and
    transfer follow from the code (the block after a branch target ends at the
    next branch site), so hosts share records as real ones do."""
    from kbuild_bolt.profile.model import write_profile
    rng = np.random.default_rng(16)
    kernel = Kernel(rng)
    after = np.minimum(np.searchsorted(kernel.sites, kernel.targets), SITES - 1)
    paths = []
    for i in range(profiles):
        own = rng.permutation(SITES)
        site = kernel.pick(rng, picks)
        mine = rng.random(picks) < 0.3
        site[mine] = own[site[mine]]
        start, last = kernel.targets[site], kernel.sites[after[site]]
        ok = (last >= start) & (last - start <= np.uint64(4096))
        profile = Profile(start[ok], last[ok], np.ones(int(ok.sum()), np.int64),
                          kernel.sites[site], kernel.targets[site], np.ones(picks, np.int64),
                          kernel="6.12.0", source="perf-lbr").merged()
        paths.append(os.path.join(directory, f"host{i:03d}.kbb"))
        write_profile(profile, paths[-1])
    return paths


def perf2bolt_runs(me: list[str], tmp: str) -> list[str]:
    """perf2bolt-22 and kbuild-bolt on the same perf.data files of this machine
    (cpu-clock: no LBR here): one of the kernel (perf2bolt given Debian's
    6.1 distro vmlinux, the kernel here has no vmlinux), one of a user-space
    program (perf2bolt given its library)."""
    tool = shutil.which("perf2bolt-22") or "/usr/lib/llvm-22/bin/perf2bolt"
    if not os.path.exists(tool):
        return ["perf2bolt-22 is not installed"]
    lines = []
    kernel_data, user_data = os.path.join(tmp, "kernel.data"), os.path.join(tmp, "user.data")
    workloads = [(kernel_data, ["-a", "--", "dd", "if=/dev/zero", "of=/dev/null", "bs=16",
                                "count=3000000"]),
                 (user_data, ["--", sys.executable, "-c",
                              "s = 0\nfor i in range(30_000_000): s += i * i"])]
    for data, command in workloads:
        rec = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-c", "20000", "-o",
                              data, *command], capture_output=True, text=True)
        if rec.returncode != 0:
            return [f"perf record failed: {rec.stderr.strip()[-200:]}"]
    vmlinux = next(iter(sorted(glob.glob(os.path.expanduser(
        "~/.cache/kbuild-bolt/distro/*/vmlinux-*")))), None)
    library = next(iter(sorted(glob.glob(os.path.join(sys.base_prefix, "lib",
                                                      "libpython3*.so*")))), None)
    for data, binary in ((kernel_data, vmlinux), (user_data, library)):
        ours, _ = timed(me + ["--child", "perf-data", "--input", data, "--output",
                              os.path.join(tmp, "perf-data.kbb")])
        lines.append(f"kbuild-bolt read_perf_data {os.path.basename(data)}: {ours.seconds} s, "
                     f"{ours.peak_rss_mb} MB; {ours.output.strip().splitlines()[0]}")
        if binary is None:
            lines.append(f"perf2bolt: no binary for {os.path.basename(data)}")
            continue
        run = measure([tool, "-p", data, "--ba", "--ignore-build-id", "-o",
                       os.path.join(tmp, "out.fdata"), binary])
        said = [line for line in run.output.splitlines()
                if re.search(r"PID\(s\)|basic samples|wrote|ERROR", line)]
        lines.append(f"`perf2bolt-22 -p {os.path.basename(data)} --ba {binary}`: exit "
                     f"{run.returncode}, {run.seconds} s, {run.peak_rss_mb} MB: "
                     + " | ".join(said))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=float, default=50e6)
    parser.add_argument("--old-records", type=float, default=3e6)
    parser.add_argument("--samples", type=float, default=50e6)
    parser.add_argument("--profiles", type=int, default=100)
    parser.add_argument("--keep", help="generate into this directory and keep it")
    parser.add_argument("--child", choices=("new", "old", "generate", "fleet", "perf-data",
                                            "old-merge"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    me = [sys.executable, os.path.abspath(__file__)]
    tmp = args.keep or tempfile.mkdtemp(prefix="bench-perf-")
    os.makedirs(tmp, exist_ok=True)
    try:
        for kind, count, old_count in (("lbr", int(args.records), int(args.old_records)),
                                       ("samples", int(args.samples), int(args.old_records))):
            text = os.path.join(tmp, f"{kind}.txt")
            started = time.perf_counter()
            made = measure(me + ["--child", "generate", "--input", f"{kind}:{count}",
                                 "--output", text])
            count = int(made.output.split()[-1])
            unit = "branch records" if kind == "lbr" else "samples"
            print(f"{kind}: generated {count:,} {unit}, {os.path.getsize(text) / 1e9:.2f} GB in "
                  f"{time.perf_counter() - started:.0f} s")
            run, inner = timed(me + ["--child", "new", "--input", text, "--output",
                                     os.path.join(tmp, f"{kind}.kbb")])
            print(f"  new reader: {count / inner / 1e6:.2f} M {unit}/s "
                  f"({os.path.getsize(text) / inner / 1e6:.0f} MB/s, {inner:.1f} s; "
                  f"the process {run.seconds} s), peak RSS {run.peak_rss_mb} MB; "
                  f"{run.output.strip()}")
            prefix = os.path.join(tmp, f"{kind}-prefix.txt")
            copy_prefix(text, prefix, int(os.path.getsize(text) * old_count / count))
            os.remove(text)
            with open(prefix) as f:
                prefix_count = sum(line.count("/0x") if kind == "lbr" else 1 for line in f)
            outputs = []
            for reader in ("old", "new"):
                outputs.append(os.path.join(tmp, f"{kind}-{reader}-prefix.kbb"))
                run, inner = timed(me + ["--child", reader, "--input", prefix, "--output",
                                         outputs[-1]])
                print(f"  {reader} reader, first {prefix_count:,} {unit}: "
                      f"{prefix_count / inner / 1e6:.3f} M/s ({inner:.1f} s), "
                      f"peak RSS {run.peak_rss_mb} MB")
            print(f"  same profile from both: {filecmp.cmp(*outputs, shallow=False)}")
            os.remove(prefix)

        fleet_dir = os.path.join(tmp, "fleet")
        os.makedirs(fleet_dir, exist_ok=True)
        measure(me + ["--child", "fleet", "--input", str(args.profiles), "--output", fleet_dir])
        fleet = sorted(glob.glob(os.path.join(fleet_dir, "*.kbb")))
        size = sum(os.path.getsize(p) for p in fleet)
        for n in sorted({max(1, len(fleet) // 10), len(fleet)}):
            run = measure([sys.executable, "-m", "kbuild_bolt", "profile", "merge", *fleet[:n],
                           "-o", os.path.join(tmp, "fleet.kbb")])
            if run.returncode != 0:
                raise SystemExit(run.output)
            print(f"profile merge of {n} profiles ({size * n / len(fleet) / 1e6:.0f} MB of text): "
                  f"{run.seconds} s, peak RSS {run.peak_rss_mb} MB; {run.output.strip()}")
        run = measure(me + ["--child", "old-merge", "--input", fleet_dir, "--output",
                            os.path.join(tmp, "fleet-old.kbb")])
        same = filecmp.cmp(os.path.join(tmp, "fleet.kbb"), os.path.join(tmp, "fleet-old.kbb"),
                           shallow=False)
        print(f"the merge before (all {len(fleet)} in memory, one np.unique): {run.seconds} s, "
              f"peak RSS {run.peak_rss_mb} MB; same profile: {same}")
        for line in perf2bolt_runs(me, tmp):
            print(line)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
