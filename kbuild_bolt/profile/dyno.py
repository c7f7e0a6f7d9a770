"""Dyno-stats: BOLT's dynamic instruction statistics, before and after a layout.

For every executed block (counts from the profile) the rows BOLT prints:
executed/taken forward and backward conditional branches, unconditional
branches, calls (direct and indirect), instructions, loads, stores, indirect
jumps, and the totals. The same computation runs on any block order: with
the original order it describes the kernel as built; with the new order it
predicts the rewritten kernel (a conditional branch is taken towards the side
that no longer follows it; a fall-through that no longer falls through becomes
an unconditional jump). Recording a profile of the rewritten kernel and
computing its stats in its own order gives the *measured* numbers.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from iced_x86 import Decoder, InstructionInfoFactory, OpAccess

from kbuild_bolt.arrays import isin
from kbuild_bolt.binary.cfg import FALLTHROUGH, STATIC_KEY, TAKEN
from kbuild_bolt.x86 import decode as x86

ROWS = OrderedDict([
    ("FORWARD_COND_BRANCHES", "executed forward branches"),
    ("FORWARD_COND_BRANCHES_TAKEN", "taken forward branches"),
    ("BACKWARD_COND_BRANCHES", "executed backward branches"),
    ("BACKWARD_COND_BRANCHES_TAKEN", "taken backward branches"),
    ("UNCOND_BRANCHES", "executed unconditional branches"),
    ("FUNCTION_CALLS", "all function calls"),
    ("INDIRECT_CALLS", "indirect calls"),
    ("INSTRUCTIONS", "executed instructions"),
    ("LOADS", "executed load instructions"),
    ("STORES", "executed store instructions"),
    ("UNKNOWN_INDIRECT_BRANCHES", "taken unknown indirect branches"),
    ("ALL_BRANCHES", "total branches"),
    ("ALL_TAKEN", "taken branches"),
    ("NONTAKEN_CONDITIONAL", "non-taken conditional branches"),
    ("TAKEN_CONDITIONAL", "taken conditional branches"),
    ("ALL_CONDITIONAL", "all conditional branches"),
])


class MemoryCounter:
    """Loads and stores per instruction, decoded on demand (hot code only)."""

    def __init__(self, model):
        self.model = model
        self.factory = InstructionInfoFactory()
        self.cache: dict[int, tuple[int, int]] = {}

    def block(self, i0: int, i1: int) -> tuple[int, int]:
        key = i0
        if key in self.cache:
            return self.cache[key]
        insns = self.model.insns
        start = int(insns.addr[i0])
        end = int(insns.end_of(i1 - 1))
        loads = stores = 0
        for ins in Decoder(64, self.model.image.read(start, end - start), ip=start):
            info = self.factory.info(ins)
            for mem in info.used_memory():
                if mem.access in (OpAccess.READ, OpAccess.COND_READ, OpAccess.READ_WRITE,
                                  OpAccess.READ_COND_WRITE):
                    loads += 1
                    break
            for mem in info.used_memory():
                if mem.access in (OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE,
                                  OpAccess.READ_COND_WRITE):
                    stores += 1
                    break
        self.cache[key] = (loads, stores)
        return loads, stores


def mostly_jumping(model, code_profile) -> np.ndarray | None:
    """Per instruction: the profile saw it jump more often than not (for a
    static-key site: its key was mostly enabled). None for sampled profiles,
    which cannot tell."""
    if code_profile.sampled or not len(code_profile.taken_src):
        return None
    # (summed over the instructions that jumped, not in a whole-kernel column)
    src, at = np.unique(code_profile.taken_src, return_inverse=True)
    jumped = np.zeros(len(src), np.int64)
    np.add.at(jumped, at, code_profile.taken_count)
    mask = np.zeros(len(model.insns.addr), bool)
    mask[src] = 2 * jumped > code_profile.insn_count[src]
    return mask


def dyno_stats(model, cfg, code_profile, orders: dict | None = None,
               rows=None, memory: MemoryCounter | None = None,
               reverse_sites: bool | np.ndarray = False) -> dict[str, int]:
    """Dyno-stats for the functions ``rows`` (default: every function that ran),
    in the block ``orders`` given per function (default: as built).
    ``reverse_sites``: static-key sites (all, or a mask per instruction) that the
    rewrite reverses where their jump side follows them."""
    from kbuild_bolt.profile.attach import function_edges

    insns = model.insns
    stats = dict.fromkeys(ROWS, 0)
    counts_all = code_profile.block_counts(cfg)
    if rows is None:
        rows = sorted(set(cfg.block_func[counts_all > 0].tolist()))
    memory = memory or MemoryCounter(model)
    orders = orders or {}
    runtime = RuntimeJumps(model, code_profile)
    for row in rows:
        blocks = list(cfg.blocks_of(row))
        if not blocks:
            continue
        counts, edges = function_edges(model, cfg, code_profile, row)
        lo = blocks[0]
        order = orders.get(row, blocks)
        pos = {b: k for k, b in enumerate(order)}
        for k, b in enumerate(order):
            c = int(counts[b - lo])
            if c <= 0:
                continue
            nxt = order[k + 1] if k + 1 < len(order) else None
            i0, i1 = int(cfg.block_first[b]), int(cfg.block_end[b])
            term = int(cfg.block_term[b])
            stats["INSTRUCTIONS"] += c * (i1 - i0)
            loads, stores = memory.block(i0, i1)
            stats["LOADS"] += c * loads
            stats["STORES"] += c * stores
            flows = insns.flow[i0:i1]
            calls = int(np.count_nonzero(isin(flows, (x86.CALL, x86.IND_CALL))))
            stats["FUNCTION_CALLS"] += c * calls
            stats["INDIRECT_CALLS"] += (c * int(np.count_nonzero(flows == x86.IND_CALL))
                                        + runtime.indirect_calls(i0, i1))
            fall, taken = None, None
            for dst, kind in cfg.successors(b):
                if kind == FALLTHROUGH:
                    fall = dst
                elif kind in (TAKEN, STATIC_KEY):
                    taken = dst
            f = int(insns.flow[term])
            if f == x86.IND_JMP:
                stats["UNKNOWN_INDIRECT_BRANCHES"] += c
                continue
            w_fall = edges.get((b, fall), 0) if fall is not None else 0
            if f == x86.JCC and taken is not None and fall is not None:
                w_taken = edges.get((b, taken), 0)
                if nxt == fall:
                    side, w = taken, w_taken
                elif nxt == taken:
                    side, w = fall, w_fall       # inverted: now jumps to the old fall-through
                else:
                    side, w = taken, w_taken
                    stats["UNCOND_BRANCHES"] += w_fall   # jcc + jmp to the fall-through
                backward = pos.get(side, 0) <= k
                key = "BACKWARD_COND_BRANCHES" if backward else "FORWARD_COND_BRANCHES"
                stats[key] += c
                stats[key + "_TAKEN"] += w
                continue
            if f == x86.JCC:  # conditional tail call (target outside the function)
                stats["FORWARD_COND_BRANCHES"] += c
                stats["FORWARD_COND_BRANCHES_TAKEN"] += max(0, c - w_fall)
                if fall is not None and nxt != fall:
                    stats["UNCOND_BRANCHES"] += w_fall
                continue
            if f == x86.JMP and taken is not None:
                # (The profile's taken weight: an alternative may have patched the
                # jump away at run time.)
                if nxt != taken:
                    stats["UNCOND_BRANCHES"] += edges.get((b, taken), 0)
                if fall is not None and nxt != fall:
                    stats["UNCOND_BRANCHES"] += w_fall
                continue
            if f == x86.JMP:  # tail call / jump out of the function
                jumped, indirect = runtime.jumps_out(term, c)
                stats["UNCOND_BRANCHES"] += jumped
                stats["UNKNOWN_INDIRECT_BRANCHES"] += indirect
                continue
            if cfg.static_key_insn[term] and taken is not None:
                w_taken = edges.get((b, taken), 0)
                reversible = reverse_sites if np.ndim(reverse_sites) == 0 \
                    else bool(reverse_sites[term])
                if reversible and nxt == taken and fall is not None and fall != nxt:
                    # reversed: the key's jump side falls through, the site jumps
                    # to the old fall-through side instead
                    stats["UNCOND_BRANCHES"] += w_fall
                    continue
                if w_taken:
                    stats["UNCOND_BRANCHES"] += w_taken  # patched into a jump at run time
            if fall is not None and nxt != fall and w_fall:
                stats["UNCOND_BRANCHES"] += w_fall       # a jump added for the fall-through
    stats["ALL_CONDITIONAL"] = stats["FORWARD_COND_BRANCHES"] + stats["BACKWARD_COND_BRANCHES"]
    stats["TAKEN_CONDITIONAL"] = (stats["FORWARD_COND_BRANCHES_TAKEN"]
                                  + stats["BACKWARD_COND_BRANCHES_TAKEN"])
    stats["NONTAKEN_CONDITIONAL"] = stats["ALL_CONDITIONAL"] - stats["TAKEN_CONDITIONAL"]
    stats["ALL_BRANCHES"] = stats["ALL_CONDITIONAL"] + stats["UNCOND_BRANCHES"]
    stats["ALL_TAKEN"] = stats["TAKEN_CONDITIONAL"] + stats["UNCOND_BRANCHES"]
    return stats


class RuntimeJumps:
    """Jumps and calls as they ran, not as the file holds them. The kernel patches
    some at boot for the CPU it runs on: a ``jmp __x86_return_thunk`` becomes
    ``ret`` where the CPU needs no return thunk, a ``jmp``/``call
    __x86_indirect_thunk_<reg>`` becomes ``jmp``/``call *%reg`` without
    retpolines. An exact profile (QEMU, LBR) shows what each site did: a direct
    jump it never saw reach its target did not run as that jump. Sampled
    profiles show no transfers: the file's view is kept for them."""

    def __init__(self, model, code_profile):
        self.exact = not code_profile.sampled and len(code_profile.taken_src) > 0
        if not self.exact:
            return
        insns = model.insns
        src, dst, count = code_profile.taken_src, code_profile.taken_dst, code_profile.taken_count
        to_target = dst == insns.ref[src]
        self.jumped = _counts_by(src[to_target], count[to_target])
        self.retpoline_sites = _sites(model, ".retpoline_sites")
        self.addr = insns.addr
        from kbuild_bolt.profile.attach import indirect_calls

        calls = indirect_calls(model, code_profile)
        thunk = insns.flow[calls.site] == x86.CALL     # (calls of a retpoline thunk)
        self.called_elsewhere = _counts_by(calls.site[thunk], calls.count[thunk])

    def jumps_out(self, term: int, executed: int) -> tuple[int, int]:
        """(times a jump out of its function ran as that jump, times it ran as an
        indirect jump) of ``executed`` runs."""
        if not self.exact:
            return executed, 0
        jumped = min(self.jumped.get(term, 0), executed)
        rest = executed - jumped
        if rest and int(self.addr[term]) in self.retpoline_sites:
            return jumped, rest
        # (the rest ran as a return, or was patched into something else: no jump)
        return jumped, 0

    def indirect_calls(self, i0: int, i1: int) -> int:
        """Calls of a retpoline thunk (direct calls in the file) among instructions
        [i0, i1): indirect calls of the program, whether the thunk ran or the
        kernel patched the site into ``call *%reg``."""
        if not self.exact or not self.called_elsewhere:
            return 0
        return sum(self.called_elsewhere.get(i, 0) for i in range(i0, i1))


