"""Metadata rewriters: everything that records an address of moved code, kept true.

Like BOLT's ``MetadataRewriter``s, each one owns one kind of metadata and has
phase hooks the engine calls in order:

- ``post_emit(ctx)``: after emission, before anything is written; may leave
  functions alone (the ORC table cannot grow, so the layout must fit it);
- ``update(ctx, amap)``: write into the output image (``ctx.output``), through
  the address map old -> new;
- ``finalize(ctx, changes)``: sections after the loadable part whose size
  changes (debug info emptied, a symbol table with new symbols), recorded in
  :class:`FileChanges` and applied to the finished file at once.

Adding "update kallsyms" or "update DWARF" means adding a rewriter to
:func:`metadata_rewriters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kbuild_bolt.arrays import in_sorted, isin, unique
from kbuild_bolt.elf.image import R_X86_64_PC32, RELA, SYM
from kbuild_bolt.errors import KbbError
from kbuild_bolt.kernel.tables import orc as orc_table
from kbuild_bolt.rewrite import relocations as relocs
from kbuild_bolt.rewrite import tables as table_update


@dataclass
class FileChanges:
    """Non-allocated sections to empty, to replace (index -> bytes), and sh_info
    values to set."""

    empty: set = field(default_factory=set)
    replace: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.empty or self.replace or self.info)


class MetadataRewriter:
    name = ""

    def post_emit(self, ctx) -> None:
        pass

    def update(self, ctx, amap) -> None:
        pass

    def finalize(self, ctx, changes: FileChanges) -> None:
        pass

    def close(self) -> None:
        """The run ended (done, failed or interrupted): stop background work."""


class NewCode(MetadataRewriter):
    """The emitted code itself: each function in its slot (int3 after it up to the
    old end, or over the fill it grew into), each cold fragment in free room."""

    name = "code"

    def update(self, ctx, amap) -> None:
        e, out, result = ctx.emission, ctx.output, ctx.result
        code = e.code
        if e.placed:
            self._placed(e, out)
        else:
            self._in_place(ctx, e, out, code)
        result.bytes_changed += int(e.code_len.sum() + e.frag_len.sum())
        result.inserted_jumps += int(e.inserted_jumps.sum())
        result.dropped_bytes += int(e.dropped_bytes.sum())

    @staticmethod
    def _placed(e, out) -> None:
        """Functions placed anew: the room they left becomes int3, then every part
        goes to its place."""
        for lo, hi in e.free.tolist():
            out.fill(lo, hi - lo, 0xCC)
        code = e.code
        for base, off, n in zip(e.code_base.tolist(), e.code_off.tolist(), e.code_len.tolist()):
            if n:
                out.write_at(base, code[off:off + n].tobytes())
        for base, off, n in zip(e.frag_base.tolist(), e.frag_off.tolist(), e.frag_len.tolist()):
            if n:
                out.write_at(base, code[off:off + n].tobytes())

    @staticmethod
    def _in_place(ctx, e, out, code) -> None:
        for row, start, end, off, n, frag, frag_off, frag_len in zip(
                e.rows.tolist(), e.start.tolist(), e.end.tolist(), e.code_off.tolist(),
                e.code_len.tolist(), e.frag_base.tolist(), e.frag_off.tolist(),
                e.frag_len.tolist()):
            new_end = start + n
            out.write_at(start, code[off:off + n].tobytes())
            # int3 after the new code: up to the old end, or, when the code grew into
            # the fill after it, over the rest of that fill (no half nop left behind).
            fill_end = end if new_end <= end else int(ctx.slots[row])
            if fill_end > new_end:
                out.write_at(new_end, b"\xcc" * (fill_end - new_end))
            if frag_len:
                out.write_at(frag, code[frag_off:frag_off + frag_len].tobytes())


class CodeReferences(MetadataRewriter):
    """PC-relative fields without a relocation that point into moved code: between
    two rewritten functions (resolved once all have their place), and from code
    that stays."""

    name = "code references"

    def update(self, ctx, amap) -> None:
        model, e, out = ctx.model, ctx.emission, ctx.output
        insns = model.insns
        _, field_addr, size, next_ip, target = e.deferred
        retarget(amap, out, field_addr, size, next_ip, target,
                 dropped=lambda k: f"reference at {int(field_addr[k]):#x} to dropped code "
                                   f"{int(target[k]):#x}",
                 unreachable=lambda k: f"reference at {int(field_addr[k]):#x} cannot reach its "
                                       "moved target")
        rewritten = np.zeros(len(model.functions) + 1, bool)
        rewritten[e.rows] = True
        refs = np.flatnonzero(~rewritten[model.function_of_insn] & (insns.field_size > 0))
        refs = refs[amap.moved(insns.ref[refs])]
        field_addr = insns.addr[refs] + insns.field_off[refs]
        # (a field that carries a relocation is rewritten by the relocation pass)
        unrelocated = ~in_sorted(model.code_relocations.offset, field_addr)
        refs, field_addr = refs[unrelocated], field_addr[unrelocated]

        def unreachable(k: int) -> str:
            return f"{model.symbolize(int(insns.addr[refs[k]]))} cannot reach moved code"

        retarget(amap, out, field_addr, insns.field_size[refs],
                 insns.addr[refs] + insns.length[refs], insns.ref[refs],
                 dropped=unreachable, unreachable=unreachable)


class Relocations(MetadataRewriter):
    """Every relocation outside the kernel tables: its record and its field."""

    name = "relocations"

    def update(self, ctx, amap) -> None:
        model = ctx.model
        table_ranges = [(d.addr, d.addr + d.size) for d in model.tables.values()]
        updates = relocs.plan_updates(model, amap, ctx.symbol_values, skip_ranges=table_ranges,
                                      fixed=ctx.fixed_symbols)
        ctx.result.relocations_changed = sum(len(u.index) for u in updates)
        ctx.result.fields_rewritten = relocs.apply_updates(model, ctx.output, updates,
                                                           ctx.symbol_values)


class KernelTables(MetadataRewriter):
    """Self-patching tables follow their code (and stay sorted); their relocation
    records follow the bytes."""

    name = "kernel tables"

    def update(self, ctx, amap) -> None:
        result = ctx.result
        result.tables = table_update.update_entries(ctx.model, amap, ctx.output)
        reversed_sites = table_update.reverse_static_keys(ctx.model, amap, ctx.output,
                                                          ctx.emission.flipped)
        if reversed_sites:
            result.static_keys_reversed = reversed_sites
            result.tables.setdefault("__jump_table", 0)
        result.relocations_changed += table_update.recompute_records(
            ctx.model, ctx.output, set(result.tables), ctx.symbol_values)


class OrcUnwind(MetadataRewriter):
    """ORC regenerated for the new layout. The table cannot grow, so the layout
    must fit it: the functions whose new layout costs the most entries are left
    alone until it does."""

    name = "ORC"

    def __init__(self):
        self.entries = None   # (ips, states) of the new table

    def post_emit(self, ctx) -> None:
        model = ctx.model
        if not (".orc_unwind_ip" in model.tables and ".orc_unwind" in model.tables
                and len(ctx.emission)):
            return
        while True:
            e = ctx.emission
            try:
                self.entries = orc_table.regenerate(model, e.runs, e.branch_states,
                                                    e.moved_ranges())
                return
            except orc_table.OrcCapacityError as full:
                if e.placed:
                    raise KbbError(f"{full}: the functions that moved cannot be left "
                                   "alone now (fewer splits or the in-place layout fit)")
                # (an entry per copied run and per emitted branch at most)
                cost = np.argsort(-e.items_per_function(), kind="stable")
                drop = cost[:max(1, len(e) // 20)]
                ctx.leave_alone(e.rows[drop].tolist(), "orc-table-full")
                keep = np.ones(len(e), bool)
                keep[drop] = False
                ctx.emission = e.select(keep)

    def update(self, ctx, amap) -> None:
        if self.entries is None:
            return
        ips, states = self.entries
        write_orc(ctx.model, ctx.output, ips, states)
        padding = int(np.sum(ips[1:] == ips[:-1]))
        ctx.result.orc_entries = (len(ips) - padding, len(ips))
        self.entries = None


class Symbols(MetadataRewriter):
    """The symbol table: every symbol of moved code at its new address
    (``ctx.symbol_values``), and function sizes: a function whose new code runs into
    the fill after it gets the new size; a function placed anew, the size of its
    hot part (every FUNC symbol naming it, aliases too: same address, same size).
    Every cold part gets a local symbol of its own (``ctx.new_symbols``), after the
    other locals; the global symbols' indices move up, in every relocation too."""

    name = "symbols"

    def __init__(self):
        self.tables = None

    def update(self, ctx, amap) -> None:
        image, emission = ctx.model.image, ctx.emission
        symbols = image.symbols
        records = np.frombuffer(ctx.output.mem, SYM, len(symbols), image.symtab.offset)
        moved = np.flatnonzero(ctx.symbol_values != symbols.value)
        records["value"][moved] = ctx.symbol_values[moved]
        if emission.placed:
            self._placed_sizes(ctx, records)
        else:
            self._grown_sizes(ctx, records)
        if ctx.new_symbols:
            self.tables = _insert_symbols(ctx, records)

    def finalize(self, ctx, changes: FileChanges) -> None:
        if self.tables is not None:
            symtab, strtab, first_global = self.tables
            image = ctx.model.image
            changes.replace[image.symtab.index] = symtab
            changes.replace[image.symtab.link] = strtab
            changes.info[image.symtab.index] = first_global

    @staticmethod
    def _grown_sizes(ctx, records) -> None:
        symbols, emission = ctx.model.image.symbols, ctx.emission
        grown = list(zip(emission.start.tolist(), (emission.end - emission.start).tolist(),
                         emission.code_len.tolist()))
        grown = [g for g in grown if g[2] > g[1]]
        if not grown:
            return
        funcs = np.flatnonzero(symbols.type == 2)
        funcs = funcs[np.argsort(symbols.value[funcs], kind="stable")]
        values, sizes = symbols.value[funcs], symbols.size[funcs]
        starts = np.array([g[0] for g in grown], np.uint64)
        lo = np.searchsorted(values, starts, side="left").tolist()
        hi = np.searchsorted(values, starts, side="right").tolist()
        for (_start, old_size, new_size), a, b in zip(grown, lo, hi):
            for k in range(a, b):
                if int(sizes[k]) == old_size:
                    records["size"][funcs[k]] = new_size

    @staticmethod
    def _placed_sizes(ctx, records) -> None:
        symbols = ctx.model.image.symbols
        e = ctx.emission
        hot = (e.code_len - (e.start - e.extent).astype(np.int64)).astype(np.uint64)
        old_size = (e.end - e.start).astype(np.uint64)
        funcs = np.flatnonzero(symbols.type == 2)
        funcs = funcs[np.argsort(symbols.value[funcs], kind="stable")]
        values = symbols.value[funcs]
        lo = np.searchsorted(values, e.start, side="left")
        hi = np.searchsorted(values, e.start, side="right")
        for a, b, old, new in zip(lo.tolist(), hi.tolist(), old_size.tolist(), hot.tolist()):
            for k in range(a, b):
                if int(symbols.size[funcs[k]]) == old:
                    records["size"][funcs[k]] = new


