"""Emit every rewritten function: its blocks in a new order inside its own slot.

A block is emitted as its *body* (instructions copied byte for byte, with any
PC-relative field recomputed for the new address) followed by its terminator:
a direct jump or conditional jump to a block of the same function is encoded
anew (short or near, inverted when its taken side now falls through, removed
when its target follows), a static-key site keeps its nop/jmp state at 2 or 5
bytes, and a jump is added where a fall-through no longer falls through.
Everything else is part of the body: table sites (retpoline, return, static
call), patch units (alternatives, paravirt: never resized), calls, returns.
A promoted indirect call (kbuild_bolt.rewrite.promote) splits the body: a
cmp, a jne to its fallback and a direct call take its place, and the fallback
(the call as it was, and a jump back) goes after the function's last block.

Branch sizes are relaxed: all start short and grow until every displacement
fits. A function too big for its slot keeps the longest prefix of its layout
that fits and sends the rest to one fragment in free room of .text.

All functions are emitted together, as flat numpy columns: one row per layout
position (a block in its new place), per *item* (a run of copied instructions
or one emitted branch) and per instruction. Each function's result depends
only on its own blocks (and, for fragments, on the functions before it in
address order), so the whole kernel costs a handful of array passes instead of
Python work per block. The result is an :class:`Emission`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import RunColumn, concat_ranges, isin, unique
from kbuild_bolt.binary.cfg import FALLTHROUGH, STATIC_KEY, TAKEN
from kbuild_bolt.elf.writer import put_fields
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86 import encode as enc

# Item kinds (CMP and CALL: the direct path of a promoted indirect call, see
# kbuild_bolt.rewrite.promote)
COPY, JMP, JCC, SITE, NOP, CMP, CALL = 0, 1, 2, 3, 4, 5, 6
# Branch item sizes by kind: short (rel8 jmp/jcc, 2-byte static-key site) and long
# (a cmp's size is its template's).
SHORT_SIZE = np.array([0, enc.JMP8, enc.JCC8, 2, 0, 0, enc.CALL32], np.int64)
LONG_SIZE = np.array([0, enc.JMP32, enc.JCC32, 5, 0, 0, enc.CALL32], np.int64)
# Items that go somewhere: their destination is linked like a branch's.
BRANCHES = (JMP, JCC, SITE, CALL)
TARGETED = (JMP, JCC, SITE, CALL, CMP)
JNE = 5   # condition code

# How a block ends, for emission (BlockTable.kind).
END_COPY, END_SITE, END_JMP, END_JCC, END_UNIT_JMP = 0, 1, 2, 3, 4

# Why a function cannot be emitted (it is left byte-for-byte alone).
FAILURES = ("", "static-key-target", "jcc-without-fallthrough", "does-not-fit",
            "no-room-for-cold-code", "reference-to-dropped-code", "branch-out-of-range")
(OK, STATIC_KEY_TARGET, JCC_WITHOUT_FALLTHROUGH, DOES_NOT_FIT, NO_ROOM, DROPPED_REF,
 OUT_OF_RANGE) = range(len(FAILURES))

# A fragment is first laid out this far from its function, so every branch that
# crosses between the slot and the fragment is rel32: moving the fragment to its
# place in free room then keeps every size.
FAR = 1 << 30


def _replacements_never_fall_through(model, site: int) -> bool:
    """True when every replacement of the alternative at ``site`` ends in a
    return or jump: once patched, nothing falls through the site, so what
    follows it may change."""
    from iced_x86 import Decoder

    alt = model.tables.get(".altinstructions")
    if alt is None:
        return False
    instr = alt.targets("instr")
    hits = np.flatnonzero(instr == np.uint64(site))
    if not len(hits):
        return False
    repl = alt.targets("repl")[hits]
    lengths = alt.entries["replacementlen"][alt.indices[hits]]
    for addr, n in zip(repl.tolist(), lengths.tolist()):
        if n == 0:
            return False
        last = None
        for ins in Decoder(64, model.image.read(int(addr), int(n)), ip=int(addr)):
            last = ins
        if last is None or last.flow_control not in (x86.RET, x86.JMP, x86.IND_JMP):
            return False
    return True


def table_sites(model, skip=()) -> np.ndarray:
    """True at every instruction a kernel table (but those named in ``skip``) names
    as a site, branch or range start (emission keeps those instructions as they
    are)."""
    is_site = np.zeros(len(model.insns), bool)
    for name, data in model.tables.items():
        if name in skip:
            continue
        for ref in data.spec.refs:
            if ref.role in (base.SITE, base.BRANCH, base.RANGE):
                idx = model.insn_index(data.targets(ref.field))
                is_site[idx[idx >= 0]] = True
    return is_site


def _unreached_fill_blocks(cfg, fill: np.ndarray) -> np.ndarray:
    """Per block: nothing reaches it (no edge from its own function, not an
    entry) and it is only alignment fill. (A function of its own: its
    whole-kernel temporaries go when it returns.)"""
    first, end = cfg.block_first, cfg.block_end
    same = cfg.block_func[cfg.edge_src] == cfg.block_func[cfg.edge_dst]
    has_pred = np.zeros(len(first), bool)
    has_pred[cfg.edge_dst[same]] = True
    del same
    entry = cfg.entry_insn[first] | cfg.external_entry_insn[first]
    entry[cfg.func_first_block[cfg.func_first_block < cfg.func_end_block]] = True
    not_fill = np.zeros(len(fill) + 1, np.int32)     # (int32: millions of instructions)
    np.cumsum(~fill, dtype=np.int32, out=not_fill[1:])
    return ~has_pred & ~entry & (not_fill[end] == not_fill[first])


class BlockTable:
    """Per-block facts emission needs, for all blocks at once (numpy columns)."""

    def __init__(self, model, cfg, is_site: np.ndarray, fill: np.ndarray,
                 reverse_sites: bool | np.ndarray = False, promotions=None,
                 rows: np.ndarray | None = None):
        """``reverse_sites``: static-key sites (all, or a mask per instruction) that
        are reversed when their jump side is laid out right behind them (see
        _build_items). ``promotions``: indirect calls that get a direct path
        (:class:`kbuild_bolt.rewrite.promote.Promotions`). ``rows``: the only
        functions whose blocks are laid out (None: all); what is found from each
        block's last instruction is found for their blocks alone (a profile's
        layout changes a few thousand functions of tens of thousands)."""
        insns = model.insns
        nb = len(cfg.block_first)
        first, end, term = cfg.block_first, cfg.block_end, cfg.block_term
        if rows is None:
            sel = np.arange(nb)
        else:
            rows = np.asarray(rows, np.int64)
            lo = cfg.func_first_block[rows]
            sel = unique(concat_ranges(lo, cfg.func_end_block[rows] - lo))
        self.covered = np.zeros(nb, bool)
        self.covered[sel] = True
        # (int32 and smaller: one entry per block of the whole kernel)
        fall = np.full(nb, -1, np.int32)
        taken = np.full(nb, -1, np.int32)
        ft = cfg.edge_kind == FALLTHROUGH
        fall[cfg.edge_src[ft]] = cfg.edge_dst[ft]
        tk = isin(cfg.edge_kind, (TAKEN, STATIC_KEY))
        taken[cfg.edge_src[tk]] = cfg.edge_dst[tk]
        del ft, tk
        t_s = term[sel]
        flow = insns.flow[t_s]
        direct = isin(flow, (x86.JMP, x86.JCC)) & (insns.ref_kind[t_s] == x86.REF_BRANCH)
        target_s = insns.ref[t_s]
        t_idx = model.insn_index(target_s)
        block_of = np.searchsorted(first, np.maximum(t_idx, 0), side="right").astype(np.int64) - 1
        t_block_s = np.where((t_idx >= 0) & (first[np.maximum(block_of, 0)] == t_idx)
                             & (cfg.block_func[np.maximum(block_of, 0)] == cfg.block_func[sel]),
                             block_of, -1)
        b = model.read_bytes(insns.addr[t_s], 2)
        n = insns.length[t_s]
        is_jmp = flow == x86.JMP
        plain_jmp = ((n == 2) & (b[:, 0] == 0xEB)) | ((n == 5) & (b[:, 0] == 0xE9))
        short_jcc = (n == 2) & (b[:, 0] >= 0x70) & (b[:, 0] <= 0x7F)
        near_jcc = (n == 6) & (b[:, 0] == 0x0F) & (b[:, 1] >= 0x80) & (b[:, 1] <= 0x8F)
        plain = np.where(is_jmp, plain_jmp, short_jcc | near_jcc)
        cc_s = np.where(short_jcc, b[:, 0] & 0xF, b[:, 1] & 0xF)
        site = is_site[t_s]
        external_short = direct & (t_block_s < 0) & (n == 2) & plain & ~site
        # (a branch inside a patch unit is part of what the kernel patches: copied)
        in_unit = model.inside_patch_unit(insns.addr[t_s])
        rebranch = direct & plain & ~site & ~in_unit & ((t_block_s >= 0) | external_short)
        kind_s = np.full(len(sel), END_COPY, np.int8)
        kind_s[rebranch & is_jmp] = END_JMP
        kind_s[rebranch & ~is_jmp] = END_JCC
        static_key_s = cfg.static_key_insn[t_s]
        kind_s[static_key_s] = END_SITE
        # An alternative whose original site is exactly one direct jump within the
        # function (static_cpu_has, ALTERNATIVE "jmp .L", ...): when the kernel does
        # not patch it, it jumps; if its target is laid out right behind it, the
        # jump can become a nop of the same size.
        unit_start, unit_end = model.patch_units
        if len(unit_start):
            ta = insns.addr[t_s]
            u = np.searchsorted(unit_start, ta, side="right").astype(np.int64) - 1
            ok = (u >= 0) & is_jmp & direct & (t_block_s >= 0)
            ok[ok] &= (unit_start[u[ok]] == ta[ok]) & (unit_end[u[ok]] == ta[ok] + n[ok])
            exact_unit_jmp = ok & (kind_s == END_COPY)
            for k in np.flatnonzero(exact_unit_jmp).tolist():
                if not _replacements_never_fall_through(model, int(ta[k])):
                    exact_unit_jmp[k] = False
            kind_s[exact_unit_jmp] = END_UNIT_JMP
        # Where each static-key site jumps (its __jump_table target).
        site_target_s = np.zeros(len(sel), np.uint64)
        jump_table = model.tables.get("__jump_table")
        if jump_table is not None and static_key_s.any():
            codes = jump_table.targets("code")
            targets = jump_table.targets("target")
            order = np.argsort(codes)
            codes, targets = codes[order], targets[order]
            sites = insns.addr[t_s[static_key_s]]
            k = np.minimum(np.searchsorted(codes, sites), len(codes) - 1)
            site_target_s[static_key_s] = np.where(codes[k] == sites, targets[k], 0)
        # Blocks nobody reaches (no edge from their own function, not an entry)
        # that are only alignment fill: dropped from the new layout.
        self.droppable = _unreached_fill_blocks(cfg, fill)

        def column(values, default, dtype):
            out = np.full(nb, default, dtype)
            out[sel] = values
            return out

        kind = column(kind_s, END_COPY, np.int8)
        static_key = column(static_key_s, False, bool)
        self.kind, self.first, self.end, self.term = kind, first, end, term
        self.fall, self.taken, self.t_block = fall, taken, column(t_block_s, -1, np.int32)
        self.target = column(target_s, 0, np.uint64)
        self.cc = column(cc_s, 0, np.int8)
        self.site_jmp = column(is_jmp, False, bool)
        self.site_target = column(site_target_s, 0, np.uint64)
        may = np.asarray(reverse_sites)
        self.may_reverse = (np.full(nb, bool(may)) if may.ndim == 0 else may[term]) & static_key
        self._promote(insns, promotions)
        start = insns.addr[first]
        last_end = insns.end_of(end - 1)
        self.whole = (last_end - start).astype(np.int32)
        self.body = (insns.addr[term] - start).astype(np.int32)
        self.tail = (last_end - insns.end_of(term)).astype(np.int32)

    def _promote(self, insns, promotions) -> None:
        """Promoted calls of each block: promotions [icp_first, icp_first +
        icp_count) (sites ascending, so a block's are contiguous); per
        promotion, its call's offset in its block and length."""
        nb, first = len(self.first), self.first
        self.promotions = promotions
        self.icp_first = np.zeros(nb, np.int64)
        self.icp_count = np.zeros(nb, np.int64)
        self.p_insn = self.p_off = self.p_len = np.zeros(0, np.int64)
        if promotions is not None and len(promotions):
            site = promotions.site
            b_of = np.searchsorted(first, site, side="right").astype(np.int64) - 1
            self.icp_count = np.bincount(b_of, minlength=nb).astype(np.int64)
            self.icp_first[:] = np.searchsorted(b_of, np.arange(nb), side="left")
            self.p_insn = site
            self.p_off = (insns.addr[site] - insns.addr[first[b_of]]).astype(np.int64)
            self.p_len = insns.length[site].astype(np.int64)

    def with_promotions(self, model, promotions) -> "BlockTable":
        """The same blocks with other promoted calls (fewer, when some left no
        room): nothing else of the table depends on them."""
        other = copy.copy(self)
        other._promote(model.insns, promotions)
        return other

    _COLUMNS = ("kind", "first", "end", "term", "fall", "taken", "t_block", "target", "cc",
                "site_jmp", "site_target", "whole", "body", "tail", "droppable", "may_reverse",
                "icp_first", "icp_count", "covered")

    def with_runs(self, model, first: np.ndarray, end: np.ndarray) -> tuple["BlockTable", int]:
        """This table and, after its blocks, one pseudo-block per run of instructions
        [first, end) that is copied as it is (a function's call padding, which
        moves with it). Returns the table and the index of the first pseudo-block."""
        insns = model.insns
        n = len(first)
        extra = {
            "kind": np.full(n, END_COPY, np.int8), "first": first, "end": end,
            "term": end - 1, "fall": np.full(n, -1, np.int64),
            "taken": np.full(n, -1, np.int64), "t_block": np.full(n, -1, np.int64),
            "target": np.zeros(n, np.uint64), "cc": np.zeros(n, np.int64),
            "site_jmp": np.zeros(n, bool), "site_target": np.zeros(n, np.uint64),
            "whole": (insns.end_of(end - 1) - insns.addr[first]).astype(np.int64),
            "body": (insns.addr[end - 1] - insns.addr[first]).astype(np.int64),
            "tail": np.zeros(n, np.int64), "droppable": np.zeros(n, bool),
            "may_reverse": np.zeros(n, bool), "icp_first": np.zeros(n, np.int64),
            "icp_count": np.zeros(n, np.int64), "covered": np.ones(n, bool),
        }
        out = BlockTable.__new__(BlockTable)
        out.promotions, out.p_insn, out.p_off, out.p_len = \
            self.promotions, self.p_insn, self.p_off, self.p_len
        base = len(self.kind)
        for name in self._COLUMNS:
            mine = getattr(self, name)
            setattr(out, name, np.concatenate([mine, extra[name].astype(mine.dtype)]))
        return out, base


@dataclass
class _Items:
    """Items of a set of laid-out functions, in layout order (one part after the other)."""

    func: np.ndarray        # function (index into the emission's functions) of each item
    part: np.ndarray        # global part index of each item
    kind: np.ndarray
    size: np.ndarray
    i0: np.ndarray          # COPY: instructions [i0, i1)
    i1: np.ndarray
    cc: np.ndarray
    dest_item: np.ndarray   # branch to a block: the item it lands on (-1: to dest_addr)
    dest_addr: np.ndarray
    origin: np.ndarray      # old instruction the branch stands for (-1: an added jump)
    state: np.ndarray       # old instruction whose ORC state applies (branches)
    site_jmp: np.ndarray
    error: np.ndarray       # per position: failure code
    elided: np.ndarray      # per position: its jump fell away
    elided_to: np.ndarray   # per position: item where the elided jump's target starts
    dropped: np.ndarray     # per position: bytes dropped (an elided jump and the int3 after it)
    inserted: np.ndarray    # per position: a jump was added after it
    first_item: np.ndarray  # per position: its first item (or the next one's, when empty)
    lay: np.ndarray         # per position: its block
    lay_f: np.ndarray       # per position: its function
    # Static-key sites reversed: (function, site instruction, instruction the site
    # now jumps to: the first of its old fall-through block), one row each.
    flipped: np.ndarray | None = None
    # Branches to another function that moved: the item the target is in now and
    # the offset into it (dest_item then points there; 0 for everything else).
    dest_off: np.ndarray | None = None
    # Per item: the promotion (index) a CMP item compares with (-1: none).
    icp: np.ndarray | None = None

    def part_starts(self) -> np.ndarray:
        """Index of the first item of each part (parts are contiguous runs of items)."""
        part = self.part
        if not len(part):
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.r_[True, part[1:] != part[:-1]])

    def branches(self) -> np.ndarray:
        """Indices of the branch items (jmp, jcc, static-key site, direct call)."""
        return np.flatnonzero(isin(self.kind, BRANCHES))

    def destinations(self, addr: np.ndarray, which: np.ndarray) -> np.ndarray:
        """Where each item ``which`` (a branch, a cmp) goes, at the addresses ``addr``."""
        d = self.dest_item[which]
        dest = np.where(d >= 0, addr[np.maximum(d, 0)], self.dest_addr[which])
        if self.dest_off is not None:
            dest = dest + self.dest_off[which].astype(np.uint64)
        return dest

    def displacements(self, addr: np.ndarray, which: np.ndarray) -> np.ndarray:
        """Displacement (from its end) of each branch ``which`` to where it goes."""
        dest = self.destinations(addr, which)
        return (dest - addr[which] - self.size[which].astype(np.uint64)).view(np.int64)


