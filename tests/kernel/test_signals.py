"""A stopped kbuild-bolt leaves nothing behind: no temporary output, no worker
or QEMU process, no pipe held open.

Each test starts the real command on a lab kernel in a session of its own,
waits for the moment that matters (the temporary output exists, decode workers
or QEMU are running), sends a signal, and then looks at the directory and at
every process of that session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("signals")


def _as_from_a_shell():
    # A user's Ctrl-C or kill reaches a process whose signals are neither
    # ignored nor blocked; the test's own worker process may have inherited
    # other dispositions (SIG_IGN and the mask survive exec).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kbuild_bolt", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_as_from_a_shell)


def signal_state() -> str:
    """This process's SIGINT handler, ignored and blocked signals (for a failure)."""
    status = [line for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("SigIgn", "SigBlk"))]
    return f"the test's process: SIGINT {signal.getsignal(signal.SIGINT)}, {status}"


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live process in session ``sid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append((int(entry.name), comm))
    return out


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_until_gone(sid: int, timeout: float = 10) -> list:
    deadline = time.monotonic() + timeout
    left = session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = session_processes(sid)
    return left


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + 15),
                                            (signal.SIGINT, 128 + 2)])
def test_signal_during_rewrite_removes_the_temporary_output(lab_regular, tmp_path, signum,
                                                            status):
    out = tmp_path / "vmlinux.out"
    proc = start(["rewrite", str(lab_regular.vmlinux), "-o", str(out), "--reorder-blocks",
                  "random"], tmp_path)
    # The temporary output exists from the update pass until the rename.
    wait_for(lambda: temporaries(tmp_path) or proc.poll() is not None, 120,
             "the temporary output")
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err.decode() + signal_state()
    assert err.decode().strip().splitlines()[-1].startswith("kbuild-bolt: "), err.decode()
    assert "Traceback" not in err.decode()
    assert temporaries(tmp_path) == [] and not out.exists()
    assert wait_until_gone(proc.pid) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_workers_die_with_the_rewrite(lab_regular, tmp_path, signum):
    """Decode workers run while the input is read; stop the parent then."""
    out = tmp_path / "vmlinux.out"
    proc = start(["rewrite", str(lab_regular.vmlinux), "-o", str(out), "--reorder-blocks",
                  "random"], tmp_path)
    if signum == signal.SIGINT:
        # Ctrl-C reaches the whole foreground process group, workers included.
        send = lambda: os.killpg(proc.pid, signum)  # noqa: E731
    else:
        send = lambda: os.kill(proc.pid, signum)  # noqa: E731
    workers = wait_for(lambda: children(proc.pid) or proc.poll() is not None, 120,
                       "decode workers")
    assert proc.poll() is None and workers, "no decode workers seen"
    send()
    # The caller's pipes close once nothing holds them (a `| tee` ends).
    closed = threading.Event()
    threading.Thread(target=lambda: (proc.stdout.read(), closed.set()), daemon=True).start()
    assert closed.wait(20), "stdout still held open"
    proc.wait(timeout=30)
    assert wait_until_gone(proc.pid) == []
    if signum != signal.SIGKILL:
        assert "Traceback" not in proc.stderr.read().decode()
        assert temporaries(tmp_path) == []


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pids) -> list[int]:
    return [pid for pid in pids if command_name(pid)]


@pytest.mark.qemu
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_qemu_dies_with_boot(lab_regular, tmp_path, signum):
    # (a workload far longer than the test: QEMU would not end by itself)
    proc = start(["boot", str(lab_regular.bzimage), "--initrd", str(lab_regular.initramfs),
                  "--workload", "files", "--iterations", "1000000", "--timeout", "900"],
                 tmp_path)
    # (QEMU runs in a session of its own, as a child of kbuild-bolt)
    qemu = wait_for(lambda: [c for c in children(proc.pid)
                             if command_name(c).startswith("qemu")] or proc.poll() is not None,
                    60, "QEMU")
    assert proc.poll() is None
    os.kill(proc.pid, signum)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive(qemu) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(qemu) == []
    assert wait_until_gone(proc.pid) == []
