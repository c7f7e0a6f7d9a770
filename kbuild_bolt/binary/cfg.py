"""Basic blocks and control-flow graphs of every function, built at once with numpy.

Leaders (first instructions of blocks) come from:
- function starts;
- the instruction after a terminator (jmp, jcc, ret, indirect jmp, int3, a BUG
  ud2, a static-key site);
- targets of branches inside the function, and branches from elsewhere into it;
- addresses taken in code (RIP-relative operands, absolute relocations) and
  in data (relocations, e.g. jump tables) that point inside a function;
- table entries control can arrive at (exception fixups, static-key targets).

An alternative or paravirt site is a *patch unit*: the kernel overwrites it as
a whole, so it is never split; a block boundary needed strictly inside one
makes the function unsafe to lay out ("patch-unit-split").

Each function is classified simple (safe to lay out again) or not, with the
first reason from :data:`REASONS` that applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbuild_bolt.arrays import isin, unique
from kbuild_bolt.elf.image import type_and_symbol
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.kernel.tables.bug_table import BUGFLAG_WARNING
from kbuild_bolt.x86 import decode as x86

# Why a function is left alone (index = reason code; 0 is "simple").
REASONS = (
    "simple",
    "overlap",                  # its symbol range overlaps another function's
    "thunk",                    # runtime-patched thunk/trampoline, or alignment-critical code
    "decode-error",             # bytes iced-x86 cannot decode as instructions
    "branch-into-instruction",  # a branch or reference lands inside one of its instructions
    "patch-unit-split",         # a block boundary needed inside an alternative/paravirt site
    "falls-off-end",            # its last instruction continues into the next function
    "external-short-branch",    # entered by a short branch from code that does not move with it
    "interior-symbol",          # a symbol inside it: code elsewhere knows that address or offset
)
REASON_CODE = {name: i for i, name in enumerate(REASONS)}

# Code whose bytes or addresses other code depends on beyond relocations: the
# retpoline/return thunks (alignment and SRSO aliasing), static call
# trampolines (patched in place with a fixed signature), call-depth thunks.
THUNK_PREFIXES = (
    "__x86_indirect_thunk_", "__x86_indirect_call_thunk_", "__x86_indirect_jump_thunk_",
    "__x86_return_thunk", "__x86_return_skl", "srso_", "retbleed_", "entry_untrain_ret",
    "zen_untrain_ret", "its_return_thunk", "__SCT__", "call_depth_return_thunk",
    "__x86_indirect_its_thunk_", "__fentry__",
)

# Edge kinds.
FALLTHROUGH = 0
TAKEN = 1        # direct jmp/jcc target
STATIC_KEY = 2   # the jump side of a static-key site
INDIRECT = 3     # possible target of an indirect jump (address taken in the function)

EDGE_NAMES = {FALLTHROUGH: "fallthrough", TAKEN: "branch", STATIC_KEY: "static-key",
              INDIRECT: "indirect"}


@dataclass
class CFG:
    """Blocks of all functions in address order (numpy columns)."""

    block_first: np.ndarray   # int64 first instruction index
    block_end: np.ndarray     # int64 one past the last instruction index
    block_term: np.ndarray    # int64 index of the block's terminating instruction
    block_func: np.ndarray    # int64 function row
    func_first_block: np.ndarray
    func_end_block: np.ndarray
    func_reason: np.ndarray   # uint8 reason code per function
    edge_src: np.ndarray      # int64 block
    edge_dst: np.ndarray      # int64 block
    edge_kind: np.ndarray     # uint8
    static_key_insn: np.ndarray   # bool per instruction
    entry_insn: np.ndarray        # bool per instruction: control arrives from elsewhere
    external_entry_insn: np.ndarray  # bool per instruction: entered from outside the function

    def __len__(self) -> int:
        return len(self.block_first)

    @property
    def simple(self) -> np.ndarray:
        return self.func_reason == 0

    def reason_counts(self) -> dict[str, int]:
        counts = np.bincount(self.func_reason, minlength=len(REASONS))
        return {REASONS[i]: int(c) for i, c in enumerate(counts) if c}

    def successors(self, block: int) -> list[tuple[int, int]]:
        lo = int(np.searchsorted(self.edge_src, block, side="left"))
        hi = int(np.searchsorted(self.edge_src, block, side="right"))
        return list(zip(self.edge_dst[lo:hi].tolist(), self.edge_kind[lo:hi].tolist()))

    def blocks_of(self, row: int) -> range:
        return range(int(self.func_first_block[row]), int(self.func_end_block[row]))


def _code_references(model) -> np.ndarray:
    """Addresses taken by relocations outside the known tables (data → code,
    absolute immediates in code). PC-relative references from code are taken
    from the decoded instructions instead."""
    image = model.image
    if not image.has_relocations:
        return np.zeros(0, np.uint64)
    table_ranges = [(d.addr, d.addr + d.size) for d in model.tables.values()]
    symbols = image.symbols.value
    sym_type = image.symbols.type
    functions = model.functions
    out = []
    for rela in image.rela_sections:
        target_section = image.sections[rela.info]
        r = image.relocations(rela)
        if not len(r):
            continue
        kind, sym = type_and_symbol(r["info"])
        if target_section.is_exec:
            keep = isin(kind, (1, 10, 11))            # R_X86_64_64, _32, _32S
        else:
            keep = isin(kind, (1, 2, 4, 10, 11, 24))  # + PC32, PLT32, PC64
        offsets = r["offset"]
        for lo, hi in table_ranges:
            keep &= ~((offsets >= np.uint64(lo)) & (offsets < np.uint64(hi)))
        sym = sym[keep]
        valid = sym < len(symbols)
        sym = sym[valid]
        value = (symbols[sym].astype(np.int64) + r["addend"][keep][valid]).astype(np.uint64)
        # symbol+offset names a place inside a function only when the symbol is a
        # section (how assemblers refer to local labels) or lies in that function;
        # otherwise it is address arithmetic (e.g. _text + 0xfff), not a reference.
        row = functions.rows_containing(value)
        same = (functions.rows_containing(symbols[sym]) == row) | (sym_type[sym] == 3)
        out.append(value[same | (row < 0)])
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def build_cfg(model) -> CFG:
    insns = model.insns
    n = len(insns)
    functions = model.functions
    nf = len(functions)
    f_of = model.function_of_insn
    in_func = f_of >= 0
    reason = np.zeros(nf, np.uint8)

    def flag(rows, name):
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[rows >= 0]
        code = REASON_CODE[name]
        current = reason[rows]
        reason[rows] = np.where(current == 0, code, current)

    # Overlapping symbols and thunks.
    overlap = np.flatnonzero(functions.start[1:] < functions.end[:-1])
    flag(np.concatenate([overlap, overlap + 1]), "overlap")
    flag([i for i, name in enumerate(functions.names) if name.startswith(THUNK_PREFIXES)], "thunk")
    flag(f_of[insns.invalid & in_func], "decode-error")
    # Labels inside a function (ftrace_caller's ftrace_call, ...) are addresses other
    # code patches or copies between: the function must keep its layout.
    symbols = model.image.symbols
    code_sections = unique(functions.section)
    labels = symbols.value[isin(symbols.shndx, code_sections) & isin(symbols.type, (0, 1, 2))]
    label_row = functions.rows_containing(labels)
    interior = (label_row >= 0) & (labels != functions.start[np.maximum(label_row, 0)])
    flag(label_row[interior], "interior-symbol")

    flow = insns.flow
    # --- terminators -------------------------------------------------------
    bug = model.tables.get("__bug_table")
    warn_insn = np.zeros(n, bool)
    if bug is not None:
        idx = model.insn_index(bug.targets("bug_addr"))
        is_warn = (bug.entries["flags"][bug.indices] & BUGFLAG_WARNING) != 0
        warn_insn[idx[(idx >= 0) & is_warn]] = True
    first_bytes = model.read_bytes(insns.addr[flow == x86.EXCEPTION], 2)
    ud2 = np.zeros(n, bool)
    ud2[np.flatnonzero(flow == x86.EXCEPTION)] = (first_bytes[:, 0] == 0x0F) & (first_bytes[:, 1] == 0x0B)
    int3 = np.zeros(n, bool)
    interrupts = np.flatnonzero(flow == x86.INTERRUPT)
    int3[interrupts] = model.read_bytes(insns.addr[interrupts], 1)[:, 0] == x86.INT3

    static_key = np.zeros(n, bool)
    entry = np.zeros(n, bool)
    branch_site_target = {}
    for data in model.tables.values():
        for ref in data.spec.refs:
            if ref.role == base.BRANCH:
                sites = model.insn_index(data.targets(ref.field))
                targets = data.targets(ref.other)
                ok = sites >= 0
                static_key[sites[ok]] = True
                t_idx = model.insn_index(targets[ok])
                for s, t in zip(sites[ok].tolist(), t_idx.tolist()):
                    branch_site_target[s] = t
                entry[t_idx[t_idx >= 0]] = True
                bad = targets[ok][t_idx < 0]
                flag(functions.rows_containing(bad), "branch-into-instruction")
            elif ref.role == base.ENTRY:
                targets = data.targets(ref.field)
                idx = model.insn_index(targets)
                entry[idx[idx >= 0]] = True
                flag(functions.rows_containing(targets[idx < 0]), "branch-into-instruction")

    terminator = (isin(flow, (x86.JMP, x86.IND_JMP, x86.JCC, x86.RET))
                  | int3 | (ud2 & ~warn_insn) | static_key)
    # int3 right after a ret or jmp is a straight-line-speculation stop (SLS):
    # it stays glued to the jump it guards instead of becoming a block.
    glued = np.zeros(n, bool)
    not_int3 = np.flatnonzero(~int3)
    int3_idx = np.flatnonzero(int3)
    if len(int3_idx) and len(not_int3):
        prev = not_int3[np.maximum(np.searchsorted(not_int3, int3_idx) - 1, 0)]
        ok = (prev < int3_idx) & isin(flow[prev], (x86.JMP, x86.IND_JMP, x86.RET))
        ok &= f_of[prev] == f_of[int3_idx]
        glued[int3_idx[ok]] = True

    # --- references into functions ----------------------------------------
    direct = (insns.ref_kind == x86.REF_BRANCH) & isin(flow, (x86.JMP, x86.JCC))
    src = np.flatnonzero(direct)
    tgt = insns.ref[src]
    t_idx = model.insn_index(tgt)
    t_row = functions.rows_containing(tgt)
    into_function = t_row >= 0
    flag(t_row[into_function & (t_idx < 0)], "branch-into-instruction")
    ok = into_function & (t_idx >= 0)
    external = ok & (f_of[src] != t_row)
    # Branches from another function land at the target's start (a tail call) or
    # inside it (entry from outside: e.g. foo.cold jumping back into foo).
    t_start = functions.start[np.maximum(t_row, 0)]
    external_interior = external & (tgt != t_start)
    external_entry = np.zeros(n, bool)
    external_entry[t_idx[external_interior]] = True
    short = insns.length[src] == 2
    flag(t_row[external_interior & short], "external-short-branch")
    internal_target = np.zeros(n, bool)
    internal_target[t_idx[ok & ~external]] = True

    # Addresses taken: RIP-relative operands in code, relocations from data. A
    # RIP-relative operand with a relocation names symbol+offset: like any
    # relocation it is a reference only when the symbol is a section or lies in
    # the function it points into (memcpy from core_restore_code reads the
    # page-end bytes of an unrelated function: arithmetic, not a reference).
    rip_idx = np.flatnonzero(insns.ref_kind == x86.REF_RIPREL)
    riprel = insns.ref[rip_idx]
    relocs = model.code_relocations
    r = relocs.first_in(insns.addr[rip_idx], insns.end_of(rip_idx))
    has = r >= 0
    if has.any():
        symbols = model.image.symbols
        sym = relocs.sym[r[has]]
        sym_value = symbols.value[sym]
        named = (symbols.type[sym] != 3) & (
            functions.rows_containing(sym_value) != functions.rows_containing(riprel[has]))
        keep = np.ones(len(riprel), bool)
        keep[np.flatnonzero(has)[named]] = False
        riprel = riprel[keep]
    taken = np.concatenate([riprel, _code_references(model)])
    taken_row = functions.rows_containing(taken)
    taken = taken[(taken_row >= 0) & (taken != functions.start[np.maximum(taken_row, 0)])]
    taken_idx = model.insn_index(taken)
    flag(functions.rows_containing(taken[taken_idx < 0]), "branch-into-instruction")
    taken_insn = np.zeros(n, bool)
    taken_insn[taken_idx[taken_idx >= 0]] = True
    external_entry |= taken_insn

    # --- leaders ------------------------------------------------------------
    func_first = model.function_first_insn
    func_end = model.function_end_insn
    hard = internal_target | external_entry | entry
    glued &= ~hard
    soft = np.zeros(n, bool)
    soft[1:] = terminator[:-1] & ~glued[1:]
    same_func = np.zeros(n, bool)
    same_func[1:] = (f_of[1:] == f_of[:-1]) & (f_of[1:] >= 0)
    soft &= same_func

    unit_inside = model.insn_inside_patch_unit
    split = hard & unit_inside & in_func
    flag(f_of[split], "patch-unit-split")
    # After a terminator inside a patch unit the next block starts where the unit ends.
    moved = np.flatnonzero(soft & unit_inside)
    if len(moved):
        unit_start, unit_end = model.patch_units
        u = np.searchsorted(unit_start, insns.addr[moved], side="right") - 1
        after = model.insn_index(unit_end[u])
        after = after[(after >= 0)]
        after = after[same_func[after]]
        soft[after] = True
    leader = (hard & ~unit_inside) | (soft & ~unit_inside)
    leader &= in_func
    leader[func_first[func_first < func_end]] = True

    # A function whose last instruction is not a terminator runs into the next
    # one, unless it is a call (to a noreturn function) or a trap.
    last = func_end - 1
    has_insns = func_end > func_first
    last_ok = terminator[last[has_insns]] | isin(flow[last[has_insns]], (x86.CALL, x86.IND_CALL,
                                                                             x86.EXCEPTION))
    # A patch unit at the very end (e.g. jmp + padding nops) ends where its jump does.
    last_in_unit = unit_inside[last[has_insns]]
    rows_with = np.flatnonzero(has_insns)
    flag(rows_with[~(last_ok | last_in_unit)], "falls-off-end")

    # --- blocks -------------------------------------------------------------
    block_first = np.flatnonzero(leader)
    block_func = f_of[block_first].astype(np.int64)
    next_first = np.empty(len(block_first), np.int64)
    next_first[:-1] = block_first[1:]
    next_first[-1:] = n
    block_end = np.minimum(next_first, func_end[block_func])
    # The terminator of a block is its last terminator instruction (inside a patch
    # unit a jmp may be followed by padding that stays with it), else its last one.
    term_pos = np.flatnonzero(terminator & ~glued)
    k = np.searchsorted(term_pos, block_end, side="left") - 1
    cand = term_pos[np.maximum(k, 0)]
    has_term = (k >= 0) & (cand >= block_first)
    block_term = np.where(has_term, cand, block_end - 1)

    func_first_block = np.searchsorted(block_first, func_first).astype(np.int64)
    func_end_block = np.searchsorted(block_first, func_end).astype(np.int64)
    # (the last block starting at or before each instruction: a running count of starts)
    starts_here = np.zeros(n, np.int64)
    starts_here[block_first] = 1
    block_of_insn = np.cumsum(starts_here) - 1
    del starts_here

    # --- edges --------------------------------------------------------------
    nb = len(block_first)
    blocks = np.arange(nb)
    t_flow = flow[block_term]
    t_static = static_key[block_term]
    has_next = (blocks + 1 < nb)
    has_next[has_next] &= block_func[blocks[has_next] + 1] == block_func[has_next]
    falls = has_next & ~isin(t_flow, (x86.JMP, x86.IND_JMP, x86.RET)) \
        & ~(int3[block_term] | (ud2[block_term] & ~warn_insn[block_term]))
    falls |= has_next & t_static
    # A jump that is (part of) an alternative's original site may be patched into
    # something that falls through (static_cpu_has: "jmp to aux code" becomes nops),
    # so the block after the site stays a successor.
    unit_start, unit_end = model.patch_units
    if len(unit_start):
        term_addr = insns.addr[block_term]
        u = np.searchsorted(unit_start, term_addr, side="right").astype(np.int64) - 1
        in_unit_term = u >= 0
        in_unit_term[in_unit_term] &= term_addr[in_unit_term] < unit_end[u[in_unit_term]]
        falls |= has_next & in_unit_term
    src_l = [blocks[falls]]
    dst_l = [blocks[falls] + 1]
    kind_l = [np.full(int(falls.sum()), FALLTHROUGH, np.uint8)]

    branchy = isin(t_flow, (x86.JMP, x86.JCC)) & (insns.ref_kind[block_term] == x86.REF_BRANCH)
    tb = blocks[branchy]
    target = insns.ref[block_term[tb]]
    t_i = model.insn_index(target)
    internal = (t_i >= 0)
    internal[internal] &= f_of[t_i[internal]] == block_func[tb[internal]]
    src_l.append(tb[internal])
    dst_l.append(block_of_insn[t_i[internal]])
    kind_l.append(np.where(t_static[tb[internal]], STATIC_KEY, TAKEN).astype(np.uint8))

    # Static-key nops: the jump side comes from the table.
    nop_sites = blocks[t_static & ~branchy]
    site_targets = np.array([branch_site_target.get(int(block_term[b]), -1) for b in nop_sites],
                            dtype=np.int64)
    good = site_targets >= 0
    if good.any():
        good[good] &= f_of[site_targets[good]] == block_func[nop_sites[good]]
    src_l.append(nop_sites[good])
    dst_l.append(block_of_insn[site_targets[good]])
    kind_l.append(np.full(int(good.sum()), STATIC_KEY, np.uint8))

    # Indirect jumps may reach any address taken inside their function.
    ind = blocks[t_flow == x86.IND_JMP]
    if len(ind):
        taken_blocks = block_of_insn[np.flatnonzero(taken_insn & in_func)]
        taken_func = block_func[taken_blocks]
        order = np.argsort(taken_func, kind="stable")
        taken_blocks, taken_func = taken_blocks[order], taken_func[order]
        for b in ind.tolist():
            f = block_func[b]
            lo, hi = np.searchsorted(taken_func, [f, f + 1])
            if hi > lo:
                dst = unique(taken_blocks[lo:hi])
                src_l.append(np.full(len(dst), b, np.int64))
                dst_l.append(dst)
                kind_l.append(np.full(len(dst), INDIRECT, np.uint8))

    edge_src = np.concatenate(src_l).astype(np.int64)
    edge_dst = np.concatenate(dst_l).astype(np.int64)
    edge_kind = np.concatenate(kind_l).astype(np.uint8)
    order = np.lexsort((edge_kind, edge_src))
    return CFG(
        block_first=block_first.astype(np.int64), block_end=block_end.astype(np.int64),
        block_term=block_term.astype(np.int64), block_func=block_func,
        func_first_block=func_first_block, func_end_block=func_end_block, func_reason=reason,
        edge_src=edge_src[order], edge_dst=edge_dst[order], edge_kind=edge_kind[order],
        static_key_insn=static_key, entry_insn=hard & in_func,
        external_entry_insn=external_entry & in_func,
    )