class _AtPositions:
    """A slot's values at some positions (``rows``, sorted), where the slot is;
    read nowhere else."""

    def __init__(self, rows: np.ndarray, values: np.ndarray):
        self.rows, self.values = rows, values

    def at(self, rows: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.rows, rows)]


def _build_items(bt: BlockTable, lay: np.ndarray, lay_f: np.ndarray, lay_part: np.ndarray,
                 moved_interior, no_icp: np.ndarray | None = None) -> _Items:
    """Items for the blocks ``lay`` (positions of functions ``lay_f`` in parts
    ``lay_part``: contiguous per part), each part laid out contiguously.
    ``no_icp``: per function index, True where its promoted calls stay as they
    are (its layout with them does not fit)."""
    npos = len(lay)
    nxt = np.full(npos, -1, np.int64)
    if npos > 1:
        cont = (lay_f[1:] == lay_f[:-1]) & (lay_part[1:] == lay_part[:-1])
        nxt[:-1] = np.where(cont, lay[1:], -1)
    b = lay
    i0, i1, term = bt.first[b], bt.end[b], bt.term[b]
    kind, fall, tb = bt.kind[b], bt.fall[b], bt.t_block[b]
    whole, body = bt.whole[b], bt.body[b]
    unit_nop = (kind == END_UNIT_JMP) & (tb >= 0) & (tb == nxt) & (term + 1 == i1)
    plain = ~unit_nop & ((kind == END_COPY) | (kind == END_UNIT_JMP))
    site = kind == END_SITE
    is_jmp = kind == END_JMP
    is_jcc = kind == END_JCC
    error = np.zeros(npos, np.int8)
    # Static-key sites: the jump side is a block of the function, or code that stays put.
    taken = bt.taken[b]
    site_target = bt.site_target[b]
    site_block = site & (taken >= 0)
    site_addr = site & ~site_block & (site_target != 0)
    if site_addr.any():
        site_addr[site_addr] = ~moved_interior(site_target[site_addr])
    error[site & ~site_block & ~site_addr] = STATIC_KEY_TARGET
    # A site whose jump side follows it is reversed: the kernel would otherwise
    # jump to the very next instruction whenever the key selects that side. Now
    # that side falls through and the site jumps to the old fall-through block;
    # its entry's branch bit flips, and with it the form (jmp/nop) the key's
    # initial state selects, so the site's bytes flip too.
    flip = (site & site_block & (taken == nxt) & (fall >= 0) & (fall != nxt)
            & bt.may_reverse[b])
    elide = is_jmp & (tb >= 0) & (tb == nxt)
    error[is_jcc & (fall < 0)] = JCC_WITHOUT_FALLTHROUGH
    jcc_keep = is_jcc & (fall >= 0) & (fall == nxt)              # taken side stays taken
    jcc_flip = is_jcc & ~jcc_keep & (tb >= 0) & (tb == nxt)      # inverted: target follows
    branch_end = site | is_jmp | is_jcc

    # Promoted indirect calls split the body's copy: [copy up to the first call]
    # then, per call, [cmp] [jne fallback] [call target] [copy up to the next call
    # or the body's end]. Each fallback (the call itself, then a jump back to
    # right after the direct call) goes after the function's last position: it
    # is cold, and in the function's last part.
    count = bt.icp_count[b].copy()
    if no_icp is not None:
        count[no_icp[lay_f]] = 0
    first_p = bt.icp_first[b]
    body_end = np.where(plain, i1, term)
    body_size = np.where(plain, whole, body)
    m_icp = int(count.max()) if npos else 0
    p_insn, p_off, p_len = bt.p_insn, bt.p_off, bt.p_len
    promos = bt.promotions

    def per_call(j, values, default):
        """Per position: ``values`` of its j-th promoted call (``default`` without)."""
        has = j < count
        k = np.where(has, first_p + j, 0)
        return np.where(has, values[k] if len(values) else default, default), has

    # Slots: [copy] ([cmp] [jne] [call] [copy]) per promoted call, [terminator]
    # [tail] [added jmp]. A slot's values are a scalar, one per position, or
    # (a promoted call's slots: few positions have one) _AtPositions.
    s0 = plain | ((unit_nop | branch_end) & (i0 < term))
    c0, _ = per_call(0, p_insn, 0)
    off0, _ = per_call(0, p_off, 0)
    slots_present = [np.where(count > 0, off0 > 0, s0)]
    slot_values = {"kind": [COPY], "size": [np.where(count > 0, off0, body_size)],
                   "i0": [i0], "i1": [np.where(count > 0, c0, body_end)],
                   "state": [-1], "icp": [-1], "target": [0], "cc": [0]}
    del c0, off0
    for j in range(m_icp):
        rows = np.flatnonzero(count > j)            # positions with a j-th call
        k = first_p[rows] + j                       # its promotion
        c, off, ln = p_insn[k], p_off[k], p_len[k]
        more = count[rows] > j + 1
        k_next = np.where(more, k + 1, k)
        seg_end = np.where(more, p_insn[k_next], body_end[rows])
        seg_size = np.where(more, p_off[k_next], body_size[rows]) - off - ln
        has = np.zeros(npos, bool)
        has[rows] = True
        rest = np.zeros(npos, bool)
        rest[rows] = seg_size > 0
        slots_present += [has, has, has, rest]

        def at(values, rows=rows):
            return _AtPositions(rows, values)

        target = promos.target[k]
        for name, values in (("kind", (CMP, JCC, CALL, COPY)),
                             ("size", (at(promos.length[k]), enc.JCC8, enc.CALL32,
                                       at(seg_size))),
                             ("i0", (0, 0, 0, at(c + 1))), ("i1", (0, 0, 0, at(seg_end))),
                             ("state", (at(c), at(c), at(c), -1)), ("icp", (at(k), -1, -1, -1)),
                             ("target", (at(target), 0, at(target), 0)), ("cc", (0, JNE, 0, 0))):
            slot_values[name].extend(values)
    n_mid = len(slots_present)
    s1 = unit_nop | site | (is_jmp & ~elide) | is_jcc
    s2 = ((is_jmp & ~elide) | is_jcc | site) & (term + 1 < i1)
    fall_left = np.where(unit_nop | is_jmp | jcc_keep | jcc_flip | flip, -1, fall)
    s3 = (fall_left >= 0) & (fall_left != nxt)
    slots_present += [s1, s2, s3]
    counts = np.zeros(npos, np.int64)
    for present in slots_present:
        counts += present
    # Fallbacks, two items each, after the items of their function's last position
    # (in the order of their calls).
    fb_pos = np.repeat(np.arange(npos), count)
    fb_j = np.arange(len(fb_pos)) - np.repeat(np.cumsum(count) - count, count)
    fb_p = first_p[fb_pos] + fb_j               # promotion index
    run_start = np.r_[True, lay_f[1:] != lay_f[:-1]] if npos else np.zeros(0, bool)
    run_last = np.flatnonzero(np.r_[run_start[1:], True]) if npos else np.zeros(0, np.int64)
    anchor = run_last[np.cumsum(run_start)[fb_pos] - 1]
    per_pos = counts + 2 * np.bincount(anchor, minlength=npos)
    first_item = np.zeros(npos, np.int64)
    np.cumsum(per_pos[:-1], out=first_item[1:])
    n_items = int(per_pos.sum())
    # Per slot: the positions that have it and the item it is there. (Not a
    # positions x slots matrix per column: each promoted call of any block adds
    # four slots to every position, where few positions have one.)
    placed = []
    item = first_item - 1
    for present in slots_present:
        item += present
        at_pos = np.flatnonzero(present)
        placed.append((at_pos, item[at_pos]))
    del item, slots_present
    fb_copy = (first_item[anchor] + counts[anchor]
               + 2 * (np.arange(len(anchor)) - np.searchsorted(anchor, anchor, side="left")))
    fb_jmp = fb_copy + 1
    fb_call = np.zeros(len(fb_pos), np.int64)    # the direct call it stands beside
    for j in unique(fb_j).tolist():
        at_pos, items_there = placed[3 + 4 * j]
        mine = fb_j == j
        fb_call[mine] = items_there[np.searchsorted(at_pos, fb_pos[mine])]
    fb_insn = p_insn[fb_p] if len(fb_p) else np.zeros(0, np.int64)

    t_kind = np.select([unit_nop, site, is_jmp], [NOP, SITE, JMP], JCC).astype(np.int8)

    def column(dtype, slots, fallback=(0, 0)) -> np.ndarray:
        """One item attribute: each slot's values and the two fallback items'
        values, only the items present, in layout order."""
        out = np.empty(n_items, dtype)
        for (at_pos, items_there), value in zip(placed, slots):
            if isinstance(value, _AtPositions):
                out[items_there] = value.at(at_pos)
            elif np.ndim(value):
                out[items_there] = value[at_pos]
            else:
                out[items_there] = value
        out[fb_copy], out[fb_jmp] = fallback
        return out

    item_pos = column(np.int64, (np.arange(npos),) * (n_mid + 3), (anchor, anchor))
    kinds = column(np.int8, slot_values["kind"] + [t_kind, COPY, JMP], (COPY, JMP))
    sizes = column(np.int64, slot_values["size"] + [
        np.where(unit_nop, whole - body, SHORT_SIZE[t_kind]), bt.tail[b], enc.JMP8],
        (p_len[fb_p] if len(fb_p) else 0, enc.JMP8))
    i0s = column(np.int64, slot_values["i0"] + [0, term + 1, 0], (fb_insn, 0))
    i1s = column(np.int64, slot_values["i1"] + [0, i1, 0], (fb_insn + 1, 0))
    ccs = column(np.int8, slot_values["cc"] + [np.where(jcc_flip, bt.cc[b] ^ 1, bt.cc[b]),
                                               0, 0])
    to_block = column(bool, [False] * n_mid + [np.where(site, site_block, jcc_flip | (tb >= 0))
                                               & ~unit_nop, False, True], (False, False))
    blocks = column(np.int64, [-1] * n_mid + [np.where(site, np.where(flip, fall, taken),
                                                       np.where(jcc_flip, fall, tb)), -1,
                                              fall_left], (-1, -1))
    dest_addr = column(np.uint64, slot_values["target"] + [
        np.where(site, site_target, bt.target[b]), 0, 0])
    origins = column(np.int64, [-1] * n_mid + [term, -1, -1], (-1, -1))
    # (the fallback's jump back runs after the call returned: the state after it)
    states = column(np.int64, slot_values["state"] + [term, -1,
                                                      bt.first[np.maximum(fall_left, 0)]],
                    (-1, fb_insn + 1))
    site_jmps = column(bool, [False] * n_mid + [bt.site_jmp[b] ^ flip, False, False],
                       (False, False))
    icps = column(np.int64, slot_values["icp"] + [-1, -1, -1], (-1, -1))
    # Branches to a block land on that block's first item.
    pos_of_block = np.full(len(bt.kind), -1, np.int64)
    pos_of_block[lay] = np.arange(npos)
    dest_pos = pos_of_block[np.maximum(blocks, 0)]
    dest_item = np.where(to_block, first_item[np.maximum(dest_pos, 0)], -1)
    # (a branch to a block not in the layout: only blocks nobody reaches are dropped)
    lost = to_block & ((blocks < 0) | (dest_pos < 0))
    if lost.any():
        error[item_pos[lost]] = DROPPED_REF
        dest_item[lost] = first_item[item_pos[lost]]
    # Each jne goes to its fallback; the fallback's jump back to the item right after
    # the direct call (the rest of the block; the next block when the call ended
    # its block, which then falls through: see promote.eligible_calls).
    dest_item[fb_call - 1] = fb_copy
    dest_item[fb_jmp] = fb_call + 1
    del blocks, dest_pos, to_block
    elided_to = np.full(npos, -1, np.int64)
    if elide.any():
        elided_to[elide] = first_item[pos_of_block[nxt[elide]]]
    return _Items(func=lay_f[item_pos], part=lay_part[item_pos], kind=kinds,
                  size=sizes, i0=i0s, i1=i1s, cc=ccs, dest_item=dest_item, dest_addr=dest_addr,
                  origin=origins, state=states, site_jmp=site_jmps,
                  error=error, elided=elide, elided_to=elided_to,
                  dropped=np.where(elide, whole - body, 0), inserted=s3,
                  first_item=first_item, lay=lay, lay_f=lay_f,
                  flipped=np.stack([lay_f[flip], term[flip], bt.first[fall[flip]]],
                                   axis=1).astype(np.int64), icp=icps)


