"""Boot a kernel in QEMU (TCG) and judge the run from its serial console.

A bzImage boots through the decompressor (KASLR on unless ``nokaslr``); an
ELF vmlinux boots directly through its PVH entry note (no decompressor, so no
KASLR). The lab /init prints ``KBB-PLAN`` with the markers it will print, then
``KBB-MARK``/``KBB-FAIL`` lines; the result lists markers reached and missing,
and every kernel problem line (WARNING, BUG, Oops, panic, missing return thunk, ...).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kbuild_bolt.errors import KbbError
from kbuild_bolt.processes import child_dies_with_us

QEMU = "qemu-system-x86_64"
PVH_NOTE_OWNER = "Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
DEFAULT_TEXT = 0xFFFFFFFF81000000

# Kernel log lines that make a boot fail, whatever the markers say.
PROBLEM_PATTERNS = [
    ("warning", re.compile(r"\bWARNING:")),
    ("bug", re.compile(r"\bBUG:|kernel BUG at")),
    ("oops", re.compile(r"\bOops\b|general protection fault|invalid opcode:|double fault")),
    ("panic", re.compile(r"Kernel panic")),
    ("return-thunk", re.compile(r"missing return thunk|Unpatched return thunk", re.I)),
    ("stall", re.compile(r"rcu: INFO: .*detected stalls|INFO: task .* blocked for more than")),
    ("stack", re.compile(r"Kernel stack is corrupted|stack guard page was hit")),
    ("irq", re.compile(r"irq \d+: nobody cared")),
    ("lab", re.compile(r"KBB-FAIL .*")),
]
_PLAN = re.compile(r"KBB-PLAN (.*)")
_MARK = re.compile(r"KBB-MARK (\S+)")
_TEXT = re.compile(r"KBB-TEXT ([0-9a-fA-F]+)")
_NOTES = re.compile(r"KBB-NOTES ([0-9a-fA-F]*)")
# Benign lines that match a pattern above.
_BENIGN = [
    re.compile(r"Spectre V2 : WARNING: Unprivileged eBPF"),
]


@dataclass
class Problem:
    kind: str
    line: str
    lineno: int


@dataclass
class BootResult:
    kernel: str
    initrd: str | None
    entry: str                 # "bzImage" or "pvh"
    kaslr: bool                # KASLR requested and possible
    cmdline: str
    seconds: float = 0.0
    timed_out: bool = False
    exit_code: int | None = None
    plan: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    text_base: int | None = None
    notes: bytes | None = None      # /sys/kernel/notes of the running kernel
    log: str | None = None
    # A guest that is not the lab's (``lab=False``): it succeeds by showing this
    # text on its console (None: by running to its end), and no kernel problem.
    lab: bool = True
    expect_text: str | None = None
    log_lines: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        if not self.lab:
            return not self.timed_out and not self.missing and not self.problems
        return not self.timed_out and not self.missing and not self.problems and bool(self.plan
                                                                                      or self.markers)

    @property
    def kaslr_offset(self) -> int | None:
        return None if self.text_base is None else self.text_base - DEFAULT_TEXT

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("log_lines")
        out["ok"] = self.ok
        out["kaslr_offset"] = self.kaslr_offset
        return out

    def summary(self) -> str:
        status = "ok" if self.ok else "FAILED"
        parts = [f"boot {status}: {self.entry}, KASLR {'on' if self.kaslr else 'off'}, "
                 f"{self.seconds:.1f} s"]
        if self.text_base is not None:
            parts.append(f"_text {self.text_base:#x}")
        if self.lab:
            parts.append(f"markers {len(self.markers)}/{len(self.plan) or len(self.markers)}")
        elif self.expect_text is not None:
            parts.append(f"{self.expect_text!r} {'seen' if not self.missing else 'not seen'}")
        line = ", ".join(parts)
        out = [line]
        if self.timed_out:
            out.append("  timed out")
        for marker in self.missing:
            out.append(f"  missing {'marker' if self.lab else 'console text'}: {marker}")
        for problem in self.problems:
            out.append(f"  {problem.kind}: line {problem.lineno}: {problem.line}")
        return "\n".join(out)


def kernel_entry(path: Path) -> str:
    """``bzImage`` or ``pvh`` for a kernel QEMU can boot; one-line error otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except FileNotFoundError:
        raise KbbError(f"{path}: no such file") from None
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return "bzImage"
    if head[:4] == b"\x7fELF":
        from kbuild_bolt.elf.image import ElfImage

        with ElfImage(path) as image:
            for owner, ntype, _ in image.notes():
                if owner == PVH_NOTE_OWNER and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                    return "pvh"
        raise KbbError(f"{path}: vmlinux has no PVH entry note (build with CONFIG_PVH=y)")
    raise KbbError(f"{path}: neither a bzImage nor an ELF vmlinux")


