"""Profiles from ``perf script`` text, read as a stream at production scale.

With LBR (``perf record -a -e cycles:k -j any,k`` then
``perf script -F pid,ip,brstack``) every sample carries up to 32 branch records
``FROM/TO/P|M/...``, newest first. Each is a transfer; between two consecutive
records the CPU ran straight from the older one's target to the newer one's
source, which gives ranges (as BOLT's perf2bolt does).

Without LBR (``perf script -F ip`` or ``-F pid,ip[,sym]``, e.g. from
``perf record -e cpu-clock``: works on machines without a PMU) each sample is
one instruction hit; block counts come from the hits, edges are inferred.

Addresses are runtime addresses: with KASLR the kernel ran ``text_base -
vmlinux _text`` away from its link address, given on the command line, read
from a saved ``/proc/kallsyms`` (its ``_text`` line), or from the kernel's map
that ``perf script --show-mmap-events`` prints (``PERF_RECORD_MMAP ...
[kernel.kallsyms]_text``, its address after ``@``): ``read_perf_data`` runs
perf script on a perf.data itself, with that option.

The text is read in large binary chunks cut at a line end and parsed with
numpy over the whole chunk (no Python per line or per record): the records are
found at their middle ``/0x``, their 16-digit kernel addresses decoded in bulk,
and the counts folded into sorted (pair, count) arrays as the chunks go, so the
memory is a chunk plus the distinct pairs, whatever the file's size. The
result is the one the line-by-line reading gives (tests/unit/test_perf_reader.py
holds that reading as the oracle).
"""

from __future__ import annotations

import re
import subprocess
import tempfile

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kbuild_bolt.errors import KbbError
from kbuild_bolt.processes import die_with_parent
from kbuild_bolt.profile.model import Profile
from kbuild_bolt.profile.modules import MAX_SECTION

_BR = re.compile(r"(0x[0-9a-fA-F]+)/(0x[0-9a-fA-F]+)/([PM-])/")
_IP = re.compile(r"^\s*(?:\d+\s+)?([0-9a-fA-F]{8,16})(?:\s|$)")
KERNEL_MIN = 0xFFFF800000000000
MAX_RANGE = 4096

CHUNK_BYTES = 8 << 20           # text parsed at once (the working set is a few times this)
MAX_LINE_BYTES = 64 << 20       # a longer "line" is not perf script text
PERF_DATA_MAGIC = b"PERFILE2"
# The kernel's map as perf script --show-mmap-events prints it (perf 4.x to 6.x):
#   PERF_RECORD_MMAP -1/0: [0xffffffffa0000000(0x1a00000) @ 0xffffffffa0000000]: x
#   [kernel.kallsyms]_text
# (one line). perf puts the running address of the symbol after "]" (its
# reference for relocation: _text on x86) in the field after "@".
_KERNEL_MAP = re.compile(rb"PERF_RECORD_MMAP2? +-?\d+/-?\d+: \[0x[0-9a-fA-F]+\(0x[0-9a-fA-F]+\) "
                         rb"@ (0x[0-9a-fA-F]+|0)[^\]\n]*\]: \S+ \[kernel\.kallsyms\](\S*)")

# A module's map (perf record lists every loaded module, from /proc/modules):
#   PERF_RECORD_MMAP -1/0: [0xffffffffc0591000(0x7000) @ 0 00:00 0 0]: x
#   /lib/modules/6.1.0-18-amd64/kernel/drivers/block/loop.ko
# (one line; the file may be compressed, or "[loop]" when perf found none).
_MODULE_MAP = re.compile(rb"PERF_RECORD_MMAP2? +-?\d+/-?\d+: \[(0x[0-9a-fA-F]+)\(0x[0-9a-fA-F]+\) "
                         rb"@ [^\]\n]*\]: \S+ (?:\S*/)?\[?([\w-]+)(?:\.ko(?:\.xz|\.gz|\.zst)?|\])\s*$")

_SLASH, _ZERO, _X, _NL = ord("/"), ord("0"), ord("x"), ord("\n")
_PAD = 48                       # zero bytes around a chunk: windows may reach past either end
_FLAG = np.zeros(256, bool)     # the third field of a record
_FLAG[[ord("P"), ord("M"), ord("-")]] = True
_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
    _HEX[ord(chr(_c).upper())] = _i
_WINDOW_BASE = 0xFFFFFFFF80000000   # the top 2 GiB: kernel text, modules, vsyscall


