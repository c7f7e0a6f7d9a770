"""Put a profile on the code: instruction counts, block counts, weighted edges.

Ranges give how often every instruction ran (a difference array over the
decoded instructions, so a whole kernel profile attaches in one pass).
Transfers give taken edges; a transfer is kept only when it is what the source
instruction can do: a direct jmp/jcc to its target, an indirect jmp anywhere, a
static-key site to its key's target (the kernel patches nops into jumps at run
time), or anything from inside an alternative (patched at boot). Anything else
is an interrupt or exception arriving between two blocks, not a branch.
Fall-through weights follow: what ran at the end of a block and did not jump.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import isin
from kbuild_bolt.binary.cfg import FALLTHROUGH
from kbuild_bolt.errors import KbbError
from kbuild_bolt.x86 import decode as x86


@dataclass
class CodeProfile:
    insn_count: np.ndarray     # int64 executions per instruction
    taken_src: np.ndarray      # int64 instruction index of a taken branch
    taken_dst: np.ndarray      # uint64 where it went
    taken_count: np.ndarray    # int64
    matched: float             # share of profile counts that landed on decoded code
    sampled: bool = False
    # Transfers from call instructions (direct or indirect): the call graph.
    call_src: np.ndarray | None = None   # int64 instruction index of the call
    call_dst: np.ndarray | None = None   # uint64 where it went
    call_count: np.ndarray | None = None

    def taken_edges(self, model, cfg) -> "TakenEdges":
        """Every taken branch as a block edge, sorted by source (made once for
        all functions: every hot function asks for its own)."""
        if getattr(self, "_taken_edges", None) is None:
            self._taken_edges = TakenEdges.of(model, cfg, self)
        return self._taken_edges

    def block_counts(self, cfg) -> np.ndarray:
        """Executions per block (sampled profiles: the hits anywhere in the block)."""
        if self.sampled:
            return np.add.reduceat(self.insn_count, cfg.block_first)[:len(cfg.block_first)]
        return self.insn_count[cfg.block_first]


@dataclass
class TakenEdges:
    """A profile's taken branches in blocks, by source instruction."""

    order: np.ndarray        # record index (into CodeProfile.taken_*), by source
    src: np.ndarray          # source instruction, sorted
    dst: np.ndarray          # instruction it lands on (-1: none starts there)
    b_src: np.ndarray        # source block
    b_dst: np.ndarray        # destination block
    starts_block: np.ndarray  # lands on the first instruction of b_dst
    leaves: np.ndarray       # taken from b_src's end or terminator: its way out
    weight: np.ndarray
    in_profile_order: bool   # the profile's records were already by source

    @classmethod
    def of(cls, model, cfg, cp: "CodeProfile") -> "TakenEdges":
        order = np.argsort(cp.taken_src, kind="stable")
        src = cp.taken_src[order].astype(np.int64)
        dst = model.insn_index(cp.taken_dst[order])
        b_src = np.searchsorted(cfg.block_first, src, side="right") - 1
        b_dst = np.searchsorted(cfg.block_first, dst, side="right") - 1
        safe_src, safe_dst = np.maximum(b_src, 0), np.maximum(b_dst, 0)
        starts_block = (b_dst >= 0) & (cfg.block_first[safe_dst] == dst)
        leaves = (src == cfg.block_end[safe_src] - 1) | (src == cfg.block_term[safe_src])
        return cls(order, src, dst, b_src, b_dst, starts_block, leaves,
                   cp.taken_count[order].astype(np.int64),
                   bool(np.all(order == np.arange(len(order)))))

    def from_range(self, lo: int, hi: int) -> np.ndarray:
        """Positions (into these arrays) of the branches from instructions
        [lo, hi), in the profile's own order."""
        a, b = np.searchsorted(self.src, (lo, hi)).tolist()
        at = np.arange(a, b)
        if self.in_profile_order:
            return at
        return at[np.argsort(self.order[a:b], kind="stable")]