# Where a bzImage's setup header points at its version string (boot protocol
# 2.00+: an offset from 0x200), which holds UTS_VERSION ("#1 SMP PREEMPT_RT ...").
_SETUP_KERNEL_VERSION = 0x20E


def preempt_rt(path: Path, entry: str) -> bool:
    """Whether the kernel (bzImage or vmlinux) was built with PREEMPT_RT, from its
    version string."""
    if entry == "bzImage":
        with open(path, "rb") as f:   # (the pointer is 16 bits: all it can reach)
            head = f.read(0x200 + 0x10000 + 256)
        if len(head) < _SETUP_KERNEL_VERSION + 2:
            return False
        at = 0x200 + int.from_bytes(head[_SETUP_KERNEL_VERSION:_SETUP_KERNEL_VERSION + 2],
                                    "little")
        return b"PREEMPT_RT" in head[at:at + 256].split(b"\0", 1)[0]
    from kbuild_bolt.elf.image import ElfImage

    with ElfImage(path) as image:
        addr = image.symbols.address("linux_banner")
        section = image.section_at(addr) if addr is not None else None
        if section is None or not section.has_bits:
            return False
        banner = image.read(addr, min(512, section.end - addr)).split(b"\0", 1)[0]
    return b"PREEMPT_RT" in banner


def qemu_command(kernel: Path, initrd: Path | None, cmdline: str, memory: str, smp: int,
                 extra: list[str] | None = None, cpu: str = "max",
                 serial: str = "stdio") -> list[str]:
    binary = shutil.which(QEMU)
    if binary is None:
        raise KbbError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    # Single-threaded TCG: with multi-threaded TCG a CPU can run a stale
    # translation of code another CPU just patched (text_poke_bp's int3), and the
    # original kernel then oopses with "int3" now and then (seen: 1 boot in 15).
    cmd = [
        binary, "-accel", "tcg,thread=single", "-machine", "pc", "-cpu", cpu, "-m", memory,
        "-smp", str(smp), "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", serial, "-kernel", str(kernel), "-append", cmdline,
    ]
    if initrd is not None:
        cmd += ["-initrd", str(initrd)]
    return cmd + list(extra or [])