def looks_like(head: bytes) -> bool:
    text = head.decode("ascii", "replace")
    lines = [line for line in text.splitlines()[:20] if line.strip()]
    return bool(lines) and (any(_BR.search(line) for line in lines)
                            or all(_IP.match(line) for line in lines[:5]))


def is_perf_data(head: bytes) -> bool:
    """A perf.data file (perf record's output), not its perf script text."""
    return head.startswith(PERF_DATA_MAGIC)


def text_base_from_kallsyms(path) -> int:
    """The running kernel's _text from a saved /proc/kallsyms."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "_text":
                    value = int(parts[0], 16)
                    if value == 0:
                        raise KbbError(f"{path}: _text is 0 (read /proc/kallsyms as root)")
                    return value
    except FileNotFoundError:
        raise KbbError(f"{path}: no such file") from None
    raise KbbError(f"{path}: no _text symbol (not a kallsyms file?)")


def text_base_from_map_line(line: bytes) -> int | None:
    """The running _text from perf script's kernel map line, None for any other line."""
    m = _KERNEL_MAP.search(line)
    if m is None:
        return None
    address, symbol = int(m.group(1), 16), m.group(2).decode(errors="replace")
    if symbol != "_text":
        raise KbbError(f"perf's kernel map is relative to {symbol or 'no symbol'}, not _text: "
                       "give --text-base or --kallsyms")
    if address == 0:
        raise KbbError("perf's kernel map has no address (perf record ran without access to "
                       "kernel addresses: kptr_restrict): give --text-base or --kallsyms")
    return address


def module_from_map_line(line: bytes) -> tuple[str, int] | None:
    """(module, core text start) from perf script's map line of a kernel module,
    None for any other line."""
    m = _MODULE_MAP.search(line.rstrip(b"\r\n"))
    if m is None or m.group(2) == b"kernel.kallsyms":
        return None
    start = int(m.group(1), 16)
    if start < KERNEL_MIN:
        return None                         # (a user space library called *.ko)
    return m.group(2).decode().replace("-", "_"), start


def read_perf_script(path, text_base: int | None = None, vmlinux_text: int = 0xFFFFFFFF81000000,
                     kernel_only: bool = True, thunks=None,
                     chunk_bytes: int = CHUNK_BYTES) -> Profile:
    """A Profile in vmlinux addresses from perf script text (LBR or plain samples).
    ``path``: a file name or a binary stream. ``thunks``: (indirect thunk
    ranges, return thunk ranges) in vmlinux addresses
    (profile.thunks.thunk_ranges): an LBR stack's calls of retpoline thunks are
    followed to their real targets, recorded as transfers from the call."""
    if hasattr(path, "readinto"):
        reader = PerfScriptReader(text_base, vmlinux_text, kernel_only, thunks, chunk_bytes,
                                  name=getattr(path, "name", "perf script output"))
        reader.feed(path)
    else:
        reader = PerfScriptReader(text_base, vmlinux_text, kernel_only, thunks, chunk_bytes,
                                  name=str(path))
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise KbbError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise KbbError(f"{path}: a directory, not perf script output") from None
        with f:
            reader.feed(f)
    return reader.profile()


def read_perf_data(perf_data, text_base: int | None = None,
                   vmlinux_text: int = 0xFFFFFFFF81000000, thunks=None, perf: str = "perf",
                   chunk_bytes: int = CHUNK_BYTES) -> "PerfScriptReader":
    """Run ``perf script`` on a perf.data and read its output as it comes (a
    pipe: nothing is written to disk). The kernel's runtime _text comes from
    the kernel map perf prints with --show-mmap-events unless ``text_base`` is
    given. The reader, to ask for its profile and what it counted."""
    command = [perf, "script", "-i", str(perf_data), "-F", "pid,ip,brstack",
               "--show-mmap-events"]
    reader = PerfScriptReader(text_base, vmlinux_text, True, thunks, chunk_bytes,
                              name=f"perf script -i {perf_data}")
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                    preexec_fn=die_with_parent)
        except FileNotFoundError:
            raise KbbError(f"{perf}: not found (install linux-perf, or run perf script yourself "
                           "and convert its output)") from None
        try:
            reader.feed(proc.stdout)
        finally:
            proc.stdout.close()
            if proc.poll() is None:         # (stopped early: an error above)
                proc.kill()
            status = proc.wait()
        if status != 0:
            errors.seek(0)
            said = [line.strip() for line in errors.read().decode(errors="replace").splitlines()
                    if line.strip()]
            raise KbbError(f"perf script -i {perf_data} failed (exit status {status}): "
                           f"{said[-1] if said else 'no message'}")
    return reader