def attach(model, profile) -> CodeProfile:
    """``profile``'s counts on vmlinux ``model``'s instructions and edges
    (module code, which is not in vmlinux, left out: ``matched`` is the share
    of the vmlinux part's counts on this kernel's code)."""
    profile = profile.kernel_only()
    insns = model.insns
    n = len(insns.addr)
    if not len(profile.range_start) and len(profile.src):
        profile = _ranges_from_transfers(model, profile)
    diff = np.zeros(n + 1, np.int64)
    total = int(profile.range_count.sum()) or 1
    if len(profile.range_start):
        i0 = model.insn_index(profile.range_start)
        i1 = model.insn_index(profile.range_last)
        ok = (i0 >= 0) & (i1 >= i0)
        np.add.at(diff, i0[ok], profile.range_count[ok])
        np.add.at(diff, i1[ok] + 1, -profile.range_count[ok])
        matched = float(profile.range_count[ok].sum()) / total
    else:
        matched = 0.0
    insn_count = np.cumsum(diff[:-1], out=diff[:-1])    # (in place: one per instruction)
    if (insn_count < 0).any():
        raise KbbError("profile ranges overlap inconsistently")

    src = model.insn_index(profile.src)
    ok = src >= 0
    s, d, c = src[ok], profile.dst[ok], profile.count[ok]
    flow = insns.flow[s]
    ref = insns.ref[s]
    ends = insns.end_of(s)
    direct = isin(flow, (x86.JMP, x86.JCC)) & (insns.ref_kind[s] == x86.REF_BRANCH)
    good = (direct & (d == ref)) | ((flow == x86.IND_JMP) & (d != ends))
    # Static-key sites: nops in the file, jumps at run time.
    jt = model.tables.get("__jump_table")
    if jt is not None:
        codes, targets = jt.targets("code"), jt.targets("target")
        order = np.argsort(codes)
        codes, targets = codes[order], targets[order]
        k = np.minimum(np.searchsorted(codes, insns.addr[s]), max(len(codes) - 1, 0))
        if len(codes):
            good |= (codes[k] == insns.addr[s]) & (targets[k] == d)
    # Alternatives: the code that ran is the replacement.
    in_unit = model.inside_patch_unit(insns.addr[s])
    unit_start, _ = model.patch_units
    at_unit = np.zeros(len(s), bool)
    if len(unit_start):
        j = np.minimum(np.searchsorted(unit_start, insns.addr[s]), len(unit_start) - 1)
        at_unit = unit_start[j] == insns.addr[s]
    same_function = model.functions.rows_containing(d) == model.function_of_insn[s]
    # (A patched-in "rep movsb" restarts itself every iteration under QEMU: a
    # transfer to its own address is not a branch.)
    good |= (in_unit | at_unit) & same_function & (d != ends) & (d != insns.addr[s])
    calls = isin(flow, (x86.CALL, x86.IND_CALL)) & (d != ends)
    return CodeProfile(insn_count, s[good], d[good], c[good], matched,
                       sampled=getattr(profile, "sampled", False),
                       call_src=s[calls], call_dst=d[calls], call_count=c[calls])


def function_calls(model, cp: CodeProfile) -> tuple[np.ndarray, ...]:
    """Calls between functions: (caller row, callee row, count, call-site offset in
    the caller). Direct calls and tail jumps count as often as their instruction
    ran (exact for QEMU profiles, an estimate from samples); indirect calls as
    often as the profile saw them land on a function's entry."""
    insns = model.insns
    functions = model.functions
    f_of = model.function_of_insn
    direct = np.flatnonzero((insns.ref_kind == x86.REF_BRANCH) & (cp.insn_count > 0)
                            & isin(insns.flow, (x86.CALL, x86.JMP)))
    callee = functions.rows_containing(insns.ref[direct])
    at_entry = (callee >= 0) & (insns.ref[direct] == functions.start[np.maximum(callee, 0)])
    direct, callee = direct[at_entry], callee[at_entry]
    src = [direct]
    dst = [callee]
    count = [cp.insn_count[direct]]
    if cp.call_src is not None and len(cp.call_src):
        indirect = insns.flow[cp.call_src] == x86.IND_CALL
        s, d = cp.call_src[indirect], cp.call_dst[indirect]
        row = functions.rows_containing(d)
        entry = (row >= 0) & (d == functions.start[np.maximum(row, 0)])
        src.append(s[entry])
        dst.append(row[entry])
        count.append(cp.call_count[indirect][entry])
    site = np.concatenate(src)
    caller = f_of[site]
    callee = np.concatenate(dst)
    keep = (caller >= 0) & (callee >= 0)
    site, caller, callee = site[keep], caller[keep], callee[keep]
    offset = (insns.addr[site] - functions.start[caller]).astype(np.int64)
    return caller, callee, np.concatenate(count)[keep].astype(np.int64), offset


@dataclass
class IndirectCalls:
    """Indirect calls the profile saw, by site: the program's indirect calls,
    whether through a register or memory, or through a retpoline thunk (the
    QEMU profile follows those to their real target)."""

    site: np.ndarray      # int64 instruction index of the call
    target: np.ndarray    # uint64 where it went
    count: np.ndarray     # int64

    def by_site(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """(site, executions, [(target, count), ...] most frequent first), hottest
        sites first."""
        out = {}
        for s, t, c in zip(self.site.tolist(), self.target.tolist(), self.count.tolist()):
            out.setdefault(s, []).append((t, c))
        rows = [(s, sum(c for _, c in ts), sorted(ts, key=lambda tc: -tc[1]))
                for s, ts in out.items()]
        return sorted(rows, key=lambda r: -r[1])


def indirect_calls(model, cp: CodeProfile) -> IndirectCalls:
    insns = model.insns
    empty = IndirectCalls(np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64))
    if cp.call_src is None or not len(cp.call_src):
        return empty
    s, d, c = cp.call_src, cp.call_dst, cp.call_count
    flow = insns.flow[s]
    thunk_calls = np.zeros(len(s), bool)
    table = model.tables.get(".retpoline_sites")
    if table is not None and table.count:
        thunk_calls = (isin(insns.addr[s], table.targets("site")) & (flow == x86.CALL)
                       & (d != insns.ref[s]))   # (not the call into the thunk itself)
    keep = (flow == x86.IND_CALL) | thunk_calls
    return IndirectCalls(s[keep], d[keep], c[keep])