class PromotedCalls(MetadataRewriter):
    """Relocations for the direct path of every promoted indirect call, as the
    linker would have written them: R_X86_64_32S at the cmp's immediate (the
    target's address: x86's relocs tool lists it, so KASLR moves it with the
    kernel) and R_X86_64_PLT32 at the direct call, both naming the section
    symbol of the target's section; and the call's own relocation at the cmp's
    copy of its displacement, when it reads memory at a symbol's address. They
    are appended to the .rela section of the code they are in (after the
    loadable part: it may grow)."""

    name = "promoted calls"

    def __init__(self):
        self.sections: dict[int, bytes] = {}

    def update(self, ctx, amap) -> None:
        from kbuild_bolt.elf.image import R_X86_64_32S, R_X86_64_PLT32

        promoted = ctx.emission.promoted
        promotions = ctx.promotions
        if not len(promoted):
            return
        k = promoted[:, 4]
        ctx.result.calls_promoted = (len(promoted), int(promotions.calls[k].sum()),
                                     int(promotions.hits[k].sum()))
        model = ctx.model
        image = model.image
        imm, call, target = (promoted[:, c].view(np.uint64) for c in (1, 2, 3))
        field_section = model.section_index_of(imm)
        target_section = model.section_index_of(target)
        sec_sym = _section_symbols(model)
        if (target_section < 0).any() or any(int(t) not in sec_sym
                                            for t in unique(target_section).tolist()):
            raise KbbError("a promoted call's target has no section symbol to relocate against")
        sym = np.array([sec_sym[int(t)] for t in target_section.tolist()], np.uint64)
        addend = (target - np.array([image.sections[int(t)].addr
                                     for t in target_section.tolist()], np.uint64)).view(np.int64)
        # A cmp reading memory through a displacement that names a symbol carries
        # the call's relocation for it (symbols after the locals are numbered up
        # by the cold parts' new local symbols, as in every other record).
        disp_at = promotions.disp_at[k]
        has_disp = disp_at >= 0
        cmp_at = imm - (promotions.length[k] - 4).astype(np.uint64)
        disp_sym = promotions.disp_sym[k].astype(np.uint64)
        disp_sym[disp_sym >= np.uint64(image.symtab.info)] += np.uint64(len(ctx.new_symbols))
        rela_of = {r.info: r for r in image.rela_sections}
        for section in unique(field_section).tolist():
            rela = rela_of.get(section)
            if rela is None:
                raise KbbError(f"no relocation section for {image.sections[section].name}: "
                               "promoted calls need one (link with --emit-relocs)")
            sel = np.flatnonzero(field_section == section)
            records = np.zeros(2 * len(sel), RELA)
            records["offset"][0::2] = imm[sel]
            records["info"][0::2] = (sym[sel] << np.uint64(32)) | np.uint64(R_X86_64_32S)
            records["addend"][0::2] = addend[sel]
            records["offset"][1::2] = call[sel]
            records["info"][1::2] = (sym[sel] << np.uint64(32)) | np.uint64(R_X86_64_PLT32)
            records["addend"][1::2] = addend[sel] - 4
            d = sel[has_disp[sel]]
            disp = np.zeros(len(d), RELA)
            disp["offset"] = cmp_at[d] + disp_at[d].astype(np.uint64)
            disp["info"] = (disp_sym[d] << np.uint64(32)) \
                | promotions.disp_type[k][d].astype(np.uint64)
            disp["addend"] = promotions.disp_addend[k][d]
            old = bytes(ctx.output.mem[rela.offset:rela.offset + rela.size])
            self.sections[rela.index] = old + records.tobytes() + disp.tobytes()

    def finalize(self, ctx, changes: FileChanges) -> None:
        changes.replace.update(self.sections)