class PerfScriptReader:
    """Reads perf script text chunk by chunk; ``profile()`` gives the result.

    Counters (for reports and benchmarks): ``records`` (branch records read,
    user space included), ``samples`` (instruction samples read, without LBR),
    ``chunks`` (pieces of text parsed), ``text_base_from`` (where the runtime _text came from, None: not known,
    the kernel is taken to have run at its link address)."""

    def __init__(self, text_base=None, vmlinux_text=0xFFFFFFFF81000000, kernel_only=True,
                 thunks=None, chunk_bytes=CHUNK_BYTES, name="perf script output"):
        self.name = name
        self.text_base = text_base
        self.text_base_from = "given" if text_base is not None else None
        self.vmlinux_text = vmlinux_text
        self.kernel_only = kernel_only
        self.thunk_spans = thunks
        self.chunk_bytes = max(int(chunk_bytes), 64)
        self.records = 0
        self.samples = 0
        self.chunks = 0
        self.lbr = False
        self.seen_data = False
        self._thunks = None             # (thunk intervals, passed intervals) at runtime
        # Module -> its core text start, from perf's module maps; and where the
        # modules' code sections were (set by the caller: a saved list, or these
        # maps with the .ko files), for module code kept as (module, section, offset).
        self.module_bases: dict[str, int] = {}
        self.modules = None
        self.module_code_dropped = 0
        self._ranges = _PairCounts()
        self._transfers = _PairCounts()
        self._ips = _PairCounts()

    @property
    def delta(self) -> int:
        return (self.text_base - self.vmlinux_text) if self.text_base is not None else 0

    # -- reading ---------------------------------------------------------
    def feed(self, stream) -> None:
        """Read a binary stream to its end. Only whole lines are parsed; the
        unfinished last line of a chunk is carried to the next."""
        capacity = self.chunk_bytes
        buf = bytearray(capacity + 2 * _PAD + 8)
        carry = 0
        while True:
            free = memoryview(buf)[_PAD + carry:_PAD + capacity]
            got = stream.readinto(free)
            free.release()
            end = _PAD + carry + (got or 0)
            if not got:                              # the end: a last line without "\n"
                if carry:
                    buf[end] = _NL
                    self._chunk(buf, _PAD, end + 1)
                return
            cut = buf.rfind(b"\n", _PAD, end)
            if cut < 0:
                carry = end - _PAD
                if carry == capacity:                # one line fills the buffer: grow it
                    if capacity >= MAX_LINE_BYTES:
                        raise KbbError(f"{self.name}: a line longer than "
                                       f"{MAX_LINE_BYTES >> 20} MB: not perf script output")
                    capacity *= 2
                    bigger = bytearray(capacity + 2 * _PAD + 8)
                    bigger[:end] = buf[:end]
                    buf = bigger
                continue
            rest = bytes(buf[cut + 1:end])
            self._chunk(buf, _PAD, cut + 1)
            buf[_PAD:_PAD + len(rest)] = rest
            carry = len(rest)

    def _chunk(self, buf: bytearray, lo: int, hi: int) -> None:
        """Parse the whole lines buf[lo:hi] (the last one ends in "\\n")."""
        buf[hi:hi + _PAD] = bytes(_PAD)       # (what windows past the end read)
        self.chunks += 1
        self._kernel_map(buf, lo, hi)
        data = np.frombuffer(buf, np.uint8)
        try:
            mids, src, dst, line = _branch_records(data, lo, hi, self.name)
            if len(mids):
                self.lbr = True
                self.records += len(mids)
                self._count_branches(src, dst, line)
            elif not self.lbr:
                ips = _sample_ips(data, lo, hi, buf)
                self.samples += len(ips)
                if self.kernel_only:
                    ips = ips[ips >= np.uint64(KERNEL_MIN)]
                self._ips.add(ips, ips)
            self.seen_data = self.seen_data or bool(len(mids)) or self.samples > 0
        finally:
            del data

    def _kernel_map(self, buf: bytearray, lo: int, hi: int) -> None:
        """The runtime _text from perf's kernel map line, if this chunk has it."""
        at = buf.find(b"PERF_RECORD_MMAP", lo, hi)
        while at >= 0:
            start = max(buf.rfind(b"\n", lo, at) + 1, lo)
            end = buf.find(b"\n", at, hi)
            line = bytes(buf[start:end])
            address = text_base_from_map_line(line)
            if address is None:
                module = module_from_map_line(line)      # (or a map of user space)
                if module is not None:
                    self.module_bases[module[0]] = module[1]
            elif self.text_base_from == "given":
                pass                                    # (the caller said where)
            elif self.text_base is None:
                if self.seen_data and self.thunk_spans is not None:
                    raise KbbError(f"{self.name}: perf's kernel map comes after samples; give "
                                   "--text-base or --kallsyms")
                self.text_base, self.text_base_from = address, "perf"
            elif address != self.text_base:
                raise KbbError(f"{self.name}: two kernel maps with different addresses "
                               f"({self.text_base:#x}, {address:#x})")
            at = buf.find(b"PERF_RECORD_MMAP", end, hi)

    # -- counting ----------------------------------------------------------
    def _count_branches(self, src: np.ndarray, dst: np.ndarray, line: np.ndarray) -> None:
        kernel = np.uint64(KERNEL_MIN)
        if self.kernel_only:
            keep = (src >= kernel) & (dst >= kernel)
            self._transfers.add(src[keep], dst[keep])
        else:
            self._transfers.add(src, dst)
        # Newest first: record t+1 is older; straight line from its target to
        # the source of record t.
        same = line[1:] == line[:-1]
        start, end = dst[1:], src[:-1]
        keep = same & (start >= kernel) & (end >= start) & ((end - start) <= np.uint64(MAX_RANGE))
        self._ranges.add(start[keep], end[keep])
        if self.thunk_spans is not None:
            calls_src, calls_dst = self._thunk_calls(src, dst, line)
            if self.kernel_only:
                keep = calls_dst >= kernel
                calls_src, calls_dst = calls_src[keep], calls_dst[keep]
            self._transfers.add(calls_src, calls_dst)

    def _thunk_calls(self, src, dst, line):
        """ThunkWays over every stack at once: (call site, real target) of each
        call of a retpoline thunk whose way out of the thunks is in the stack.

        Oldest first, the record before t is t-1 (same line). A way starts at a
        record into an indirect thunk from outside the thunks (and at no other
        record: its source is outside them, so it also ends a way before it);
        it goes on through records from inside the thunks and ends at the
        first of them that leaves the thunks (the call's real target), or,
        without a target, at a record from outside them."""
        if self._thunks is None:
            delta = self.delta
            indirect, returns = self.thunk_spans
            thunks = _union([(lo + delta, hi + delta) for lo, hi in indirect])
            passed = _union([(lo + delta, hi + delta) for lo, hi in list(indirect) + list(returns)])
            self._thunks = (thunks, passed)
        thunks, passed = self._thunks
        empty = np.zeros(0, np.uint64)
        if not len(thunks[0]):
            return empty, empty
        src_passed, dst_passed = _within(src, passed), _within(dst, passed)
        starts = np.flatnonzero(_within(dst, thunks) & ~src_passed)
        sites, targets = [], []
        at = starts - 1
        while len(starts):
            alive = (at >= 0)
            alive[alive] &= line[at[alive]] == line[starts[alive]]
            alive[alive] &= src_passed[at[alive]]
            starts, at = starts[alive], at[alive]
            out = ~dst_passed[at]
            sites.append(src[starts[out]])
            targets.append(dst[at[out]])
            starts, at = starts[~out], at[~out] - 1
        if not sites:
            return empty, empty
        return np.concatenate(sites), np.concatenate(targets)

    # -- the result --------------------------------------------------------
    def profile(self) -> Profile:
        if self.lbr:
            rs, rl, rc = self._ranges.totals()
            src, dst, count = self._transfers.totals()
            profile = Profile(rs, rl, rc, src, dst, count, source="perf-lbr")
        else:
            ips, _, count = self._ips.totals()
            if not len(ips):
                raise KbbError(f"{self.name}: no kernel samples in this perf script output")
            profile = Profile(ips, ips.copy(), count, source="perf-samples", sampled=True)
        profile = self._with_modules(profile)
        return _sorted(profile.shifted(self.delta) if self.delta else profile)

    def _with_modules(self, profile: Profile) -> Profile:
        """Module code as (module, section, offset) where ``modules`` says where
        their sections were; the code of modules perf mapped but nothing placed
        is left out (shifted by the kernel's KASLR offset it could land on
        vmlinux code)."""
        placed = self.modules is not None and len(self.modules) > 0
        if not placed and not self.module_bases:
            return profile
        names = ("range_start", "range_last", "src", "dst")
        sections: list = []
        columns, known = {}, {}
        for name in names:
            a = getattr(profile, name)
            if placed:
                columns[name], known[name] = self.modules.encode(a, sections)
            else:
                columns[name], known[name] = a, np.zeros(len(a), bool)
        mapped = _union([(base, base + MAX_SECTION) for base in self.module_bases.values()])

        def stray(name):
            """In a module perf mapped, but in none of the sections known."""
            return _within(getattr(profile, name), mapped) & ~known[name]

        keep_r = ~stray("range_start")
        keep_b = ~(stray("src") | stray("dst"))
        self.module_code_dropped = int(profile.range_count[~keep_r].sum())
        return Profile(columns["range_start"][keep_r], columns["range_last"][keep_r],
                       profile.range_count[keep_r], columns["src"][keep_b],
                       columns["dst"][keep_b], profile.count[keep_b], source=profile.source,
                       sampled=profile.sampled, module_sections=tuple(sections)).merged()