def executed_indirect_calls(model, cp: CodeProfile) -> int:
    """Indirect calls the kernel executed, as it ran: through a register, memory or
    a retpoline thunk. A call inside a patch unit is not counted: those are the
    paravirt calls (``.parainstructions`` on 6.1, ``ALT_CALL`` alternatives on
    6.12), which the kernel patches into direct calls at boot."""
    calls = indirect_calls(model, cp)
    if not len(calls.site):
        return 0
    return int(calls.count[~model.in_patch_unit(model.insns.addr[calls.site])].sum())


def function_samples(model, cp: CodeProfile) -> np.ndarray:
    """Instructions each function executed (0: never ran)."""
    f_of = model.function_of_insn
    ok = f_of >= 0
    return np.bincount(f_of[ok], weights=cp.insn_count[ok],
                       minlength=len(model.functions)).astype(np.int64)


def _ranges_from_transfers(model, profile):
    """A profile of transfers only (BOLT .fdata): execution runs from where each
    transfer lands to the next control-transfer instruction."""
    from kbuild_bolt.profile.model import Profile

    insns = model.insns
    n = len(insns.addr)
    cti = np.flatnonzero(insns.flow != x86.NEXT)
    dst = model.insn_index(profile.dst)
    ok = dst >= 0
    j = dst[ok]
    k = np.searchsorted(cti, j)
    last = np.where(k < len(cti), cti[np.minimum(k, len(cti) - 1)], n - 1)
    return Profile(insns.addr[j], insns.addr[last], profile.count[ok], profile.src, profile.dst,
                   profile.count, profile.kernel, profile.source, profile.shapes, profile.sampled)


def function_edges(model, cfg, cp: CodeProfile, row: int):
    """(block counts, {(src block, dst block): weight}) of one function."""
    blocks = cfg.blocks_of(row)
    lo, hi = blocks.start, blocks.stop
    first = cfg.block_first[lo:hi]
    f_lo = int(cfg.block_first[lo]) if hi > lo else 0
    f_hi = int(cfg.block_end[hi - 1]) if hi > lo else 0
    if cp.sampled:
        # (the hits anywhere in each block)
        before = np.concatenate(([0], np.cumsum(cp.insn_count[f_lo:f_hi], dtype=np.int64)))
        counts = before[cfg.block_end[lo:hi] - f_lo] - before[first - f_lo]
    else:
        counts = cp.insn_count[first]
    edges: dict[tuple[int, int], int] = {}
    taken_out: dict[int, int] = {}
    taken = cp.taken_edges(model, cfg)
    at = taken.from_range(f_lo, f_hi)
    if len(at):
        # (a branch that leaves the function makes no edge of it; one that lands
        # inside a block, a runtime-only target, makes none either)
        at = at[(taken.dst[at] >= f_lo) & (taken.dst[at] < f_hi) & taken.starts_block[at]]
        for s_, d_, w, out in zip(taken.b_src[at].tolist(), taken.b_dst[at].tolist(),
                                  taken.weight[at].tolist(), taken.leaves[at].tolist()):
            edges[(s_, d_)] = edges.get((s_, d_), 0) + w
            if out:
                taken_out[s_] = taken_out.get(s_, 0) + w
    if cp.sampled:
        return counts, _infer_edges(cfg, lo, hi, counts, edges)
    e_lo, e_hi = np.searchsorted(cfg.edge_src, [lo, hi])
    for src, dst, kind in zip(cfg.edge_src[e_lo:e_hi].tolist(), cfg.edge_dst[e_lo:e_hi].tolist(),
                              cfg.edge_kind[e_lo:e_hi].tolist()):
        if kind != FALLTHROUGH:
            continue
        ran = int(cp.insn_count[int(cfg.block_end[src]) - 1])
        w = ran - taken_out.get(src, 0)
        if w > 0:
            edges[(src, dst)] = edges.get((src, dst), 0) + w
    return counts, edges


def _infer_edges(cfg, lo, hi, counts, edges):
    """Without branch records (sampled profiles): share each block's count among its
    successors in proportion to their counts."""
    e_lo, e_hi = np.searchsorted(cfg.edge_src, [lo, hi])
    succ: dict[int, list[int]] = {}
    for src, dst in zip(cfg.edge_src[e_lo:e_hi].tolist(), cfg.edge_dst[e_lo:e_hi].tolist()):
        succ.setdefault(src, []).append(dst)
    for src, dsts in succ.items():
        c = int(counts[src - lo])
        if not c:
            continue
        weights = [int(counts[d - lo]) for d in dsts]
        total = sum(weights)
        for d, w in zip(dsts, weights):
            share = c * w // total if total else c // len(dsts)
            if share:
                edges[(src, d)] = edges.get((src, d), 0) + share
    return edges
