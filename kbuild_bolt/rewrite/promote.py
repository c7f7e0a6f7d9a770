"""Indirect-call promotion: which indirect calls get a direct path to the target
the profile saw them call most.

A promoted call ``call *X`` (through a register, a base-register memory operand,
or a retpoline thunk ``call __x86_indirect_thunk_<reg>``) is emitted as::

        cmp  $target, X         # the same operand the call reads
        jne  .Lfallback         # (laid out at the end of the function: cold)
        call target             # direct: no retpoline, no indirect prediction
    .Lnext:
        ...
    .Lfallback:
        call *X                 # the original call, byte for byte (its
        jmp  .Lnext             #  .retpoline_sites entry follows it here)

The emitter lays this out (:mod:`kbuild_bolt.rewrite.emit`); this module only
decides where, and why not elsewhere. What keeps it safe for a kernel:

- the call is not part of anything the kernel patches as a unit (alternatives,
  paravirt: those become direct calls at boot anyway) and no other table names
  it; the path continues right after it (it does not end its function);
- the operand does not depend on where the instruction is (no RIP-relative or
  absolute memory, no segment prefix) so the ``cmp`` reads exactly what the
  call reads; the flags the ``cmp`` sets are dead (a call clobbers them);
- the target is a function entry in permanent text (init text is freed: a
  pointer could not keep naming it) and its address in the ``cmp`` carries an
  R_X86_64_32S relocation, so KASLR moves it with the kernel;
- kernels with kCFI (clang ``__cfi_`` preambles, FineIBT) are left alone: the
  direct path would skip the callee-side check FineIBT moves there;
- a direct call needs no ENDBR at its target (IBT only checks indirect ones);
  with call depth tracking (``.call_sites``, which cannot grow) the new direct
  call is not accounted: the return thunk then refills the RSB earlier, never
  later, which costs only time in ``retbleed=stuff`` mode.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import isin, unique
from kbuild_bolt.binary.cfg import FALLTHROUGH
from kbuild_bolt.elf.image import FIELD_SIZE, PC_RELATIVE
from kbuild_bolt.rewrite.emit import table_sites
from kbuild_bolt.x86 import decode as x86
from kbuild_bolt.x86 import encode as enc

TEMPLATE = 16   # bytes kept per cmp template (the longest form is 13)

# Thresholds, as BOLT's -icp-calls-* options: the target's share of the site's
# calls (percent) and the site's calls in the profile. Every call that goes
# elsewhere takes the jne and the jump back: at 80%, the lab workloads keep
# their taken jumps (at 50% they took 0.5% more) and still lose most of their
# indirect calls (benchmarks/bench_icp.py).
DEFAULT_SHARE = 80.0
DEFAULT_MIN_CALLS = 100


@dataclass
class Promotions:
    """Promoted calls, by site (instruction index, ascending)."""

    site: np.ndarray        # int64 instruction index of the call
    target: np.ndarray      # uint64 old address of the function on the direct path
    calls: np.ndarray       # int64 times the profile saw the site run
    hits: np.ndarray        # int64 of which it went to ``target``
    template: np.ndarray    # uint8 (n, TEMPLATE): the cmp, its immediate zero
    length: np.ndarray      # int64 bytes of the cmp
    # The relocation of the memory operand's displacement, when the call has one
    # (``call *table(%rax)``: an absolute address KASLR moves): the cmp carries
    # the same one, at this offset in the cmp (-1: none).
    disp_at: np.ndarray = None
    disp_type: np.ndarray = None
    disp_sym: np.ndarray = None
    disp_addend: np.ndarray = None
    # The call starts its block: its old address now names the cmp (what branched
    # there takes the direct path first); its fallback copy has no name.
    enter_at_cmp: np.ndarray = None
    skipped: Counter = field(default_factory=Counter)   # reason -> sites

    def __len__(self) -> int:
        return len(self.site)

    def without(self, drop: np.ndarray, reason: str) -> "Promotions":
        """These promotions but those where ``drop`` is True (counted for ``reason``)."""
        keep = ~drop
        skipped = Counter(self.skipped)
        if drop.any():
            skipped[reason] += int(drop.sum())
        return Promotions(self.site[keep], self.target[keep], self.calls[keep],
                          self.hits[keep], self.template[keep], self.length[keep],
                          self.disp_at[keep], self.disp_type[keep], self.disp_sym[keep],
                          self.disp_addend[keep], self.enter_at_cmp[keep], skipped)


@dataclass
class Eligible:
    """Indirect calls that may be promoted, with their cmp templates."""

    site: np.ndarray
    template: dict          # site -> cmp bytes
    skipped: Counter
    # site -> (offset in the cmp, type, symbol, addend) of its displacement's relocation
    disp_reloc: dict = field(default_factory=dict)
    at_block_start: set = field(default_factory=set)   # sites that start their block


def has_kcfi(model) -> bool:
    return bool(model.image.symbols.names_start_with(("__cfi_",)).any())


def eligible_calls(model, cfg, rows: np.ndarray) -> Eligible:
    """The indirect calls of functions ``rows`` that may get a direct path."""
    insns = model.insns
    skipped: Counter = Counter()
    in_rows = np.zeros(len(model.functions) + 1, bool)
    in_rows[rows] = True
    flow = insns.flow
    calls = np.flatnonzero(in_rows[model.function_of_insn]
                           & ((flow == x86.IND_CALL) | (flow == x86.CALL)))
    thunk_of = {}
    symbols = model.image.symbols
    names = symbols.names
    for i in np.flatnonzero(symbols.names_start_with(enc.THUNK_PREFIXES)).tolist():
        reg = enc.thunk_register(names[i])
        if reg is not None and symbols.shndx[i] > 0:   # (inner labels: NOTYPE)
            thunk_of[int(symbols.value[i])] = reg
    direct = flow[calls] == x86.CALL
    via_thunk = isin(insns.ref[calls[direct]], np.array(list(thunk_of), np.uint64))
    keep = np.ones(len(calls), bool)
    keep[np.flatnonzero(direct)[~via_thunk]] = False
    calls = calls[keep]
    if not len(calls):
        return Eligible(calls, {}, skipped)
    if has_kcfi(model):
        skipped["kCFI kernel"] += len(calls)
        return Eligible(calls[:0], {}, skipped)
    # Named by a table other than .retpoline_sites (whose entry follows the call
    # to its fallback copy), or inside a patch unit: left as they are.
    named = table_sites(model, skip=(".retpoline_sites",))
    in_unit = model.in_patch_unit(insns.addr[calls])
    # The path goes on right after the call: in its block, or (a call that ends its
    # block) in the block it falls through to.
    b = np.searchsorted(cfg.block_first, calls, side="right").astype(np.int64) - 1
    falls = np.zeros(len(cfg.block_first), bool)
    falls[cfg.edge_src[cfg.edge_kind == FALLTHROUGH]] = True
    last_in_block = (calls >= cfg.block_term[np.maximum(b, 0)]) & ~falls[np.maximum(b, 0)]
    # A call that starts its block: whatever reaches its address (jumps, static-key
    # sites and their __jump_table targets, a function's callers) must reach the
    # cmp, so its address becomes the cmp's (its .retpoline_sites entry, which
    # names the call itself, follows the fallback copy all the same).
    starts_block = calls == cfg.block_first[np.maximum(b, 0)]
    ok = np.ones(len(calls), bool)
    for mask, reason in ((in_unit, "patched at boot (alternative, paravirt)"),
                         (named[calls], "named by a kernel table"),
                         (last_in_block, "never returns")):
        n = int((ok & mask).sum())
        if n:
            skipped[reason] += n
        ok &= ~mask
    at_start = set(calls[starts_block & ok].tolist())
    template, disp_reloc = {}, {}
    relocs = model.code_relocations
    candidates = calls[ok]
    first_reloc = relocs.first_in(insns.addr[candidates],
                                  insns.addr[candidates] + insns.length[candidates]).tolist()
    for s, r, ref in zip(candidates.tolist(), first_reloc, insns.ref[candidates].tolist()):
        at, n = int(insns.addr[s]), int(insns.length[s])
        if flow[s] == x86.CALL:
            cmp = enc.cmp_register(thunk_of[ref])
        else:
            call = model.image.read(at, n)
            cmp = enc.cmp_like_call(call)
            if cmp is not None and r >= 0:
                # (a base-register operand's disp32 naming a symbol: the cmp's copy
                # of it needs the same relocation; it sits one byte further when the
                # cmp adds the REX prefix the call did not have)
                kind = int(relocs.type[r])
                off = int(relocs.offset[r]) - at
                if kind in PC_RELATIVE or FIELD_SIZE.get(kind) != 4 or off + 4 != n \
                        or (r + 1 < len(relocs) and int(relocs.offset[r + 1]) < at + n):
                    cmp = None
                else:
                    shift = len(cmp) - 4 - n
                    disp_reloc[s] = (off + shift, kind, int(relocs.sym[r]), int(relocs.addend[r]))
        if cmp is None:
            skipped["operand depends on its place"] += 1
            continue
        template[s] = cmp
    return Eligible(np.array(sorted(template), np.int64), template, skipped, disp_reloc,
                    at_start & set(template))


def permanent_entries(model) -> np.ndarray:
    """Function entries a promoted call may go to (sorted): in code that stays
    (init text is freed after boot)."""
    functions = model.functions
    sections = model.image.sections
    # (per section, then per function through its section index)
    stays = np.array([not s.name.startswith((".init", ".exit")) for s in sections] + [True])
    k = functions.section.astype(np.int64)
    permanent = stays[np.where((k >= 0) & (k < len(sections)), k, len(sections))]
    return unique(functions.start[permanent].astype(np.uint64))


def choose(model, cfg, rows: np.ndarray, calls_seen, share: float = DEFAULT_SHARE,
           min_calls: int = DEFAULT_MIN_CALLS, every_site: bool = False,
           seed: int = 0) -> Promotions:
    """Promotions in functions ``rows``. ``calls_seen``: the profile's indirect
    calls (:class:`kbuild_bolt.profile.attach.IndirectCalls`, or None): a site
    whose most frequent target takes at least ``share`` percent of its calls,
    and which ran at least ``min_calls`` times, is promoted to it.
    ``every_site`` (a torture mode for the fixups): every eligible site, to its
    profiled target when it has one, else to a function it never calls (only the
    fallback then runs)."""
    eligible = eligible_calls(model, cfg, rows)
    skipped = eligible.skipped
    entries = permanent_entries(model)
    chosen: dict[int, tuple[int, int, int]] = {}
    if calls_seen is not None:
        for site, n, targets in calls_seen.by_site():
            target, hits = targets[0]
            if site not in eligible.template:
                continue
            if n < min_calls or 100.0 * hits < share * n:
                skipped["no dominant target"] += 1
                continue
            k = np.searchsorted(entries, np.uint64(target))
            if k >= len(entries) or int(entries[k]) != int(target):
                skipped["target not a permanent function entry"] += 1
                continue
            chosen[site] = (int(target), n, hits)
    if every_site and len(entries):
        names = model.functions.names
        for site in eligible.site.tolist():
            if site not in chosen:
                rng = random.Random(f"{seed}:icp:{names[int(model.function_of_insn[site])]}:"
                                    f"{int(model.insns.addr[site]) & 0xFFFFF}")
                chosen[site] = (int(entries[rng.randrange(len(entries))]), 0, 0)
    sites = np.array(sorted(chosen), np.int64)
    n = len(sites)
    template = np.zeros((n, TEMPLATE), np.uint8)
    length = np.zeros(n, np.int64)
    for k, s in enumerate(sites.tolist()):
        t = eligible.template[s]
        template[k, :len(t)] = np.frombuffer(t, np.uint8)
        length[k] = len(t)
    values = [chosen[s] for s in sites.tolist()]
    disp = [eligible.disp_reloc.get(s, (-1, 0, 0, 0)) for s in sites.tolist()]
    return Promotions(
        site=sites, target=np.array([v[0] for v in values], np.uint64),
        calls=np.array([v[1] for v in values], np.int64),
        hits=np.array([v[2] for v in values], np.int64),
        template=template, length=length,
        disp_at=np.array([d[0] for d in disp], np.int64),
        disp_type=np.array([d[1] for d in disp], np.int64),
        disp_sym=np.array([d[2] for d in disp], np.int64),
        disp_addend=np.array([d[3] for d in disp], np.int64),
        enter_at_cmp=np.array([s in eligible.at_block_start for s in sites.tolist()], bool),
        skipped=skipped)