def _sorted(profile: Profile) -> Profile:
    """The order merged() gives (pairs ascending), kept from the counting unless
    the KASLR shift wrapped an address around (user space, kernel_only off)."""
    def ascending(a, b):
        return len(a) < 2 or bool(np.all((a[1:] > a[:-1]) | ((a[1:] == a[:-1]) & (b[1:] > b[:-1]))))
    if ascending(profile.range_start, profile.range_last) and ascending(profile.src, profile.dst):
        return profile
    return profile.merged()


# ---------------------------------------------------------------------------
# Parsing a chunk

def _hex_ok(c: np.ndarray) -> np.ndarray:
    """Which bytes are hex digits (0-9, a-f, A-F), by arithmetic (cheaper than a table)."""
    return ((c - np.uint8(48)) <= 9) | (((c | np.uint8(32)) - np.uint8(97)) <= 5)


def _hex_values(digits: np.ndarray) -> np.ndarray:
    """Values of rows of 16 hex digits (uint8 n x 16, already checked)."""
    nibbles = (digits & np.uint8(15)) + (digits >> np.uint8(6)) * np.uint8(9)
    packed = (nibbles[:, 0::2] << np.uint8(4)) | nibbles[:, 1::2]
    return packed.view(">u8").ravel().astype(np.uint64)