def _relax(items: _Items, part_base: np.ndarray) -> np.ndarray:
    """Branch sizes (in ``items.size``) and item addresses: every branch starts
    short and grows until it reaches. Sizes only grow, so this ends; functions
    are independent, so relaxing them together gives each its own result."""
    size = items.size
    n = len(size)
    starts = items.part_starts()
    first_of_item = np.repeat(starts, np.diff(np.r_[starts, n]))
    base = part_base[items.part]
    short = items.branches()
    cs = np.zeros(n + 1, np.int64)
    while True:
        np.cumsum(size, out=cs[1:])
        addr = base + (cs[:-1] - cs[first_of_item]).astype(np.uint64)
        if not len(short):
            return addr
        disp = items.displacements(addr, short)
        out = (disp < -128) | (disp > 127)
        if not out.any():
            return addr
        grow = short[out]
        size[grow] = LONG_SIZE[items.kind[grow]]
        short = short[~out]


def _part_ends(items: _Items, addr: np.ndarray, nparts: int) -> np.ndarray:
    end = np.zeros(nparts, np.uint64)
    if len(addr):
        last = np.r_[items.part_starts()[1:], len(addr)] - 1
        end[items.part[last]] = addr[last] + items.size[last].astype(np.uint64)
    return end


@dataclass
class Emission:
    """The new code of every rewritten function (rows ascending)."""

    rows: np.ndarray          # function rows
    start: np.ndarray         # uint64: unchanged function start
    end: np.ndarray           # uint64: old end
    first_insn: np.ndarray    # instructions [first_insn, last_insn) of each function
    last_insn: np.ndarray
    code: np.ndarray          # uint8: every function's new bytes, one after the other
    code_off: np.ndarray      # where each function's bytes (from its start) are in ``code``
    code_len: np.ndarray
    frag_base: np.ndarray     # uint64 address of its fragment in free room (0: none)
    frag_off: np.ndarray
    frag_len: np.ndarray
    inserted_jumps: np.ndarray
    dropped_bytes: np.ndarray
    item_func: np.ndarray     # per item: function index; items in layout order
    item_kind: np.ndarray
    item_addr: np.ndarray     # uint64 new address
    item_size: np.ndarray
    item_base: np.ndarray     # COPY: old address of its first byte
    item_state: np.ndarray    # branches: old instruction whose ORC state applies
    item_origin: np.ndarray   # branches: old instruction it stands for (-1: an added jump)
    # uint64 per instruction of the model: new address (0: none), kept over the
    # instructions of the emitted functions only
    new_addr: RunColumn
    # PC-relative fields that point into another rewritten function's interior,
    # resolved once every function has its place: function, field address, size,
    # next ip, old target.
    deferred: tuple
    # Whole functions that moved (emit_placed): where each one's old extent starts
    # (its call padding, when it has one), where its first part now starts, and the
    # ranges of moved regions that are free once the old code is gone.
    extent: np.ndarray | None = None
    code_base: np.ndarray | None = None
    free: np.ndarray | None = None      # (n, 2) uint64 [lo, hi)
    fallback: int = 0                   # functions placed in their original order (no room)
    # Static-key sites reversed: (function index, site instruction, instruction it
    # now jumps to), see _build_items.
    flipped: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    # Promoted indirect calls: (function index, address of the cmp's imm32, address
    # of the direct call's rel32, target, promotion index), see _promoted.
    promoted: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.int64))
    # (instruction, address of its bytes) where that differs from ``new_addr``
    # (what lies inside the instruction, a relocated field, follows its bytes).
    bodies: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def placed(self) -> bool:
        return self.free is not None

    @property
    def new_start(self) -> np.ndarray:
        """Where each function's entry now is."""
        if not self.placed:
            return self.start
        return self.code_base + (self.start - self.extent)

    @property
    def runs(self) -> np.ndarray:
        """(new start, old start, length) of every copied run, (n, 3) uint64."""
        c = self.item_kind == COPY
        return np.stack([self.item_addr[c], self.item_base[c],
                         self.item_size[c].astype(np.uint64)], axis=1)

    @property
    def branch_states(self) -> tuple[np.ndarray, np.ndarray]:
        """(new address, old instruction index) of every emitted branch or nop."""
        b = self.item_kind != COPY
        return self.item_addr[b], self.item_state[b]

    def drop_items(self) -> None:
        """Free the new code and its items, once the metadata has taken what it
        needs of them (the per-function columns stay)."""
        none, nowhere = np.zeros(0, np.int64), np.zeros(0, np.uint64)
        self.code = np.zeros(0, np.uint8)
        self.item_func = self.item_size = self.item_state = self.item_origin = none
        self.item_kind = np.zeros(0, np.int8)
        self.item_addr = self.item_base = nowhere
        self.new_addr = RunColumn(0, none, none, np.uint64)
        self.deferred = (none, nowhere, none, nowhere, nowhere)

    def items_per_function(self) -> np.ndarray:
        return np.bincount(self.item_func, minlength=len(self.rows))

    def fragments(self) -> list[tuple[int, int]]:
        has = self.frag_len > 0
        return list(zip(self.frag_base[has].tolist(),
                        (self.frag_base[has] + self.frag_len[has].astype(np.uint64)).tolist()))

    def moved_ranges(self) -> np.ndarray:
        """(start, old end, new end) of every rewritten slot and placed fragment; for
        whole functions that moved, every free range of their regions (lo, hi, hi)."""
        if self.placed:
            return np.stack([self.free[:, 0], self.free[:, 1], self.free[:, 1]], axis=1)
        slots = np.stack([self.start, self.end,
                          self.start + self.code_len.astype(np.uint64)], axis=1)
        has = self.frag_len > 0
        fb = self.frag_base[has]
        frags = np.stack([fb, fb, fb + self.frag_len[has].astype(np.uint64)], axis=1)
        return np.concatenate([slots, frags]).astype(np.uint64)

    def select(self, keep: np.ndarray) -> "Emission":
        """Only the functions where ``keep`` is True (the others keep their old code).
        Replaces this emission: the per-instruction column is shared, updated in place."""
        if self.placed and (self.code_len[~keep].any() or self.frag_len[~keep].any()):
            # (a function that moved has no old code left to keep: its old place may
            # hold another one now)
            raise ValueError("functions placed anew cannot be left alone afterwards")
        index = np.full(len(self.rows), -1, np.int64)
        index[keep] = np.arange(int(keep.sum()))
        items = keep[self.item_func]
        new_addr = self.new_addr
        for a, b in zip(self.first_insn[~keep].tolist(), self.last_insn[~keep].tolist()):
            new_addr[a:b] = 0
        d = self.deferred
        dk = keep[d[0]]
        return Emission(
            rows=self.rows[keep], start=self.start[keep], end=self.end[keep],
            first_insn=self.first_insn[keep], last_insn=self.last_insn[keep], code=self.code,
            code_off=self.code_off[keep], code_len=self.code_len[keep],
            frag_base=self.frag_base[keep], frag_off=self.frag_off[keep],
            frag_len=self.frag_len[keep], inserted_jumps=self.inserted_jumps[keep],
            dropped_bytes=self.dropped_bytes[keep], item_func=index[self.item_func[items]],
            item_kind=self.item_kind[items], item_addr=self.item_addr[items],
            item_size=self.item_size[items], item_base=self.item_base[items],
            item_state=self.item_state[items], item_origin=self.item_origin[items],
            new_addr=new_addr,
            deferred=(index[d[0][dk]],) + tuple(x[dk] for x in d[1:]),
            extent=None if self.extent is None else self.extent[keep],
            code_base=None if self.code_base is None else self.code_base[keep], free=self.free,
            flipped=_kept_rows(self.flipped, keep, index),
            promoted=_kept_rows(self.promoted, keep, index),
            bodies=self.bodies[new_addr[self.bodies[:, 0].astype(np.int64)] != 0])