def _counts_by(index: np.ndarray, count: np.ndarray) -> dict[int, int]:
    keys, inverse = np.unique(index, return_inverse=True)
    sums = np.bincount(inverse, weights=count, minlength=len(keys)).astype(np.int64)
    return dict(zip(keys.tolist(), sums.tolist()))


def _sites(model, table: str) -> set[int]:
    t = model.tables.get(table)
    return set(t.targets("site").tolist()) if t is not None else set()


def format_comparison(before: dict, after: dict, title_before="before",
                      title_after="after", whole_run: tuple | None = None) -> str:
    lines = [f"{'':>14}  {title_before:>14}  {title_after:>14}   change   (dyno-stats)"]
    for key, label in ROWS.items():
        a, b = before[key], after[key]
        change = f"{100.0 * (b - a) / a:+.1f}%" if a else "   n/a"
        lines.append(f"{a:>14,}  {b:>14,}  {change:>7}   {label}")
    if whole_run:
        a, b = whole_run
        lines.append(f"{a:>14,}  {b:>14,}  {100.0 * (b - a) / a:+6.1f}%   taken jmp/jcc of the "
                     f"whole run (the profile's own count, and the predicted change added)")
    return "\n".join(lines)


def with_promoted_calls(stats: dict, calls: int, hits: int) -> dict:
    """``stats`` with promoted indirect calls counted as they will run: each call
    of a promoted site first compares and branches (``jne``, forward to the
    fallback); ``hits`` go straight to a direct call, the others take the jne,
    call indirectly as before and jump back."""
    out = dict(stats)
    misses = calls - hits
    out["INDIRECT_CALLS"] = max(0, out["INDIRECT_CALLS"] - hits)
    out["INSTRUCTIONS"] += 2 * calls + misses            # cmp, jne (+ jmp back)
    for key, n in (("FORWARD_COND_BRANCHES", calls), ("FORWARD_COND_BRANCHES_TAKEN", misses),
                   ("UNCOND_BRANCHES", misses), ("ALL_BRANCHES", calls + misses),
                   ("ALL_TAKEN", 2 * misses), ("NONTAKEN_CONDITIONAL", hits),
                   ("TAKEN_CONDITIONAL", misses), ("ALL_CONDITIONAL", calls)):
        out[key] += n
    return out