# Eight ASCII characters at once in a uint64 (the first character in the low
# byte), each byte on its own: no carry crosses a byte below 0x80, and a byte
# at 0x80 or above fails the word anyway.
def _u64(value: int) -> np.uint64:
    return np.uint64(value)


_HIGH_BITS = _u64(0x8080808080808080)


def _words_are_hex(w: np.ndarray) -> np.ndarray:
    """Words whose 8 bytes are all hex digits."""
    digit = (w + _u64(0x5050505050505050)) & ~(w + _u64(0x4646464646464646))   # 0x30-0x39
    low = w | _u64(0x2020202020202020)                                          # A-F as a-f
    letter = (low + _u64(0x1F1F1F1F1F1F1F1F)) & ~(low + _u64(0x1919191919191919))  # 0x61-0x66
    return ((digit | letter) & ~w & _HIGH_BITS) == _HIGH_BITS


def _words_value(w: np.ndarray) -> np.ndarray:
    """The 32-bit values of words of 8 hex digits (checked), most significant first."""
    n = (w & _u64(0x0F0F0F0F0F0F0F0F)) + ((w >> _u64(6)) & _u64(0x0101010101010101)) * _u64(9)
    n = ((n << _u64(4)) + (n >> _u64(8))) & _u64(0x00FF00FF00FF00FF)       # digit pairs
    n = ((n << _u64(8)) + (n >> _u64(16))) & _u64(0x0000FFFF0000FFFF)      # 4 digits
    return ((n << _u64(16)) + (n >> _u64(32))) & _u64(0xFFFFFFFF)


def _unaligned(buf, dtype) -> np.ndarray:
    """buf as overlapping integers, one starting at every byte (gathers read
    the 2, 4 or 8 bytes at any offset in one go)."""
    size = np.dtype(dtype).itemsize
    return np.ndarray((len(buf) - size + 1,), dtype, buffer=buf, strides=(1,))


_ZERO_X = ord("0") | ord("x") << 8
_SLASH_FLAG_SLASH = ord("/") | ord("/") << 16