@dataclass
class _Plan:
    """The functions being emitted (index f = 0..n-1, rows ascending) and the state
    of their layouts as emission goes from one step to the next."""

    rows: np.ndarray          # function rows
    start: np.ndarray         # uint64
    end: np.ndarray           # uint64
    slot: np.ndarray          # bytes from start to the end of the slot
    first_insn: np.ndarray
    last_insn: np.ndarray
    lay: np.ndarray           # per position: block, in layout order, function after function
    lay_f: np.ndarray         # per position: function index
    dropped_fill: np.ndarray  # bytes of unreachable fill dropped from each function
    failure: np.ndarray       # int8 failure code per function (OK: still in)
    keep: np.ndarray          # positions that stay in the slot (-1: all)
    reserved: np.ndarray      # bytes of each function's fragment
    frag_base: np.ndarray     # uint64 address of each function's fragment (0: none)
    bases: np.ndarray         # uint64 base of each part: 2f the slot, 2f+1 the fragment
    part: np.ndarray | None = None  # per position: its part (emit_placed)
    no_icp: np.ndarray | None = None  # per function: its promoted calls stay indirect

    def __len__(self) -> int:
        return len(self.rows)

    def fail(self, funcs, code) -> None:
        """The first reason found for a function is the one reported."""
        funcs = np.asarray(funcs, np.int64)
        code = np.broadcast_to(np.asarray(code, np.int8), funcs.shape)
        new = self.failure[funcs] == OK
        self.failure[funcs[new]] = code[new]

    def fail_on_errors(self, items: _Items) -> None:
        """Each function with a position in error fails with its first error."""
        bad = np.flatnonzero(items.error)
        funcs, first = np.unique(items.lay_f[bad], return_index=True)
        self.fail(funcs, items.error[bad[first]])

    def positions_per_function(self, lay_f: np.ndarray) -> np.ndarray:
        """Index of each function's first position in ``lay_f`` (and the end), n + 1."""
        pos_start = np.zeros(len(self) + 1, np.int64)
        np.cumsum(np.bincount(lay_f, minlength=len(self)), out=pos_start[1:])
        return pos_start


def emit_functions(model, cfg, bt: BlockTable, orders: dict, slots: np.ndarray,
                   moved_interior, allocator) -> tuple[Emission, list[tuple[int, str]]]:
    """Emit function ``row`` with its blocks in ``orders[row]``, for every row.

    ``slots``: end of every function's slot. Blocks that do not fit the slot
    (in layout order) go to one fragment placed by ``allocator`` in free room
    of .text (no allocator, or another section: the function is left alone).
    Returns the emission and the (row, reason) of every function left alone."""
    plan = _plan(model, cfg, bt, orders, slots)
    if not len(plan):
        return _no_emission(len(model.insns)), []
    oversized, whole = _fit_slots(model, plan, bt, moved_interior, allocator is not None)
    _split(plan, bt, oversized, whole, moved_interior)
    del whole
    _place_fragments(plan, allocator)
    items, addr = _final_layout(plan, bt, moved_interior)
    copied = _Copied.of(items, model.insns)
    new_addr = _new_addresses(model.insns, plan, bt, items, addr, copied)
    code, item_off = _bytes(model, bt, items, addr, copied)
    deferred = _fields(model.insns, plan, items, copied, item_off, new_addr, code,
                       moved_interior)
    emission = _emission(plan, items, addr, copied, code, item_off, new_addr, deferred,
                         bodies=_bodies_apart(bt, items, addr))
    failures = [(int(plan.rows[f]), FAILURES[int(plan.failure[f])])
                for f in np.flatnonzero(plan.failure).tolist()]
    if failures:
        emission = emission.select(plan.failure == OK)
    return emission, failures


def _no_emission(n_insns: int) -> Emission:
    none = np.zeros(0, np.int64)
    nowhere = np.zeros(0, np.uint64)
    return Emission(rows=none, start=nowhere, end=nowhere, first_insn=none,
                    last_insn=none, code=np.zeros(0, np.uint8), code_off=none,
                    code_len=none, frag_base=nowhere, frag_off=none, frag_len=none,
                    inserted_jumps=none, dropped_bytes=none, item_func=none,
                    item_kind=none, item_addr=nowhere, item_size=none, item_base=nowhere,
                    item_state=none, item_origin=none,
                    new_addr=RunColumn(n_insns, none, none, np.uint64),
                    deferred=(none, nowhere, none, nowhere, nowhere))