def whole_run_taken(model, code_profile, before: dict, after: dict) -> tuple[int, int] | None:
    """(taken jmp/jcc the profile itself counts, that count after the layout): the
    measurement the kernel will give, predicted. dyno-stats cover the functions
    they model; what they do not (code outside functions, functions left as
    they are, indirect jumps, sites patched into jumps at boot) the layout does
    not change, so the predicted change applies to the profile's whole count.
    None for sampled profiles (no taken branches to count)."""
    if code_profile.sampled or not len(code_profile.taken_src):
        return None
    base = measured_taken_branches(model, code_profile)["taken_branches"]
    if not base:
        return None
    return base, max(0, base + after["ALL_TAKEN"] - before["ALL_TAKEN"])


def measured_taken_branches(model, code_profile) -> dict[str, int]:
    """Taken jmp/jcc executed, straight from a profile of the kernel itself (only
    real jmp/jcc sources count; calls and returns do not)."""
    insns = model.insns
    src = code_profile.taken_src
    flow = insns.flow[src]
    # Every validated taken transfer is a jump (static-key sites and alternatives
    # jump at run time from what the file holds as nops).
    jumps = ~isin(flow, (x86.CALL, x86.IND_CALL, x86.RET))
    in_kernel_code = model.function_of_insn[src] >= 0
    cond = flow == x86.JCC
    counts = code_profile.taken_count
    return {
        "taken_branches": int(counts[jumps].sum()),
        "taken_conditional": int(counts[jumps & cond].sum()),
        "taken_unconditional": int(counts[jumps & ~cond].sum()),
        "taken_in_functions": int(counts[jumps & in_kernel_code].sum()),
        "executed_instructions": int(code_profile.insn_count.sum()),
    }