def _branch_records(data: np.ndarray, lo: int, hi: int, name: str):
    """Every ``0xFROM/0xTO/F/`` record of data[lo:hi] (F one of P, M, -), where
    the regular expression of the line-by-line reading finds them: (positions of
    their middle slash, from, to, line number), in the order of the text."""
    xs = np.flatnonzero(data[lo:hi] == _X)
    xs += lo
    mids = xs[(data[xs - 1] == _ZERO) & (data[xs - 2] == _SLASH)] - 2     # at "/0x"
    del xs
    empty = np.zeros(0, np.uint64)
    if not len(mids):
        return mids, empty, empty, np.zeros(0, np.int64)
    # The common case (kernel addresses print 16 digits): "0x" + 16 + "/0x" + 16 + "/F/".
    words = _unaligned(data, "<u8")
    from_high, from_low = words[mids - 16], words[mids - 8]
    to_high, to_low = words[mids + 3], words[mids + 11]
    after = _unaligned(data, "<u4")[mids + 19]
    fast = ((_unaligned(data, "<u2")[mids - 18] == _ZERO_X)
            & ((after & np.uint32(0xFF00FF)) == _SLASH_FLAG_SLASH)
            & _FLAG[(after >> np.uint32(8)) & np.uint32(0xFF)]
            & _words_are_hex(from_high) & _words_are_hex(from_low)
            & _words_are_hex(to_high) & _words_are_hex(to_low))
    if not fast.all():
        from_high, from_low, to_high, to_low = (from_high[fast], from_low[fast], to_high[fast],
                                                to_low[fast])
    src = (_words_value(from_high) << _u64(32)) | _words_value(from_low)
    dst = (_words_value(to_high) << _u64(32)) | _words_value(to_low)
    if not fast.all():
        others, mids = mids[~fast], mids[fast]
        more_mids, more_src, more_dst = _other_records(data, lo, hi, others, name)
        if len(more_mids):
            mids = np.concatenate([mids, more_mids])
            order = np.argsort(mids, kind="stable")
            mids = mids[order]
            src = np.concatenate([src, more_src])[order]
            dst = np.concatenate([dst, more_dst])[order]
    newlines = np.flatnonzero(data[lo:hi] == _NL)
    newlines += lo
    line = np.searchsorted(newlines, mids)
    return mids, src, dst, line


def _other_records(data, lo, hi, mids, name):
    """The records at these middle slashes whose addresses are not 16 digits
    (user space), exactly as the regular expression finds them: from = the run
    of hex digits before the middle slash with "0x" before it, to = the run
    after "/0x" up to the next slash, then one of P, M, - and a slash."""
    slashes = np.flatnonzero(data[lo:hi] == _SLASH)
    slashes += lo
    nxt = np.searchsorted(slashes, mids, side="right")
    following = np.where(nxt < len(slashes), slashes[np.minimum(nxt, len(slashes) - 1)], hi)
    flags_ok = _FLAG[data[following + 1]] & (data[following + 2] == _SLASH)
    to_len = following - mids - 3
    windows = sliding_window_view(data, 16)
    column = np.arange(16)[None, :]
    # to: right-aligned at the next slash.
    to_digits = windows[following - 16]
    to_used = column >= (16 - to_len)[:, None]
    to_ok = (to_len >= 1) & (to_len <= 16) & np.all(_hex_ok(to_digits) | ~to_used, axis=1)
    # from: the run of hex digits that ends at the middle slash.
    from_digits = windows[mids - 16]
    from_hex = _hex_ok(from_digits)
    run = 15 - np.where(from_hex, -1, column).max(axis=1)
    from_ok = (run >= 1) & (data[mids - run - 1] == _X) & (data[mids - run - 2] == _ZERO)
    # More than 16 digits: a record only if the longer runs are hex with "0x"
    # before (then no 64-bit address; never in perf's output).
    maybe_wide = flags_ok & (((run == 16) & _hex_ok(data[mids - 17])) | (to_len > 16))
    for mid, end in zip(mids[maybe_wide].tolist(), following[maybe_wide].tolist()):
        start = mid
        while start > 0 and _HEX[data[start - 1]] < 16:
            start -= 1
        if (bytes(data[start - 2:start]) == b"0x" and end - mid > 3
                and bool((_HEX[data[mid + 3:end]] < 16).all())):
            raise KbbError(f"{name}: a branch address longer than 64 bits: "
                           f"{bytes(data[start - 2:end + 3]).decode('ascii', 'replace')[:80]}")
    ok = flags_ok & to_ok & from_ok
    from_used = column >= (16 - run)[:, None]
    src = _hex_values(np.where(from_used, from_digits, np.uint8(48))[ok])
    dst = _hex_values(np.where(to_used, to_digits, np.uint8(48))[ok])
    return mids[ok], src, dst