def _plan(model, cfg, bt: BlockTable, orders: dict, slots: np.ndarray) -> _Plan:
    """Every function's layout as positions; alignment fill nobody reaches is dropped."""
    functions = model.functions
    rows = np.array(sorted(orders), np.int64)
    nf = len(rows)
    lengths = np.array([len(orders[r]) for r in rows.tolist()], np.int64)
    lay = np.fromiter((b for r in rows.tolist() for b in orders[r]), np.int64,
                      int(lengths.sum()))
    lay_f = np.repeat(np.arange(nf), lengths)
    start = functions.start[rows].astype(np.uint64)
    if not bt.covered[lay].all():
        raise RuntimeError("a function is laid out with blocks its block table left out")
    drop = bt.droppable[lay]
    dropped_fill = np.bincount(lay_f[drop], weights=bt.whole[lay[drop]], minlength=nf)
    # Part bases while laying out: the slot, and a fragment far away.
    bases = np.zeros(2 * nf, np.uint64)
    bases[0::2] = start
    bases[1::2] = start + np.uint64(FAR)
    return _Plan(
        rows=rows, start=start, end=functions.end[rows].astype(np.uint64),
        slot=(slots[rows].astype(np.uint64) - start).astype(np.int64),
        first_insn=cfg.block_first[cfg.func_first_block[rows]],
        last_insn=cfg.block_end[cfg.func_end_block[rows] - 1],
        lay=lay[~drop], lay_f=lay_f[~drop], dropped_fill=dropped_fill,
        failure=np.zeros(nf, np.int8), keep=np.full(nf, -1, np.int64),
        reserved=np.zeros(nf, np.int64), frag_base=np.zeros(nf, np.uint64), bases=bases)


def _fit_slots(model, plan: _Plan, bt: BlockTable, moved_interior,
               can_split: bool) -> tuple[np.ndarray, _Items]:
    """Lay every function out whole (one part each) and relax its branches.
    Returns the functions that outgrow their slot and may be split (in .text,
    with free room to split into), and the items of that layout; the others that
    do not fit are left alone."""
    nf = len(plan)
    in_text = np.zeros(nf, bool)
    text = model.image.section(".text")
    if can_split and text is not None:
        in_text = model.functions.section[plan.rows] == text.index

    def whole_layout():
        whole = _build_items(bt, plan.lay, plan.lay_f, plan.lay_f, moved_interior, plan.no_icp)
        plan.fail_on_errors(whole)
        ends = _part_ends(whole, _relax(whole, plan.start), nf)
        return whole, (plan.failure == OK) & ((ends - plan.start).astype(np.int64) > plan.slot)

    whole, over = whole_layout()
    promoted = np.bincount(whole.func[whole.kind == CMP], minlength=nf) > 0
    if (over & promoted & ~in_text).any():
        # A function that outgrows its slot by its promoted calls is split (its
        # coldest blocks, the fallbacks last, go to free room); where it cannot
        # be, its calls stay indirect (its block layout matters more).
        plan.no_icp = over & promoted & ~in_text
        whole, over = whole_layout()
    plan.fail(np.flatnonzero(over & ~in_text), DOES_NOT_FIT)
    return np.flatnonzero(over & in_text), whole


def _split(plan: _Plan, bt: BlockTable, split: np.ndarray, whole: _Items,
           moved_interior) -> None:
    """The functions ``split``, too big for their slot (``whole``: the items of the
    whole layout): the longest prefix of the layout that fits stays (plan.keep),
    the rest goes to a fragment (plan.reserved bytes)."""
    if not len(split):
        return
    lay, lay_f, keep, slot = plan.lay, plan.lay_f, plan.keep, plan.slot
    nf = len(plan)
    pos_start = plan.positions_per_function(lay_f)
    # First guess: every branch near, plus a jump to the fragment.
    long_size = np.where(isin(whole.kind, (COPY, NOP, CMP)), whole.size,
                         LONG_SIZE[whole.kind])
    cum = np.zeros(len(long_size) + 1, np.int64)
    np.cumsum(long_size, out=cum[1:])
    first_of_f = whole.first_item[pos_start[:-1].clip(max=max(len(lay) - 1, 0))]
    # (the first item of the next position: of the next function after the last)
    nxt_item = np.r_[whole.first_item[1:], len(long_size)]
    after = cum[nxt_item] - cum[first_of_f[lay_f]] + enc.JMP32
    fits = (after <= slot[lay_f]) & isin(lay_f, split)
    guess = np.bincount(lay_f[fits], minlength=nf)
    npos = np.diff(pos_start)
    keep[split] = np.minimum(guess[split], npos[split] - 1)
    del long_size, cum, first_of_f, nxt_item, after, fits
    pending = split
    while len(pending):
        bad = pending[keep[pending] < 1]
        plan.fail(bad, DOES_NOT_FIT)  # not even its entry block fits the slot
        pending = pending[keep[pending] >= 1]
        if not len(pending):
            break
        sel = isin(lay_f, pending)
        t_lay, t_f = lay[sel], lay_f[sel]
        t_part = 2 * t_f + (np.arange(len(lay))[sel] - pos_start[t_f] >= keep[t_f])
        trial = _build_items(bt, t_lay, t_f, t_part, moved_interior, plan.no_icp)
        t_addr = _relax(trial, plan.bases)
        t_end = _part_ends(trial, t_addr, 2 * nf)
        ok = (t_end[2 * pending] - plan.start[pending]).astype(np.int64) <= slot[pending]
        done = pending[ok]
        plan.reserved[done] = (t_end[2 * done + 1] - plan.bases[2 * done + 1]).astype(np.int64)
        keep[pending[~ok]] -= 1
        pending = pending[~ok]


def _place_fragments(plan: _Plan, allocator) -> None:
    """Fragments go to free room in address order (so the output does not depend on
    how the work was divided)."""
    for f in np.flatnonzero((plan.keep >= 0) & (plan.failure == OK)).tolist():
        size = int(plan.reserved[f])
        base = allocator.reserve(size)
        if base is None:
            plan.fail([f], NO_ROOM)
        else:
            allocator.shrink(base, size, size)
            plan.frag_base[f] = base


def _final_layout(plan: _Plan, bt: BlockTable, moved_interior) -> tuple[_Items, np.ndarray]:
    """Items and new addresses of every function that is still in, all at once."""
    alive = plan.failure[plan.lay_f] == OK
    lay, lay_f = plan.lay[alive], plan.lay_f[alive]
    pos_start = plan.positions_per_function(lay_f)
    keep = plan.keep
    in_frag = (keep[lay_f] >= 0) & (np.arange(len(lay)) - pos_start[lay_f] >= keep[lay_f])
    items = _build_items(bt, lay, lay_f, 2 * lay_f + in_frag, moved_interior, plan.no_icp)
    addr = _relax(items, plan.bases)
    # The fragment was laid out far away, so every branch between it and the slot
    # is already rel32: moving it to its place in free room keeps every size (and
    # so the slot and the reservation fit exactly as measured).
    frag = items.part % 2 == 1
    addr[frag] += plan.frag_base[items.func[frag]] - plan.bases[items.part[frag]]
    return items, addr


@dataclass
class _Copied:
    """The copied items (runs of old instructions) and their instructions."""

    items: np.ndarray    # index of each COPY item
    insn: np.ndarray     # every copied instruction, item after item
    run_of: np.ndarray   # per copied instruction: its position in ``items``
    base: np.ndarray     # per item (all items): old address of its first byte (COPY)

    @classmethod
    def of(cls, items: _Items, insns) -> "_Copied":
        copy = np.flatnonzero(items.kind == COPY)
        i0 = items.i0[copy]
        counts = items.i1[copy] - i0
        base = np.zeros(len(items.kind), np.uint64)
        base[copy] = insns.addr[i0]
        return cls(copy, concat_ranges(i0, counts), np.repeat(np.arange(len(copy)), counts),
                   base)


def _new_addresses(insns, plan: _Plan, bt: BlockTable, items: _Items, addr: np.ndarray,
                   copied: _Copied) -> RunColumn:
    """New address of every old instruction of the emitted functions (0: none)."""
    copy, idx = copied.items, copied.insn
    # (kept over each function's instructions and whatever is copied with it: a
    # function placed anew takes the padding before its entry along)
    new_addr = RunColumn.over(len(insns.addr), np.r_[plan.first_insn, items.i0[copy]],
                              np.r_[plan.last_insn, items.i1[copy]], np.uint64)
    new_addr[idx] = insns.addr[idx] + (addr[copy] - copied.base[copy])[copied.run_of]
    branch = np.flatnonzero((items.kind != COPY) & (items.origin >= 0))
    new_addr[items.origin[branch]] = addr[branch]
    # A jump that fell away is where its target now starts: code that lands on it
    # (an exception fixup such as "jmp back to the loop") lands on what it ran next.
    el = np.flatnonzero(items.elided)
    new_addr[bt.term[items.lay[el]]] = addr[items.elided_to[el]]
    # A promoted call that starts its block is entered at its cmp.
    site, cmp = _entered_at_cmp(bt, items)
    new_addr[site] = addr[cmp]
    return new_addr


def _bodies_apart(bt: BlockTable, items: _Items, addr: np.ndarray) -> np.ndarray:
    """(instruction, where its bytes are now) of every instruction whose address
    names other code than its bytes: a promoted call entered at its cmp, whose
    bytes are its fallback copy (uint64, (n, 2))."""
    site, cmp = _entered_at_cmp(bt, items)
    fallback = addr[items.dest_item[cmp + 1]]       # (the jne's target)
    return np.stack([site.astype(np.uint64), fallback], axis=1).reshape(-1, 2)


def _entered_at_cmp(bt: BlockTable, items: _Items) -> tuple[np.ndarray, np.ndarray]:
    """(call instruction, cmp item) of every promoted call whose old address names
    its cmp (see promote.Promotions.enter_at_cmp)."""
    cmp = np.flatnonzero(items.kind == CMP)
    if not len(cmp):
        return np.zeros(0, np.int64), cmp
    k = items.icp[cmp]
    at = bt.promotions.enter_at_cmp[k]
    return bt.p_insn[k[at]], cmp[at]