def hmp(path: Path, command: str, timeout: float = 300.0) -> str:
    """Run one human-monitor command of a QEMU started with ``-monitor unix:PATH``;
    its answer (empty when it printed nothing)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        buf = b""
        while not buf.endswith(b"(qemu) "):
            chunk = sock.recv(4096)
            if not chunk:
                return "monitor closed"
            buf += chunk
        sock.sendall(command.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"(qemu) "):
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    # the echo of the command comes first, then its output
    text = buf.decode("utf-8", "replace").replace("\r", "")
    text = text.rsplit("(qemu) ", 1)[0]
    lines = [l for l in text.split("\n") if l.strip() and command not in l]
    return "\n".join(lines)


def drive_arguments(images) -> list[str]:
    """QEMU arguments for disk images (virtio block devices /dev/vda, /dev/vdb, ...:
    raw, or qcow2 when the file says so)."""
    out = []
    for image in images or ():
        path = Path(image)
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as err:
            raise KbbError(f"{image}: {err.strerror}") from None
        fmt = "qcow2" if head == b"QFI\xfb" else "raw"
        out += ["-drive", f"file={path},format={fmt},if=virtio"]
    return out


# Where a kernel message starts on the console (printk.time).
_PRINTK_START = re.compile(r"\[\s*\d+\.\d{6}\] ")


def lab_lines(lines: list[str]) -> list[tuple[int, str]]:
    """Console lines, numbered, with kernel messages cut out of the lab /init's
    own ``KBB-`` lines. The kernel writes its messages straight to the UART,
    between two chunks of a user line that the tty is still sending, so a
    message can land in the middle of ``KBB-PLAN ...`` (seen: the plan's last
    word followed by "[    2.468817] tsc: Refined TSC clocksource calibration").
    A message always ends its own line, so the user line goes on at the start
    of the next one (unless that is another lab line: this one's writer died
    mid-line); the message is kept as a line of its own, numbered where it
    stands, still scanned for problems."""
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        i += 1
        last = lineno                      # (the console line the text ends on)
        own = line.find("KBB-")
        while own >= 0 and (m := _PRINTK_START.search(line, own)):
            out.append((last, line[m.start():]))
            line = line[:m.start()]
            if i < len(lines) and not lines[i].startswith("KBB-"):
                line += lines[i]
                i += 1
                last = i
        out.append((lineno, line))
    return out


def scan_log(lines: list[str], result: BootResult) -> None:
    """Fill markers, plan, problems and _text from console lines."""
    for lineno, line in lab_lines(lines):
        if m := _PLAN.search(line):
            result.plan = m.group(1).split()
            continue
        if m := _MARK.search(line):
            result.markers.append(m.group(1))
            continue
        if m := _TEXT.search(line):
            result.text_base = int(m.group(1), 16)
            continue
        if m := _NOTES.search(line):
            result.notes = bytes.fromhex(m.group(1))
            continue
        if any(b.search(line) for b in _BENIGN):
            continue
        for kind, pattern in PROBLEM_PATTERNS:
            if pattern.search(line):
                result.problems.append(Problem(kind, line.strip(), lineno))
                break
    if not result.lab:
        want = result.expect_text
        seen = want is None or any(want in line for _, line in lab_lines(lines))
        result.missing = [] if seen else [want]
        return
    expected = result.plan
    result.missing = [m for m in expected if m not in result.markers]
    if not expected and not result.markers:
        result.missing = ["KBB-PLAN (the lab /init never ran)"]


def boot(kernel: str | os.PathLike, initrd: str | os.PathLike | None = None, *,
         workload: str = "none", iterations: int | None = None, kaslr: bool = True,
         timeout: float = 120.0, append: str = "", memory: str = "512M", smp: int = 2,
         log: str | os.PathLike | None = None, expect: list[str] | None = None,
         extra_qemu: list[str] | None = None, echo=None, cpu: str = "max",
         ftrace: str | None = None, kallsyms_to: str | os.PathLike | None = None,
         dump_to: str | os.PathLike | None = None, lab: bool = True,
         expect_text: str | None = None, drives=(),
         console_to: str | os.PathLike | None = None) -> BootResult:
    """Boot ``kernel`` with ``initrd`` and return what happened.

    ``ftrace``: the lab /init runs the workload under this ftrace tracer
    (``function``); ``kallsyms_to``: the lab /init writes /proc/kallsyms to a
    second serial port, captured in this file; ``dump_to``: the guest's memory is
    dumped there (an ELF core with virtual-address segments, as drgn reads them,
    and the kernel's VMCOREINFO when it has fw_cfg) while the lab /init runs the
    files workload in the background.

    ``lab=False``: a guest of the user's (any initramfs, ``drives``: disk images
    as virtio block devices): no kbb.* arguments; it succeeds when its console
    shows ``expect_text`` (when given) and no kernel problem line. ``console_to``:
    the serial console goes to this file (read as it grows) instead of a pipe;
    the profiling plugin watches it for its markers."""
    kernel = Path(kernel)
    entry = kernel_entry(kernel)
    if initrd is not None and not Path(initrd).exists():
        raise KbbError(f"{initrd}: no such file")
    args = ["console=ttyS0,115200", "panic=-1"]
    if lab:
        args.append(f"kbb.workload={workload}")
    if lab and iterations is not None:
        args.append(f"kbb.iterations={iterations}")
    if ftrace:
        args.append(f"kbb.ftrace={ftrace}")
    extra_qemu = list(extra_qemu or [])
    if kallsyms_to is not None:
        args.append("kbb.kallsyms=1")
        extra_qemu += ["-serial", f"file:{kallsyms_to}"]
    monitor = None
    if dump_to is not None:
        args.append("kbb.dump=1")
        monitor = Path(tempfile.mkdtemp(prefix="kbb-qemu-")) / "monitor"
        extra_qemu += ["-device", "vmcoreinfo", "-monitor", f"unix:{monitor},server,nowait"]
    kaslr_possible = entry == "bzImage"
    if not kaslr:
        args.append("nokaslr")
    if preempt_rt(kernel, entry):
        # PREEMPT_RT runs the 8250's handler in a thread; QEMU's UART raises a
        # transmit interrupt for each write, most of which the thread finds
        # served already. The kernel counts those as unhandled and, under a
        # busy port (the lab's kallsyms channel, a chatty guest), disables the
        # IRQ ("irq 3: nobody cared"): the port then stalls. The original
        # Debian rt kernel does this in QEMU; noirqdebug turns the count off.
        args.append("noirqdebug")
    if append:
        args.append(append)
    cmdline = " ".join(args)
    result = BootResult(kernel=str(kernel), initrd=str(initrd) if initrd else None, entry=entry,
                        kaslr=kaslr and kaslr_possible, cmdline=cmdline,
                        log=str(log) if log else None, lab=lab, expect_text=expect_text)
    extra_qemu = drive_arguments(drives) + extra_qemu
    serial = "stdio"
    if console_to is not None:
        Path(console_to).write_bytes(b"")
        serial = f"file:{console_to}"
    cmd = qemu_command(kernel, Path(initrd) if initrd else None, cmdline, memory, smp, extra_qemu,
                       cpu, serial)
    lines: list[str] = []
    started = time.monotonic()
    # (its own session: Ctrl-C reaches kbuild-bolt, which stops QEMU; and QEMU dies
    # with kbuild-bolt if that is killed outright)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=child_dies_with_us())

    def console():
        """The console's lines as they come: from QEMU's stdout, or from the file
        QEMU writes them to (until QEMU is gone and the file is read to its end)."""
        if console_to is None:
            yield from proc.stdout
            return
        # (QEMU's own messages on stdout: drained so it never blocks on the pipe)
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
        with open(console_to, "rb") as f:
            pending, exited = b"", False
            while True:
                chunk = f.read(1 << 16)
                if chunk:
                    pending += chunk
                    *done, pending = pending.split(b"\n")
                    yield from (d + b"\n" for d in done)
                elif exited:        # (read to the end after QEMU was gone)
                    if pending:
                        yield pending
                    return
                else:
                    exited = proc.poll() is not None
                    if not exited:
                        time.sleep(0.05)

    def reader():
        for raw in console():
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if echo is not None:
                echo(line)
            if monitor is not None and "KBB-DUMP-NOW" in line:
                # (the guest is paused while QEMU writes the dump)
                answer = hmp(monitor, f"dump-guest-memory -p {Path(dump_to).resolve()}")
                lines.append(f"KBB-HOST dump-guest-memory: {answer.strip() or 'ok'}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        result.exit_code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        result.timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except BaseException:   # (interrupted: QEMU goes too)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    thread.join(timeout=5)
    if monitor is not None:
        shutil.rmtree(monitor.parent, ignore_errors=True)
    result.seconds = round(time.monotonic() - started, 2)
    result.log_lines = lines
    if log is not None:
        Path(log).write_text("\n".join(lines) + "\n")
    scan_log(lines, result)
    if expect:
        result.missing = [m for m in expect if m not in result.markers]
    return result