_SPACE = np.zeros(256, bool)       # what the line reading's \s matches in ASCII
_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def _sample_ips(data: np.ndarray, lo: int, hi: int, buf: bytearray) -> np.ndarray:
    """The sampled address of each line of data[lo:hi] (no branch records), as
    ``^\\s*(?:\\d+\\s+)?([0-9a-fA-F]{8,16})(?:\\s|$)`` finds it: the second word
    when the first is a number (a pid) and the second 8 to 16 hex digits, else
    the first word when it is 8 to 16 hex digits. (Non-ASCII spaces and digits,
    which the regular expression would also take, are not perf's.)"""
    text = data[lo - 1:hi + 1]
    line_end = np.flatnonzero(text[1:-1] == _NL)
    line_end += lo
    if np.count_nonzero(text[1:-1] < 32) == len(line_end):
        space = text <= 32              # (no control character but the line ends)
    else:
        space = _SPACE[text]
    space[0] = space[-1] = True
    word_start = np.flatnonzero(space[:-1] > space[1:])        # (space, then not)
    word_start += lo
    word_end = np.flatnonzero(space[:-1] < space[1:])          # (not, then space): past the end
    word_end += lo
    del space
    if not len(word_start):
        return np.zeros(0, np.uint64)
    line_start = np.concatenate([[lo], line_end[:-1] + 1])
    first = np.searchsorted(word_start, line_start)
    lines = np.flatnonzero((first < len(word_start))
                           & (word_start[np.minimum(first, len(word_start) - 1)] < line_end))
    first = first[lines]
    second = np.minimum(first + 1, len(word_start) - 1)
    has_second = (first + 1 < len(word_start)) & (word_start[second] < line_end[lines])
    word1 = _Words(data, word_end[first], word_end[first] - word_start[first])
    word2 = _Words(data, word_end[second],
                   np.where(has_second, word_end[second] - word_start[second], 0))
    second_is_address = word2.address()
    second_is_ip = word1.decimal() & second_is_address
    rest = np.flatnonzero(~second_is_ip)
    first_is_ip = rest[word1.address(rest)]
    ips = np.concatenate([word2.values(np.flatnonzero(second_is_ip)), word1.values(first_is_ip)])
    # A first word of more than 16 characters before a possible address: read
    # by the regular expression itself (never, in perf's output).
    extra = []
    for at in lines[(word1.length > 16) & second_is_address].tolist():
        line = bytes(buf[int(line_start[at]):int(line_end[at]) + 1])
        m = _IP.match(line.decode(errors="replace"))
        if m:
            extra.append(int(m.group(1), 16))
    if extra:
        ips = np.concatenate([ips, np.array(extra, np.uint64)])
    return ips


class _Words:
    """Words of a line (runs of non-space) by where they end and their length,
    read as the two 8-byte integers before their end: a word of up to 16
    characters is the top ``length`` bytes of those 16."""

    def __init__(self, data: np.ndarray, end: np.ndarray, length: np.ndarray):
        words = _unaligned(data, "<u8")
        self.high, self.low = words[end - 16], words[end - 8]
        self.length = length
        short = np.clip(length, 1, 16).astype(np.uint64)
        # The high bit of each byte of the word: the top min(length, 8) bytes of
        # low, the top length - 8 bytes of high.
        self.low_part = _HIGH_BITS << (_u64(8) * (_u64(8) - np.minimum(short, _u64(8))))
        self.high_part = ((_HIGH_BITS << (_u64(8) * (_u64(16) - np.maximum(short, _u64(9)))))
                          * (short > 8))

    def _all(self, bits, rows=None) -> np.ndarray:
        high, low = (self.high, self.low) if rows is None else (self.high[rows], self.low[rows])
        hp, lp = ((self.high_part, self.low_part) if rows is None
                  else (self.high_part[rows], self.low_part[rows]))
        return ((bits(low) & lp) == lp) & ((bits(high) & hp) == hp)

    def decimal(self) -> np.ndarray:
        """Words of 1 to 16 decimal digits (a pid: longer ones are left to the regex)."""
        return (self.length >= 1) & (self.length <= 16) & self._all(_decimal_bits)

    def address(self, rows=None) -> np.ndarray:
        """Words of 8 to 16 hex digits."""
        length = self.length if rows is None else self.length[rows]
        return (length >= 8) & (length <= 16) & self._all(_hex_bits, rows)

    def values(self, rows) -> np.ndarray:
        """The values of these words (checked hex digits)."""
        zeros = _u64(0x3030303030303030)            # (the bytes before the word read as "0")
        low_bytes = (self.low_part[rows] >> _u64(7)) * _u64(0xFF)
        high_bytes = (self.high_part[rows] >> _u64(7)) * _u64(0xFF)
        high = (self.high[rows] & high_bytes) | (zeros & ~high_bytes)
        low = (self.low[rows] & low_bytes) | (zeros & ~low_bytes)
        return (_words_value(high) << _u64(32)) | _words_value(low)