def _bytes(model, bt: BlockTable, items: _Items, addr: np.ndarray,
           copied: _Copied) -> tuple[np.ndarray, np.ndarray]:
    """Every function's new bytes, one after the other (copied runs and encoded
    branches), and the offset of each item in them."""
    item_off = np.zeros(len(items.size) + 1, np.int64)
    np.cumsum(items.size, out=item_off[1:])
    code = np.zeros(int(item_off[-1]), np.uint8)
    copy = copied.items
    _copy_bytes(model, code, item_off[copy], copied.base[copy], items.size[copy])
    _encode_branches(items, addr, item_off, code)
    _encode_compares(bt, items, addr, item_off, code)
    return code, item_off


def _short_fields_in_reach(insns, bt: BlockTable, plan: _Plan, items: _Items) -> None:
    """Fail the functions whose copied rel8 fields (a short jump inside an
    alternative or a patch unit keeps its size) no longer reach their target in
    the function, with the parts laid out alone (a target in the other part is
    ``FAR`` away: out of reach). Found now, before anything is placed, rather
    than once every function has its place (which would all be placed again)."""
    copied = _Copied.of(items, insns)
    idx = copied.insn
    short = insns.field_size[idx] == 1
    if not short.any():
        return
    n = len(items.size)
    cs = np.zeros(n + 1, np.int64)
    np.cumsum(items.size, out=cs[1:])
    starts = items.part_starts()
    first_of_item = np.repeat(starts, np.diff(np.r_[starts, n]))
    addr = plan.bases[items.part] + (cs[:-1] - cs[first_of_item]).astype(np.uint64)
    new_addr = _new_addresses(insns, plan, bt, items, addr, copied)
    f_idx = idx[short]
    f_func = items.func[copied.items[copied.run_of[short]]]
    target = insns.ref[f_idx]
    local = (target >= plan.start[f_func]) & (target < plan.end[f_func])
    j = np.searchsorted(insns.addr, target, side="right").astype(np.int64) - 1
    mapped = new_addr[np.maximum(j, 0)]
    ok = local & (j >= 0) & (mapped != 0)
    new_target = mapped + (target - insns.addr[np.maximum(j, 0)])
    disp = (new_target - (new_addr[f_idx] + insns.length[f_idx].astype(np.uint64))).view(np.int64)
    out = ok & ((disp < -128) | (disp > 127))
    if out.any():
        plan.fail(unique(f_func[out]), OUT_OF_RANGE)


def _fields(insns, plan: _Plan, items: _Items, copied: _Copied, item_off, new_addr, code,
            moved_interior) -> tuple:
    """PC-relative fields of copied instructions, all at once: the target moves with
    its function (written now), lies in another moved function (returned, to be
    resolved once every function has its place), or stays (written now)."""
    idx = copied.insn
    with_field = insns.field_size[idx] > 0
    f_idx, f_item = idx[with_field], copied.items[copied.run_of[with_field]]
    item_base = copied.base
    f_func = items.func[f_item]
    start, end = plan.start, plan.end
    new_i = new_addr[f_idx]
    next_ip = new_i + insns.length[f_idx]
    target = insns.ref[f_idx]
    new_target = target.copy()
    local = (target >= start[f_func]) & (target < end[f_func])
    t = target[local]
    j = np.searchsorted(insns.addr, t, side="right").astype(np.int64) - 1
    lf = f_func[local]
    j_ok = (j >= plan.first_insn[lf]) & (j < plan.last_insn[lf])
    mapped = new_addr[np.maximum(j, 0)]
    bad = ~j_ok | (mapped == 0)
    plan.fail(unique(lf[bad]), DROPPED_REF)
    new_target[local] = np.where(bad, t, mapped + (t - insns.addr[np.maximum(j, 0)]))
    fo = insns.field_off[f_idx]
    fs = insns.field_size[f_idx].astype(np.int64)
    disp = (new_target - next_ip).view(np.int64)
    limit = np.where(fs == 1, 1 << 7, 1 << 31).astype(np.int64)
    out_of_range = (disp < -limit) | (disp >= limit)
    plan.fail(unique(f_func[out_of_range]), OUT_OF_RANGE)
    pos = item_off[f_item] + (insns.addr[f_idx] - item_base[f_item]).astype(np.int64) \
        + fo.astype(np.int64)
    for width in (1, 2, 4):
        sel = (fs == width) & ~out_of_range
        if sel.any():
            put_fields(code, pos[sel], width, disp[sel])
    later = np.flatnonzero(~local)
    later = later[moved_interior(target[later])]
    return (f_func[later], new_i[later] + fo[later].astype(np.uint64), fs[later],
            next_ip[later], target[later])


class NoRoom(Exception):
    """Some functions cannot move: no room for them, or they cannot be laid out
    (``reasons``: row -> why)."""

    def __init__(self, rows, message: str, reasons: dict | None = None):
        super().__init__(message)
        self.rows = list(rows)
        self.reasons = reasons or {}


# The layouts a function that moves may get: the new one, its original block
# order (unsplit), or the new order unsplit (regions without room for splits).
NEW, ORIGINAL, UNSPLIT = 0, 1, 2

# Provisional part bases for laying out functions that move whole: every part
# this far from every other and from every real address, so every branch that
# leaves its part is laid out in its rel32 form, whatever the placement.
PROVISIONAL = 1 << 48
SPAN = 1 << 34