class Kallsyms(MetadataRewriter):
    """kallsyms inside the image: every symbol at its new address, a name for
    every cold part (as far as the arrays have room: a kernel built with
    CONFIG_BOLT reserves it), the entries sorted again as scripts/kallsyms.c
    sorts them, and the names, markers, offsets and name index written anew."""

    name = "kallsyms"

    def update(self, ctx, amap) -> None:
        from kbuild_bolt.kernel.tables import kallsyms

        image = ctx.model.image
        table = ctx.take_beside("kallsyms", kallsyms.read, image)
        if table is None:
            return
        old = table.addresses
        new = _kallsyms_addresses(ctx, table)
        room = kallsyms.capacities(image, table)
        added = self._add_names(ctx, table, kallsyms, room)
        if np.array_equal(old, new) and not added:
            return
        if added:
            names, records, addrs = zip(*added)
            table.names = table.names + list(names)
            table.records = table.records + list(records)
            table.absolute = np.concatenate([table.absolute, np.zeros(len(added), bool)]) \
                if table.absolute is not None else None
            new = np.concatenate([new, np.array(addrs, np.uint64)])
            table.count += len(added)
        order = kallsyms.address_order(table.names, new, np.arange(table.count))
        arrays = kallsyms.encode(table, order, new[order])
        for name, data in arrays.items():
            if len(data) > room[name]:
                raise KbbError(f"kallsyms: {name} needs {len(data)} bytes, has {room[name]}")
            ctx.output.write_at(table.arrays[name], data)
        ctx.result.tables["kallsyms"] = int((old != new[:len(old)]).sum()) + len(added)

    @staticmethod
    def _add_names(ctx, table, kallsyms, room) -> list[tuple[str, bytes, int]]:
        """(name with type, record, address) of the cold parts' names that fit the
        arrays' ``room``; the summary counts the others."""
        n = table.count
        used = {"kallsyms_names": table.names_size, "kallsyms_offsets": 4 * n,
                "kallsyms_addresses": 8 * n, "kallsyms_seqs_of_names": 3 * n}
        per_entry = {"kallsyms_offsets": 4, "kallsyms_addresses": 8, "kallsyms_seqs_of_names": 3}
        free = {k: room[k] - v for k, v in used.items() if k in room}
        added = []
        unnamed = 0
        lookup = kallsyms.token_index(table.tokens)
        for name, value, _size, _shndx in ctx.new_symbols:
            record = kallsyms.compress("t" + name, table.tokens, lookup)
            k = n + len(added) + 1
            markers = 4 * ((k + 255) // 256)
            fits = record is not None and free["kallsyms_names"] >= len(record) \
                and all(free[a] >= b for a, b in per_entry.items() if a in free) \
                and room.get("kallsyms_markers", markers) >= markers
            if not fits:
                unnamed += 1
                continue
            free["kallsyms_names"] -= len(record)
            for a, b in per_entry.items():
                if a in free:
                    free[a] -= b
            added.append(("t" + name, record, value))
        ctx.result.unnamed = unnamed
        return added


def _kallsyms_addresses(ctx, table) -> np.ndarray:
    """Where every kallsyms entry is in the output: the new value of the symbol of
    that name at that address (kallsyms is made from the symbol table); per-cpu
    entries (absolute values) stay."""
    symbols = ctx.model.image.symbols
    new_values = ctx.symbol_values
    moved = np.flatnonzero(new_values != symbols.value)
    names = symbols.names
    where = dict(zip(zip([names[i] for i in moved.tolist()], symbols.value[moved].tolist()),
                     new_values[moved].tolist()))
    absolute = table.absolute if table.absolute is not None else np.zeros(table.count, bool)
    out = table.addresses.astype(np.uint64).reshape(-1)
    # (only entries at an address some moved symbol had can move: looked up by name there)
    maybe = np.flatnonzero(isin(out, symbols.value[moved]) & ~absolute)
    for i in maybe.tolist():
        out[i] = where.get((table.names[i][1:], int(out[i])), int(out[i]))
    return out


def _insert_symbols(ctx, records) -> tuple[bytes, bytes, int]:
    """The symbol table with ``ctx.new_symbols`` (name, value, size, section) added
    as local functions after the other locals, its string table, and the index of
    its first global symbol. Relocations naming a global symbol are renumbered in
    the output."""
    from kbuild_bolt.elf.image import SHT_RELA, STB_LOCAL, STT_FUNC

    image = ctx.model.image
    symtab = image.symtab
    first_global = symtab.info
    strtab = bytearray(image.section_data(image.sections[symtab.link]))
    new = np.zeros(len(ctx.new_symbols), SYM)
    for k, (name, value, size, shndx) in enumerate(ctx.new_symbols):
        new[k] = (len(strtab), (STB_LOCAL << 4) | STT_FUNC, 0, shndx, value, size)
        strtab += name.encode() + b"\0"
    table = np.concatenate([records[:first_global], new, records[first_global:]])
    shift = np.uint64(len(new))
    from kbuild_bolt.elf.writer import debug_sections

    # (the relocations of debug sections are emptied with them: renumbering them
    # would only fill the sparse holes of the output with pages)
    dropped = {d.index for d in debug_sections(image.sections)}
    for s in image.sections:
        if s.type != SHT_RELA or s.link != symtab.index or not s.size or s.index in dropped:
            continue
        r = np.frombuffer(ctx.output.mem, RELA, s.size // RELA.itemsize, s.offset)
        sym = r["info"] >> np.uint64(32)
        up = sym >= np.uint64(first_global)
        r["info"][up] += shift << np.uint64(32)
    return table.tobytes(), bytes(strtab), first_global + len(new)


# moved instructions whose inline chains every rewrite compares (verify --debug: all)
DEBUG_CHECK_SAMPLE = 2000


class DebugSections(MetadataRewriter):
    """DWARF made true for the new layout (kbuild_bolt.dwarf): line programs,
    scopes, range and location lists, aranges, .debug_frame. The relocations of
    the debug sections are dropped (they describe the old bytes; gdb, binutils and
    LLVM do not apply them to a linked kernel). With ``--strip-debug`` or DWARF
    this tool cannot read, the debug sections are emptied instead (their headers
    stay, so no section index changes)."""

    name = "debug sections"

    def __init__(self, keep: bool = True):
        self.keep = keep
        self.code = None
        self.updater = None

    def update(self, ctx, amap) -> None:
        # (taken now: the emission's items are freed before finalize)
        from kbuild_bolt.rewrite.debuginfo import code_image, save_code_image

        self.code = code_image(ctx.model, ctx.emission)
        ctx.code_image = self.code
        if getattr(ctx.options, "address_map", None):
            save_code_image(ctx.options.address_map, self.code)
        from kbuild_bolt.elf.writer import debug_sections

        if not self.keep or not any(s.name == ".debug_info"
                                    for s in debug_sections(ctx.model.image.sections)):
            return
        from kbuild_bolt.dwarf.update import DebugUpdater

        # (its line programs start now, on the other core, while the other
        # rewriters update the code's tables)
        self.updater = DebugUpdater(self._reader(ctx.model.image), self.code)
        if ctx.options.verify:
            from kbuild_bolt.rewrite.verify_debug import DebugSample, symbolizer_available

            if not symbolizer_available():
                ctx.result.debug_check = "skipped (no llvm-symbolizer: Debian package llvm-19)"
                return
            # (the input's side is read while the DWARF is written)
            ctx.debug_sample = DebugSample(str(ctx.input_path), ctx.model.image, self.code,
                                           DEBUG_CHECK_SAMPLE, seed=ctx.options.seed)

    @staticmethod
    def _reader(image):
        def read(name):
            # (read from the file, not through the map: the map's pages would count
            # twice, hundreds of MB for a distro kernel's .debug_info)
            s = image.section(name)
            if s is None or s.is_alloc or not s.size:
                return None
            return image.read_file_range(s.offset, s.size)
        return read

    def finalize(self, ctx, changes: FileChanges) -> None:
        from kbuild_bolt.dwarf import UPDATED
        from kbuild_bolt.elf.writer import debug_sections

        image = ctx.model.image
        debug = debug_sections(image.sections)
        if not debug:
            return
        if not self.keep:
            changes.empty |= {s.index for s in debug}
            ctx.result.stripped = [s.name for s in debug]
            return
        read = self._reader(image)
        from kbuild_bolt.dwarf.leb import DwarfError
        from kbuild_bolt.dwarf.update import DebugUpdate

        try:
            result = self.updater.run(progress=ctx.say) if self.updater is not None \
                else DebugUpdate({})
        except DwarfError as e:
            # DWARF this tool cannot read is not kept wrong: it goes, and says why
            changes.empty |= {s.index for s in debug}
            ctx.result.stripped = [s.name for s in debug]
            ctx.result.debug_problems = [f"not updated ({e}): the debug sections are removed"]
            if ctx.debug_sample is not None:
                ctx.debug_sample.cancel()
                ctx.debug_sample = None
            return
        finally:
            self.code = self.updater = None
        for s in debug:
            if s.name.startswith(".rela.debug"):
                changes.empty.add(s.index)
            elif s.name in result.sections:
                changes.replace[s.index] = result.sections[s.name]
            elif s.name in UPDATED:
                changes.replace[s.index] = read(s.name)
        ctx.result.debug_stats = result.stats
        ctx.result.debug_problems = result.problems

    def close(self) -> None:
        if self.updater is not None:
            self.updater.cancel()
            self.updater = None


class PlantedFault(MetadataRewriter):
    """Testing hook (``--plant-fault KIND[@FUNCTION]``): the first entry of a table
    pointing into moved code (of FUNCTION, when given) keeps its old value, so
    verify and bisect have something to find."""

    name = "planted fault"

    def __init__(self, fault: str):
        self.fault = fault

    def update(self, ctx, amap) -> None:
        model, out = ctx.model, ctx.output
        kind, _, function = self.fault.partition("@")
        name = {"smp-lock": ".smp_locks", "bug": "__bug_table",
                "return": ".return_sites", "orc": ".orc_unwind_ip"}.get(kind)
        if name is None or name not in model.tables:
            raise KbbError(f"--plant-fault {kind}: this kernel has no such table")
        data = model.tables[name]
        field_name = data.spec.refs[0].field
        targets = data.targets(field_name)
        moved = amap.moved(targets)
        if function:
            row = model.functions.by_name(function)
            if row < 0:
                raise KbbError(f"--plant-fault: no function {function}")
            moved &= model.functions.rows_containing(targets) == row
        moved = np.flatnonzero(moved)
        if not len(moved):
            return  # nothing of that table moved in this rewrite
        index = int(data.indices[int(moved[0])])
        f = data.layout.field(field_name)
        field_addr = int(data.entry_address(index)) + f.offset
        old_value = int(data.entries[field_name][index])
        out.write_at(field_addr, int(old_value).to_bytes(f.size, "little", signed=True))


def metadata_rewriters(options) -> list[MetadataRewriter]:
    """The rewriters of one run, in the order their updates are applied (the
    code first: relocated fields inside it are rewritten after it is copied)."""
    # (the debug sections right after the code: their update starts a background
    # part that runs while the others work)
    rewriters = [NewCode(), DebugSections(keep=not getattr(options, "strip_debug", False)),
                 CodeReferences(), Relocations(), KernelTables(), OrcUnwind(), Symbols(),
                 PromotedCalls(), Kallsyms()]
    if options.plant_fault:
        rewriters.append(PlantedFault(options.plant_fault))
    return rewriters


def retarget(amap, out, field_addr, size, next_ip, target, dropped, unreachable) -> None:
    """Point PC-relative fields (``size`` bytes at ``field_addr``, relative to
    ``next_ip``) at where their old ``target`` moved. Raises with ``dropped(k)`` or
    ``unreachable(k)`` for the first field whose target is gone or out of reach."""
    if not len(target):
        return
    new_target, ok = amap.translate(target)
    if not ok.all():
        raise KbbError(dropped(int(np.flatnonzero(~ok)[0])))
    disp = (new_target - next_ip).view(np.int64)
    size = np.asarray(size).astype(np.int64)
    limit = np.left_shift(1, 8 * size - 1)
    bad = (disp < -limit) | (disp >= limit)
    if bad.any():
        raise KbbError(unreachable(int(np.flatnonzero(bad)[0])))
    for width in unique(size).tolist():
        sel = size == width
        out.write_fields(field_addr[sel], int(width), disp[sel])


def write_orc(model, out, ips, states) -> None:
    """Write the ORC tables and their relocations (PC32 against the section symbol)."""
    ip_table = model.tables[".orc_unwind_ip"]
    orc_table_data = model.tables[".orc_unwind"]
    n = len(ips)
    where = np.uint64(ip_table.addr) + np.uint64(4) * np.arange(n, dtype=np.uint64)
    values = (ips - where).view(np.int64)
    out.array(ip_table.addr, "<i4", n)[:] = values.astype(np.int32)
    dest = out.array(orc_table_data.addr, orc_table_data.layout.dtype, n)
    for name in ("sp_offset", "bp_offset", "bits"):
        dest[name] = states[name]
    rela = [r for r in model.image.rela_sections
            if model.image.sections[r.info].name == ".orc_unwind_ip"]
    if not rela:
        return
    r = model.image.relocations(rela[0])
    if len(r) != n:
        raise KbbError(f".rela.orc_unwind_ip has {len(r)} entries for {n} ORC entries")
    records = np.frombuffer(out.mem, RELA, n, rela[0].offset)
    sec_sym = _section_symbols(model)
    sec_idx = model.section_index_of(ips)
    # Terminator entries sit at the end of a code section, just outside it.
    at_end: dict[int, int] = {}
    for sec in model.image.sections:
        if sec.is_alloc and sec.is_exec:
            at_end.setdefault(sec.end, sec.index)
    sections = model.image.sections
    sym_of = np.array([sec_sym.get(k, 0) for k in range(len(sections))] + [0], np.uint64)
    pick = sec_idx < 0
    if model.is_module:
        # (in a placed module the next section may start right at a code
        # section's end: a terminator there, an entry without a CFA register,
        # belongs to the code section; the loader puts the sections apart)
        ends = np.array(sorted(at_end), np.uint64)
        pick |= isin(ips, ends) & ((states["bits"] & 0xF) == 0)
    outside = np.flatnonzero(pick)
    sec_idx[outside] = [at_end.get(ip, -1) for ip in ips[outside].tolist()]
    addr_of = np.array([sec.addr for sec in sections] + [0], np.uint64)
    k = np.where(sec_idx < 0, len(sections), sec_idx)    # (-1: no section)
    syms = sym_of[k]
    if (syms == 0).any():
        raise KbbError("ORC entry outside every section with a section symbol")
    sec_addr = addr_of[k]
    order = np.argsort(r["offset"])
    records["offset"][order] = where
    records["info"][order] = (syms << np.uint64(32)) | np.uint64(R_X86_64_PC32)
    records["addend"][order] = (ips - sec_addr).view(np.int64)


def _section_symbols(model) -> dict[int, int]:
    symbols = model.image.symbols
    idx = np.flatnonzero(symbols.type == 3)
    return {int(symbols.shndx[i]): int(i) for i in idx.tolist()}