def _decimal_bits(w: np.ndarray) -> np.ndarray:
    """The high bit of each byte of w set where it is a decimal digit."""
    return (w + _u64(0x5050505050505050)) & ~(w + _u64(0x4646464646464646)) & ~w & _HIGH_BITS


def _hex_bits(w: np.ndarray) -> np.ndarray:
    """The high bit of each byte of w set where it is a hex digit."""
    low = w | _u64(0x2020202020202020)
    letter = (low + _u64(0x1F1F1F1F1F1F1F1F)) & ~(low + _u64(0x1919191919191919))
    return (_decimal_bits(w) | letter) & ~w & _HIGH_BITS


# ---------------------------------------------------------------------------
# Counting pairs in bounded memory

class _PairCounts:
    """(a, b) -> count, fed arrays of pairs: pairs in the top 2 GiB of the
    address space (the kernel's text and modules) as one 64-bit key each,
    sorted and summed in batches into a sorted (key, count) table; any other
    pair (user space, with kernel_only off) the same way by (a, b)."""

    BATCH = 1 << 20

    def __init__(self):
        self.keys = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)
        self.pending = []
        self.pending_len = 0
        self.other = Profile()          # (as transfers)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if not len(a):
            return
        base = np.uint64(_WINDOW_BASE)
        inside = (a >= base) & (b >= base)
        if not inside.all():
            outside = ~inside
            self.other = Profile(src=np.concatenate([self.other.src, a[outside]]),
                                 dst=np.concatenate([self.other.dst, b[outside]]),
                                 count=np.concatenate([self.other.count,
                                                       np.ones(int(outside.sum()), np.int64)]))
            if len(self.other.src) > self.BATCH:
                self.other = self.other.merged()
            a, b = a[inside], b[inside]
        keys = ((a - base) << np.uint64(32)) | (b - base)
        self.pending.append(keys)
        self.pending_len += len(keys)
        if self.pending_len >= max(self.BATCH, len(self.keys)):
            self._fold()

    def _fold(self) -> None:
        if not self.pending:
            return
        batch = np.sort(np.concatenate(self.pending))
        self.pending, self.pending_len = [], 0
        keys, counts = _run_lengths(batch)
        if len(self.keys):
            both = np.concatenate([self.keys, keys])
            order = np.argsort(both, kind="stable")     # (two sorted runs: a linear merge)
            keys, counts = _run_lengths(both[order], np.concatenate([self.counts, counts])[order])
        self.keys, self.counts = keys, counts

    def totals(self):
        """(a, b, count), pairs ascending."""
        self._fold()
        base = np.uint64(_WINDOW_BASE)
        a = (self.keys >> np.uint64(32)) + base
        b = (self.keys & np.uint64(0xFFFFFFFF)) + base
        if not len(self.other.src):
            return a, b, self.counts
        both = Profile(src=np.concatenate([a, self.other.src]),
                       dst=np.concatenate([b, self.other.dst]),
                       count=np.concatenate([self.counts, self.other.count])).merged()
        return both.src, both.dst, both.count


def _run_lengths(keys: np.ndarray, counts: np.ndarray | None = None):
    """Distinct keys of a sorted array, with their counts summed (or counted)."""
    if not len(keys):
        return keys, np.zeros(0, np.int64)
    starts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = np.concatenate([[0], starts])
    if counts is None:
        totals = np.diff(np.concatenate([starts, [len(keys)]])).astype(np.int64)
    else:
        totals = np.add.reduceat(counts, starts)
    return keys[starts], totals


def _union(spans) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint [lo, hi) intervals covering the given ones."""
    merged = []
    for lo, hi in sorted(spans):
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return (np.array([lo for lo, _ in merged], np.uint64),
            np.array([hi for _, hi in merged], np.uint64))


def _within(addresses: np.ndarray, intervals) -> np.ndarray:
    los, his = intervals
    if not len(los):
        return np.zeros(len(addresses), bool)
    near = np.flatnonzero((addresses >= los[0]) & (addresses < his[-1]))
    out = np.zeros(len(addresses), bool)
    at = np.searchsorted(los, addresses[near], side="right") - 1
    out[near] = addresses[near] < his[at]
    return out


__all__ = ["read_perf_script", "read_perf_data", "PerfScriptReader", "text_base_from_kallsyms",
           "text_base_from_map_line", "looks_like", "is_perf_data"]