def emit_placed(model, cfg, bt: BlockTable, orders: dict, hot_len: dict, prefixes: dict,
                place, align_of, keep_order=frozenset(), sizes: dict | None = None) -> Emission:
    """Emit functions that move as a whole, each to a place ``place`` chooses.

    Function ``row`` gets its blocks in ``orders[row]``: the first ``hot_len[row]``
    positions (all, when absent) in its hot part, the rest in its cold part. Its
    call padding ``prefixes[row]`` (first and end instruction, when it has one)
    is copied in front of its entry. Every part is laid out on its own first:
    branches between its parts long, branches to other functions in the form they
    had. ``place(hot, cold, original, unsplit, grow)`` (sizes per function row; for
    regions too full for the new layouts: ``original``, the size of the function
    in its original order, ``unsplit``, in its new order but whole; ``grow``, per
    hot and cold part, what its branches to other functions gain if all have to
    grow long) returns the
    base of every hot and cold part (per row; 0 for a function that stays where
    it is after all), the room they were placed in (:class:`Room`) and the
    layout each function gets (:data:`NEW`, :data:`ORIGINAL`, :data:`UNSPLIT`);
    then every branch is relaxed again with the real addresses, parts moving
    within their room (:func:`_tighten`). ``align_of(row)``: the alignment of a
    function's hot part. ``keep_order``: rows whose hot part stays in the range
    it was placed in when ranges overflow (same-named functions: their order is
    livepatch's sympos). A function that cannot be laid out raises
    :class:`NoRoom` before anything is placed. ``sizes``: kept between calls
    for the same functions (row -> sizes of its layouts, which do not depend on
    the other functions): a call after one that raised lays out only once."""
    insns = model.insns
    functions = model.functions
    rows = np.array(sorted(orders), np.int64)
    nf = len(rows)
    if not nf:
        return _no_emission(len(insns))
    # Call padding: one pseudo-block per function that has it, first in its layout.
    pre_rows = [r for r in rows.tolist() if r in prefixes]
    pre_first = np.array([prefixes[r][0] for r in pre_rows], np.int64)
    pre_end = np.array([prefixes[r][1] for r in pre_rows], np.int64)
    bt, pre_base = bt.with_runs(model, pre_first, pre_end)
    pre_block = dict(zip(pre_rows, range(pre_base, pre_base + len(pre_rows))))
    start = functions.start[rows].astype(np.uint64)
    extent = start.copy()
    has_pre = np.array([r in pre_block for r in rows.tolist()])
    if has_pre.any():
        extent[has_pre] = insns.addr[pre_first]
    original = {r: list(cfg.blocks_of(r)) for r in rows.tolist()}
    differs = [f for f, r in enumerate(rows.tolist())
               if orders[r] != original[r] or hot_len.get(r, len(orders[r])) < len(orders[r])]

    def plan_for(variant: np.ndarray) -> _Plan:
        chosen, hot = {}, {}
        for f, r in enumerate(rows.tolist()):
            chosen[r] = original[r] if variant[f] == ORIGINAL else orders[r]
            hot[r] = hot_len.get(r, len(chosen[r])) if variant[f] == NEW else len(chosen[r])
        return _plan_positions(cfg, bt, rows, start, extent, chosen, hot, pre_block, functions)

    never = lambda addrs: np.zeros(len(np.asarray(addrs)), bool)  # noqa: E731
    # (static-key sites may jump into other moved functions: their targets are
    # linked below, like every branch that leaves its function)

    def laid_out(plan: _Plan, defer: bool = False) -> tuple[_Items, np.ndarray]:
        """Items and part sizes (of ``plan``'s functions); ``defer``: functions
        that cannot be laid out are only marked (``plan.failure``), for the
        caller to raise."""
        nf = len(plan.rows)
        items = _build_items(bt, plan.lay, plan.lay_f, plan.part, never)
        plan.fail_on_errors(items)
        if not defer:
            _raise_failures(model, plan)
        _relax(items, plan.bases)
        _optimistic(insns, items)
        _short_fields_in_reach(insns, bt, plan, items)
        if not defer:
            _raise_failures(model, plan)
        sizes = np.bincount(items.part, weights=items.size, minlength=2 * nf).astype(np.int64)
        return items, sizes

    def growth(items: _Items) -> np.ndarray:
        """Per part: the bytes its branches to other functions gain if every
        short one has to grow long."""
        out = np.flatnonzero(((items.kind == JMP) | (items.kind == JCC) | (items.kind == SITE))
                             & (items.dest_item < 0))
        more = np.maximum(LONG_SIZE[items.kind[out]] - items.size[out], 0)
        return np.bincount(items.part[out], weights=more, minlength=2 * nf).astype(np.int64)

    n_rows = len(functions)
    hot_size, cold_size = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.int64)
    grow = np.zeros((2, n_rows), np.int64)
    rl = rows.tolist()
    items = None
    cache = {} if sizes is None else sizes
    missing = [f for f, r in enumerate(rl) if ("new", r) not in cache]
    if len(missing) < nf:
        # (sized by an earlier call for the same functions: layouts of
        # functions are independent, the others' sizes do not change; only
        # the functions it did not size are laid out now)
        if missing:
            f = np.array(missing, np.int64)
            sub = rows[f]
            plan = _plan_positions(cfg, bt, sub, start[f], extent[f],
                                   {r: orders[r] for r in sub.tolist()},
                                   {r: hot_len.get(r, len(orders[r])) for r in sub.tolist()},
                                   pre_block, functions)
            sub_items, sub_sizes = laid_out(plan, defer=True)
            sub_growth = growth(sub_items)
            for k, (r, fine) in enumerate(zip(sub.tolist(), (plan.failure == OK).tolist())):
                if fine:
                    cache["new", r] = (int(sub_sizes[2 * k]), int(sub_sizes[2 * k + 1]),
                                       int(sub_growth[2 * k]), int(sub_growth[2 * k + 1]))
            sub_items = None
            _raise_failures(model, plan)
        hot_size[rows], cold_size[rows], grow[0, rows], grow[1, rows] = \
            np.array([cache["new", r] for r in rl], np.int64).T
    else:
        plan = plan_for(np.full(nf, NEW))
        items, new_sizes = laid_out(plan, defer=True)
        hot_size[rows], cold_size[rows] = new_sizes[0::2], new_sizes[1::2]
        part_growth = growth(items)
        grow[0, rows], grow[1, rows] = part_growth[0::2], part_growth[1::2]
        ok = (plan.failure == OK).tolist()
        cache.update((("new", r), (int(hot_size[r]), int(cold_size[r]), int(grow[0, r]),
                                   int(grow[1, r])))
                     for r, fine in zip(rl, ok) if fine)
        _raise_failures(model, plan)
    position = {r: f for f, r in enumerate(rl)}
    different = set(rows[differs].tolist()) if differs else set()

    def measure(want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sizes of ``want``'s functions in their original order and in the new
        one whole, laid out only for the functions that ask (most regions never
        do)."""
        sub = np.array(sorted(set(want.tolist()) & different), np.int64)
        whole = hot_size[want] + cold_size[want]
        out = {ORIGINAL: dict(zip(want.tolist(), whole.tolist())),
               UNSPLIT: dict(zip(want.tolist(), whole.tolist()))}
        if len(sub):
            f = np.array([position[r] for r in sub.tolist()], np.int64)
            for v in (ORIGINAL, UNSPLIT):
                chosen = {r: original[r] if v == ORIGINAL else orders[r] for r in sub.tolist()}
                hot = {r: len(chosen[r]) for r in sub.tolist()}
                try:
                    plan = _plan_positions(cfg, bt, sub, start[f], extent[f], chosen, hot,
                                           pre_block, functions)
                    v_sizes = laid_out(plan)[1]
                except NoRoom:
                    continue   # (that layout is no smaller then)
                out[v].update(zip(sub.tolist(), (v_sizes[0::2] + v_sizes[1::2]).tolist()))
        return (np.array([out[ORIGINAL][r] for r in want.tolist()], np.int64),
                np.array([out[UNSPLIT][r] for r in want.tolist()], np.int64))

    hot_base, cold_base, room, variant = place(hot_size, cold_size,
                                               OtherLayouts(hot_size + cold_size, measure),
                                               grow)
    placed = hot_base[rows] != 0
    if items is None or (variant[rows] != NEW).any() or not placed.all():
        # Laid out again: functions that got another layout, without those that
        # stay where they are after all.
        items = plan = None   # (the first layout's arrays go before the new ones come)
        plan = plan_for(variant[rows])
        keep_pos = placed[plan.lay_f]
        plan.lay, plan.lay_f, plan.part = plan.lay[keep_pos], plan.lay_f[keep_pos], \
            plan.part[keep_pos]
        items, _ = laid_out(plan)
    final = np.zeros(2 * nf, np.uint64)
    final[0::2], final[1::2] = hot_base[rows], cold_base[rows]

    # Addresses inside the extent of a function that moved (its entry included).
    lo, hi = extent[placed], plan.end[placed]
    order = np.argsort(lo)
    lo, hi = lo[order], hi[order]

    def moved(addrs):
        addrs = np.asarray(addrs, np.uint64)
        i = np.searchsorted(lo, addrs, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] &= addrs[ok] < hi[i[ok]]
        return ok

    # Branches that leave their function go to where their target is now: the
    # item it is in (when it moved) or its address (when it stays).
    _link_targets(insns, bt, items, moved)
    align = np.ones(2 * nf, np.int64)
    align[0::2] = [int(align_of(r)) for r in rows.tolist()]
    ordered = np.zeros(2 * nf, bool)
    ordered[0::2] = [r in keep_order for r in plan.rows.tolist()]
    addr, final = _tighten(items, final, align, room, plan.rows, keep_in_place=ordered)
    code_base, plan.frag_base = final[0::2].copy(), final[1::2].copy()
    copied = _Copied.of(items, insns)
    new_addr = _new_addresses(insns, plan, bt, items, addr, copied)
    code, item_off = _bytes(model, bt, items, addr, copied)
    deferred = _fields(insns, plan, items, copied, item_off, new_addr, code, moved)
    _raise_failures(model, plan)   # (found only once placed: all is placed again)
    emission = _emission(plan, items, addr, copied, code, item_off, new_addr, deferred,
                         bodies=_bodies_apart(bt, items, addr), extent=extent,
                         code_base=code_base, free=np.zeros((0, 2), np.uint64))
    if not placed.all():
        emission = emission.select(placed)
    # Functions whose new block order was given up for want of room (kept whole in
    # the new order is no loss to the block layout: not counted).
    lost = np.array([variant[r] == ORIGINAL and orders[r] != original[r]
                     for r in rows.tolist()], bool)
    emission.fallback = int(lost[placed].sum())
    return emission


def _plan_positions(cfg, bt: BlockTable, rows, start, extent, orders, hot_len, pre_block,
                    functions) -> _Plan:
    """Positions of every function's layout (call padding first, then its blocks;
    the first ``hot_len`` blocks hot), unreachable fill dropped, each position's
    part (2f hot, 2f+1 cold)."""
    nf = len(rows)
    rl = rows.tolist()
    seqs = [orders[r] for r in rl]
    head = np.array([r in pre_block for r in rl], bool)
    n_body = np.fromiter((len(q) for q in seqs), np.int64, nf)
    lengths = n_body + head
    total = int(lengths.sum())
    first = np.zeros(nf, np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    # Call padding (a pseudo-block) first where there is some, then the blocks.
    lay = np.empty(total, np.int64)
    is_body = np.ones(total, bool)
    is_body[first[head]] = False
    lay[is_body] = np.fromiter(itertools.chain.from_iterable(seqs), np.int64,
                               int(n_body.sum()))
    lay[first[head]] = [pre_block[r] for r, h in zip(rl, head.tolist()) if h]
    if not bt.covered[lay].all():
        raise RuntimeError("a function is laid out with blocks its block table left out")
    lay_f = np.repeat(np.arange(nf), lengths)
    hot = np.fromiter((hot_len[r] for r in rl), np.int64, nf)
    in_cold = (np.arange(total) - first[lay_f]) >= (head + hot)[lay_f]
    plan = _Plan(
        rows=rows, start=start, end=functions.end[rows].astype(np.uint64),
        slot=np.zeros(nf, np.int64),
        first_insn=cfg.block_first[cfg.func_first_block[rows]],
        last_insn=cfg.block_end[cfg.func_end_block[rows] - 1],
        lay=lay, lay_f=lay_f, dropped_fill=np.zeros(nf),
        failure=np.zeros(nf, np.int8), keep=np.full(nf, -1, np.int64),
        reserved=np.zeros(nf, np.int64), frag_base=np.zeros(nf, np.uint64),
        bases=PROVISIONAL + np.uint64(SPAN) * np.arange(2 * nf, dtype=np.uint64))
    drop = bt.droppable[lay]
    plan.dropped_fill = np.bincount(lay_f[drop], weights=bt.whole[lay[drop]], minlength=nf)
    plan.lay, plan.lay_f, in_cold = lay[~drop], lay_f[~drop], in_cold[~drop]
    plan.part = 2 * plan.lay_f + in_cold
    return plan


class OtherLayouts:
    """Sizes of every function's other layouts, whole in its original block order
    (``original``) and whole in its new one (``unsplit``), measured on first use
    (:meth:`ensure`) by ``measure(rows) -> (original, unsplit)``: only functions
    of regions too full for the new layouts ever need them. Until measured, both
    read as ``whole`` (the new layout's size)."""

    def __init__(self, whole: np.ndarray, measure):
        self.original = whole.astype(np.int64).copy()
        self.unsplit = whole.astype(np.int64).copy()
        self.known = np.zeros(len(whole), bool)
        self.measure = measure

    def ensure(self, rows) -> None:
        rows = np.asarray(rows, np.int64)
        need = rows[~self.known[rows]]
        if len(need):
            self.original[need], self.unsplit[need] = self.measure(need)
            self.known[need] = True


class Room:
    """The free ranges parts were placed in: for every function row, the range
    its hot (``range_of[0, row]``) and cold (``range_of[1, row]``) part is in
    (index into ``lo``/``hi``; -1: none), and which ranges its parts may move to
    when their range overflows (``alternatives(row)``)."""

    def __init__(self, lo, hi, range_of, alternatives):
        self.lo = np.asarray(lo, np.uint64)
        self.hi = np.asarray(hi, np.uint64)
        self.range_of = np.asarray(range_of, np.int64)
        self.alternatives = alternatives


def _optimistic(insns, items: _Items) -> None:
    """Branches to other functions take the size they had (laid out far away, they
    all grew long): next to the same neighbours they reach as before; the
    relaxation with real addresses (:func:`_tighten`) grows those that do not."""
    out = np.flatnonzero(((items.kind == JMP) | (items.kind == JCC) | (items.kind == SITE))
                         & (items.dest_item < 0) & (items.origin >= 0))
    if len(out):
        was_short = insns.length[items.origin[out]] <= 2
        items.size[out] = np.where(was_short, SHORT_SIZE[items.kind[out]],
                                   LONG_SIZE[items.kind[out]])


def _link_targets(insns, bt: BlockTable, items: _Items, moved) -> None:
    """Point every branch to another function that moved at the item its target is
    in now (``dest_item`` + ``dest_off``): its address then follows the layout."""
    out = np.flatnonzero(isin(items.kind, TARGETED) & (items.dest_item < 0))
    items.dest_off = np.zeros(len(items.kind), np.int64)
    if not len(out):
        return
    target = items.dest_addr[out]
    m = moved(target)
    out, target = out[m], target[m]
    if not len(out):
        return
    # Old instruction -> (item, offset) for every instruction laid out.
    n = len(insns.addr)
    insn_item = np.full(n, -1, np.int64)
    insn_off = np.zeros(n, np.int64)
    copy = np.flatnonzero(items.kind == COPY)
    i0 = items.i0[copy]
    counts = items.i1[copy] - i0
    idx = concat_ranges(i0, counts)
    run = np.repeat(copy, counts)
    insn_item[idx] = run
    insn_off[idx] = (insns.addr[idx] - insns.addr[np.repeat(i0, counts)]).astype(np.int64)
    br = np.flatnonzero((items.kind != COPY) & (items.origin >= 0))
    insn_item[items.origin[br]] = br
    insn_off[items.origin[br]] = 0
    el = np.flatnonzero(items.elided)
    insn_item[bt.term[items.lay[el]]] = items.elided_to[el]
    insn_off[bt.term[items.lay[el]]] = 0
    site, cmp = _entered_at_cmp(bt, items)
    insn_item[site] = cmp
    insn_off[site] = 0
    t = np.searchsorted(insns.addr, target, side="right").astype(np.int64) - 1
    item = insn_item[t]
    if (item < 0).any():
        bad = int(target[item < 0][0])
        raise NoRoom([], f"a branch goes to {bad:#x}, code that was dropped")
    items.dest_item[out] = item
    items.dest_off[out] = insn_off[t] + (target - insns.addr[t]).astype(np.int64)


def _tighten(items: _Items, bases: np.ndarray, align: np.ndarray, room: Room,
             rows: np.ndarray, rounds: int = 64,
             keep_in_place: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Relax every branch with the real addresses: parts keep their order inside
    the free range they were placed in and close up behind parts that shrank;
    a branch that does not reach grows, and the parts after it move up. A range
    that overflows hands its last part to another range with room (the last
    one not in ``keep_in_place``, when there is one: those keep their order
    among others). Returns the item addresses and the part bases."""
    size = items.size
    n = len(size)
    nparts = len(bases)
    starts = items.part_starts()
    first_of_item = np.repeat(starts, np.diff(np.r_[starts, n]))
    branches = np.flatnonzero((items.kind == JMP) | (items.kind == JCC) | (items.kind == SITE))
    long_size = LONG_SIZE[items.kind[branches]]
    cs = np.zeros(n + 1, np.int64)
    range_of = np.full(nparts, -1, np.int64)
    range_of[0::2] = room.range_of[0, rows]
    range_of[1::2] = room.range_of[1, rows]
    # Parts in each range, in the order they were placed.
    used = np.flatnonzero(range_of >= 0)
    members: dict[int, list[int]] = {}
    for p in used[np.argsort(bases[used], kind="stable")].tolist():
        members.setdefault(int(range_of[p]), []).append(p)
    failed: list[int] = []   # functions a part of which found no room: all reported at once
    for _ in range(rounds):
        part_size = np.bincount(items.part, weights=size, minlength=nparts).astype(np.int64)
        bases = bases.copy()
        overflow = []
        for r, parts in members.items():
            at = int(room.lo[r])
            for p in parts:
                a = int(align[p])
                at = (at + a - 1) // a * a
                bases[p] = at
                at += int(part_size[p])
            if at > int(room.hi[r]):
                overflow.append(r)
        if overflow:
            for r in overflow:
                movable = [k for k, q in enumerate(members[r])
                           if keep_in_place is None or not keep_in_place[q]]
                p = members[r].pop(movable[-1] if movable else -1)
                target = None
                for q in room.alternatives(int(rows[p // 2])):
                    tail = members.get(q, [])
                    end = int(bases[tail[-1]]) + int(part_size[tail[-1]]) if tail \
                        else int(room.lo[q])
                    a = int(align[p])
                    if (end + a - 1) // a * a + int(part_size[p]) <= int(room.hi[q]):
                        target = q
                        break
                if target is None:
                    # (the others go on: every function that overflows in this
                    # layout is found in one go, not one per emission)
                    failed.append(int(rows[p // 2]))
                    continue
                members.setdefault(target, []).append(p)
                range_of[p] = target
            continue
        if failed:
            raise NoRoom(sorted(set(failed)), "no room once jumps grew")
        np.cumsum(size, out=cs[1:])
        addr = bases[items.part] + (cs[:-1] - cs[first_of_item]).astype(np.uint64)
        disp = items.displacements(addr, branches)
        short = size[branches] < long_size
        grow = short & ((disp < -128) | (disp > 127))
        if not grow.any():
            return addr, bases
        size[branches[grow]] = long_size[grow]
    raise NoRoom(rows.tolist()[:1], "branch relaxation did not settle")


def _emission(plan: _Plan, items: _Items, addr, copied: _Copied, code, item_off, new_addr,
              deferred, **placed) -> "Emission":
    """The Emission of ``plan``'s functions laid out as ``items`` (each part's code
    one after the other in ``code``); ``placed``: the fields of functions placed
    anew."""
    nf = len(plan.rows)
    part_len = np.bincount(items.part, weights=items.size, minlength=2 * nf).astype(np.int64)
    part_off = np.zeros(2 * nf, np.int64)
    firsts = items.part_starts()
    part_off[items.part[firsts]] = item_off[firsts]
    lay_f = items.lay_f
    return Emission(
        rows=plan.rows, start=plan.start, end=plan.end, first_insn=plan.first_insn,
        last_insn=plan.last_insn, code=code, code_off=part_off[0::2], code_len=part_len[0::2],
        frag_base=plan.frag_base, frag_off=part_off[1::2], frag_len=part_len[1::2],
        inserted_jumps=np.bincount(lay_f[items.inserted], minlength=nf),
        dropped_bytes=(plan.dropped_fill + np.bincount(lay_f, weights=items.dropped,
                                                       minlength=nf)).astype(np.int64),
        item_func=items.func, item_kind=items.kind, item_addr=addr, item_size=items.size,
        item_base=copied.base, item_state=items.state, item_origin=items.origin,
        new_addr=new_addr, deferred=deferred, flipped=items.flipped,
        promoted=_promoted(items, addr), **placed)


def _kept_rows(rows: np.ndarray, keep: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows (function index first) of the kept functions, renumbered."""
    mine = keep[rows[:, 0]]
    out = rows[mine].copy()
    out[:, 0] = index[out[:, 0]]
    return out


def _raise_failures(model, plan: _Plan) -> None:
    bad = np.flatnonzero(plan.failure != OK)
    if len(bad):
        reasons = {int(plan.rows[f]): FAILURES[int(plan.failure[f])] for f in bad.tolist()}
        raise NoRoom(list(reasons), f"{len(reasons)} functions cannot be laid out", reasons)


def _copy_bytes(model, code: np.ndarray, dest: np.ndarray, src_addr: np.ndarray,
                size: np.ndarray, chunk: int = 1 << 12) -> None:
    """Copy ``size`` bytes from each old address to each offset of ``code``.
    (``chunk`` runs at a time: each byte copied takes three int64 temporaries,
    tens of MB for 65,536 runs of blocks at once.)"""
    image = model.image
    raw = image.bytes
    src = np.zeros(len(src_addr), np.int64)
    for s in image.sections:
        if not (s.is_alloc and s.is_exec and s.has_bits and s.size):
            continue
        inside = (src_addr >= np.uint64(s.addr)) & (src_addr < np.uint64(s.end))
        src[inside] = (src_addr[inside] - np.uint64(s.addr)).astype(np.int64) + s.offset
    for lo in range(0, len(size), chunk):
        n = size[lo:lo + chunk]
        code[concat_ranges(dest[lo:lo + chunk], n)] = raw[concat_ranges(src[lo:lo + chunk], n)]


def _encode_branches(items: _Items, addr: np.ndarray, item_off: np.ndarray,
                     code: np.ndarray) -> None:
    """Jumps, conditional jumps and static-key sites (jmp or nop), 2 to 6 bytes."""
    kind, size = items.kind, items.size
    br = items.branches()
    disp = items.displacements(addr, br)
    at = item_off[br]
    k, n = kind[br], size[br]
    sel = k == CALL
    code[at[sel]] = 0xE8
    put_fields(code, at[sel] + 1, 4, disp[sel])
    jumps = (k == JMP) | ((k == SITE) & items.site_jmp[br])
    for sel, opcode, width in ((jumps & (n == 2), (0xEB,), 1), (jumps & (n == 5), (0xE9,), 4)):
        code[at[sel]] = opcode[0]
        put_fields(code, at[sel] + 1, width, disp[sel])
    cc = items.cc[br].astype(np.int64)
    sel = (k == JCC) & (n == 2)
    code[at[sel]] = 0x70 | cc[sel]
    put_fields(code, at[sel] + 1, 1, disp[sel])
    sel = (k == JCC) & (n == 6)
    code[at[sel]] = 0x0F
    code[at[sel] + 1] = 0x80 | cc[sel]
    put_fields(code, at[sel] + 2, 4, disp[sel])
    nops = (k == SITE) & ~items.site_jmp[br]
    for width in (2, 5):
        sel = at[nops & (n == width)]
        pattern = np.frombuffer(enc.nop(width), np.uint8)
        code[sel[:, None] + np.arange(width)[None, :]] = pattern
    for i in np.flatnonzero(kind == NOP).tolist():
        at_i, n_i = int(item_off[i]), int(size[i])
        code[at_i:at_i + n_i] = np.frombuffer(enc.nop(n_i), np.uint8)


def _encode_compares(bt: BlockTable, items: _Items, addr: np.ndarray, item_off: np.ndarray,
                     code: np.ndarray) -> None:
    """The cmp of every promoted call: its template, and the target's new address
    as a sign-extended imm32 (kernel text is in the top 2 GiB)."""
    cmp = np.flatnonzero(items.kind == CMP)
    if not len(cmp):
        return
    k = items.icp[cmp]
    template, length = bt.promotions.template[k], bt.promotions.length[k]
    at = item_off[cmp]
    span = np.arange(template.shape[1])
    inside = span[None, :] < length[:, None]
    code[(at[:, None] + span[None, :])[inside]] = template[inside]
    dest = items.destinations(addr, cmp).view(np.int64)
    if ((dest < -(1 << 31)) | (dest >= (1 << 31))).any():
        raise ValueError("a promoted call's target is outside the top 2 GiB")
    put_fields(code, at + length - 4, 4, dest)


def _promoted(items: _Items, addr: np.ndarray) -> np.ndarray:
    """(function index, cmp immediate's address, call's rel32 address, target,
    promotion index) of every promoted call, int64 (addresses as two's
    complement)."""
    cmp = np.flatnonzero(items.kind == CMP)
    out = np.zeros((len(cmp), 5), np.int64)
    if len(cmp):
        call = cmp + 2      # (cmp, jne, call)
        out[:, 0] = items.func[cmp]
        out[:, 1] = (addr[cmp] + items.size[cmp].astype(np.uint64) - np.uint64(4)).view(np.int64)
        out[:, 2] = (addr[call] + np.uint64(1)).view(np.int64)
        out[:, 3] = items.destinations(addr, cmp).view(np.int64)
        out[:, 4] = items.icp[cmp]
    return out
