"""Run by Debian's python3 (which has python3-drgn): the stack trace of every task
in a kernel crash dump, as JSON on stdout.

    python3 drgn_stacks.py VMCORE VMLINUX
"""

import json
import sys

import drgn
from drgn.helpers.linux.pid import for_each_task


def main() -> None:
    core, vmlinux = sys.argv[1], sys.argv[2]
    prog = drgn.Program()
    prog.set_core_dump(core)
    prog.load_debug_info([vmlinux], default=False, main=True)
    tasks = []
    for task in for_each_task(prog):
        entry = {"pid": task.pid.value_(), "comm": task.comm.string_().decode(errors="replace")}
        try:
            trace = prog.stack_trace(task)
        except (ValueError, LookupError, drgn.FaultError) as e:
            entry["error"] = str(e)
            tasks.append(entry)
            continue
        frames = []
        for frame in trace:
            try:
                source = list(frame.source())
            except LookupError:
                source = None
            frames.append({"pc": frame.pc, "name": frame.name, "source": source,
                           "inline": frame.is_inline, "interrupted": frame.interrupted})
        entry["frames"] = frames
        tasks.append(entry)
    json.dump(tasks, sys.stdout)


if __name__ == "__main__":
    main()
