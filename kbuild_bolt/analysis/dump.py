"""``kbuild-bolt dump``: kernel tables and functions as kbuild-bolt understands them.

Text output is for people (disassembly with basic blocks, successors and the
table annotations on each instruction, in the spirit of BOLT's
``-print-cfg``); ``--json`` output is stable and documented in docs/json.md.
"""

from __future__ import annotations

import numpy as np
from iced_x86 import Decoder, Formatter, FormatterSyntax

from kbuild_bolt.binary.cfg import CFG, EDGE_NAMES, REASONS
from kbuild_bolt.errors import KbbError
from kbuild_bolt.analysis.crosscheck import TableCheck
from kbuild_bolt.kernel.tables import base
from kbuild_bolt.x86 import decode as x86

# Short tags for instruction annotations, per table.
TAGS = {
    "__jump_table": "STATICKEY", ".static_call_sites": "STATICCALL",
    ".static_call_tramp_key": "STATICCALL-TRAMP", ".altinstructions": "ALTERNATIVE",
    ".parainstructions": "PARAVIRT", ".smp_locks": "LOCK", "__ex_table": "EXTABLE",
    "__bug_table": "BUG", ".orc_unwind_ip": "ORC", ".retpoline_sites": "RETPOLINE",
    ".return_sites": "RETURN", ".call_sites": "CALLSITE", ".ibt_endbr_seal": "SEAL",
    "__mcount_loc": "MCOUNT", "__patchable_function_entries": "PATCHABLE",
    ".pci_fixup": "PCIFIXUP", "__ksymtab": "KSYM", "__ksymtab_gpl": "KSYM-GPL",
}


def tag_of(name: str) -> str:
    if name.startswith("runtime_"):
        return "RUNTIMECONST"
    return TAGS.get(name, name.upper())


# ---------------------------------------------------------------------------
# Tables


def entry_fields(model, data: base.TableData, index: int) -> dict:
    """One entry's fields: raw values, and resolved/symbolized targets for pointers."""
    out = {}
    entry = data.entries[index]
    for f in data.layout.fields:
        raw = int(entry[f.name])
        item: dict = {"value": raw}
        if f.is_pointer and not data.present(f.name, np.array([index]))[0]:
            item["target"] = None
        elif f.is_pointer:
            target = int(data.targets(f.name, np.array([index]))[0])
            item["target"] = target
            item["symbol"] = model.symbolize(target)
            if f.flag_mask:
                item["flags"] = int(data.flags(f.name, np.array([index]))[0])
        out[f.name] = item
    return out


def format_fields(fields: dict) -> str:
    parts = []
    for name, item in fields.items():
        if "symbol" in item:
            text = f"{name}={item['symbol']}"
            if item.get("flags"):
                text += f" (flags {item['flags']:#x})"
        else:
            text = f"{name}={item['value']:#x}"
        parts.append(text)
    return " ".join(parts)


def table_json(model, data: base.TableData, check: TableCheck | None, with_entries: bool,
               limit: int | None = None) -> dict:
    out = {
        "entries": data.count,
        "entry_size": data.entry_size,
        "address": data.addr,
        "padding_entries": data.padding,
        "located_by": data.located_by,
        "fields": [{"name": f.name, "offset": f.offset, "kind": f.kind} for f in data.layout.fields],
    }
    if check is not None:
        out["mismatches"] = [m.to_json() for m in check.mismatches]
        out["explained"] = dict(check.explained)
    if with_entries:
        out["list"] = [{"index": int(i), "address": int(data.entry_address(int(i))),
                        "fields": entry_fields(model, data, int(i))}
                       for i in (data.indices if limit is None else data.indices[:limit])]
    return out


def table_text(model, data: base.TableData, check: TableCheck | None, limit: int | None) -> str:
    spec = data.spec
    lines = [f"{spec.name}: {data.count:,} entries of {data.entry_size} bytes at {data.addr:#x}"
             f" ({spec.description}; by {data.located_by})"]
    if data.padding:
        lines[0] += f", {data.padding} padding"
    shown = data.indices if limit is None else data.indices[:limit]
    for i in shown.tolist():
        lines.append(f"  [{i}] {format_fields(entry_fields(model, data, i))}")
    if limit is not None and data.count > limit:
        lines.append(f"  ... {data.count - limit:,} more (--limit)")
    if check is not None:
        for reason, count in check.explained.items():
            lines.append(f"  explained: {count} {reason}")
        for m in check.mismatches:
            lines.append(f"  MISMATCH [{m.index}] {m.field} -> {m.where}: {m.message}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Functions


def function_annotations(model, lo: int, hi: int) -> dict[int, list[str]]:
    """Annotations per instruction address for every table entry pointing into [lo, hi)."""
    notes: dict[int, list[str]] = {}
    for name, data in model.tables.items():
        tag = tag_of(name)
        if not data.count:
            continue
        for ref in data.spec.refs:
            if ref.role == base.DATA:
                continue
            targets = data.targets(ref.field)
            inside = np.flatnonzero((targets >= np.uint64(lo)) & (targets < np.uint64(hi)))
            if not len(inside):
                continue
            if ref.role == base.OPERAND:
                where = model.insns.addr[model.insn_containing(targets[inside])]
            else:
                where = targets[inside]
            for k, addr in zip(inside.tolist(), where.tolist()):
                index = int(data.indices[k])
                notes.setdefault(int(addr), []).append(_annotation(model, data, ref, index, tag))
    return notes


def _annotation(model, data, ref, index, tag) -> str:
    fields = entry_fields(model, data, index)
    others = {k: v for k, v in fields.items() if k != ref.field}
    if data.spec.name == "__jump_table":
        key = fields["key"]
        sense = "likely" if key.get("flags", 0) & 1 else "unlikely"
        if ref.field == "code":
            return f"STATICKEY[{index}]: {key['symbol']} ({sense}) -> {fields['target']['symbol']}"
        return f"STATICKEY[{index}] target of {fields['code']['symbol']}"
    if data.spec.name == ".orc_unwind_ip":
        orc = model.tables.get(".orc_unwind")
        if orc is not None and index < len(orc.entries):
            e = orc.entries[index]
            return (f"ORC sp{int(e['sp_offset']):+d} bp{int(e['bp_offset']):+d} "
                    f"bits={int(e['bits']):#06x}")
    detail = format_fields(others)
    role = "" if len(data.spec.refs) == 1 else f".{ref.field}"
    return f"{tag}[{index}]{role}" + (f" {detail}" if detail else "")


def function_view(model, cfg: CFG, row: int, formatter=None) -> dict:
    """One function: its blocks, successors, instructions and annotations."""
    functions = model.functions
    start, end = int(functions.start[row]), int(functions.end[row])
    section = model.image.sections[int(functions.section[row])]
    raw = model.image.read(start, end - start) if end > start else b""
    notes = function_annotations(model, start, end)
    blocks = list(cfg.blocks_of(row))
    labels = {b: f".LBB{b - blocks[0]}" for b in blocks}
    if formatter is None:
        formatter = Formatter(FormatterSyntax.GAS)
        formatter.first_operand_char_index = 8
    decoded = {ins.ip: ins for ins in Decoder(64, raw, ip=start)}
    block_list = []
    for b in blocks:
        first, stop = int(cfg.block_first[b]), int(cfg.block_end[b])
        insns = []
        for i in range(first, stop):
            addr = int(model.insns.addr[i])
            size = int(model.insns.length[i])
            text = _insn_text(model, cfg, formatter, decoded.get(addr), i, labels, blocks)
            insns.append({"address": addr, "size": size,
                          "bytes": raw[addr - start:addr - start + size].hex(), "text": text,
                          "annotations": notes.get(addr, [])})
        block_list.append({
            "label": labels[b],
            "address": int(model.insns.addr[first]),
            "size": int(model.insns.end_of(stop - 1) - model.insns.addr[first]),
            "successors": [{"label": labels.get(d, str(d)), "kind": EDGE_NAMES[k]}
                           for d, k in cfg.successors(b)],
            "instructions": insns,
        })
    return {
        "name": functions.names[row],
        "aliases": functions.aliases.get(row, []),
        "address": start,
        "size": end - start,
        "section": section.name,
        "simple": bool(cfg.func_reason[row] == 0),
        "reason": REASONS[int(cfg.func_reason[row])],
        "blocks": block_list,
    }


def _insn_text(model, cfg, formatter, ins, i, labels, blocks) -> str:
    if ins is None:  # a pseudo-instruction (hypervisor emulate prefix)
        return ".byte ud2 signature"
    flow = int(model.insns.flow[i])
    text = formatter.format(ins)
    kind = int(model.insns.ref_kind[i])
    ref = int(model.insns.ref[i])
    if cfg.static_key_insn[i]:
        # The seed's notation: a static-key site is a pseudo-branch "jit".
        target = _site_target(model, i)
        label = _label_for(model, cfg, labels, blocks, target) if target is not None else "?"
        state = "jmp" if flow == x86.JMP else "nop"
        return f"jit {label} # STATICKEY ({state}) # Size: {int(model.insns.length[i])}"
    if kind == x86.REF_BRANCH:
        label = _label_for(model, cfg, labels, blocks, ref)
        mnemonic = text.split()[0]
        return f"{mnemonic:<7} {label}"
    if kind == x86.REF_RIPREL:
        return f"{text}  # {model.symbolize(ref)}"
    return text


def _site_target(model, i):
    data = model.tables.get("__jump_table")
    if data is None:
        return None
    code = data.targets("code")
    hit = np.flatnonzero(code == model.insns.addr[i])
    if not len(hit):
        return None
    return int(data.targets("target")[hit[0]])


def _label_for(model, cfg, labels, blocks, addr) -> str:
    idx = int(model.insn_index([addr])[0])
    if idx >= 0 and len(blocks):
        b = int(np.searchsorted(cfg.block_first, idx, side="right")) - 1
        if b in labels and int(cfg.block_first[b]) == idx:
            return labels[b]
    return model.symbolize(addr)


def function_text(view: dict) -> str:
    lines = [
        f'Binary Function "{view["name"]}" {{',
        f"  Address  : {view['address']:#x}",
        f"  Size     : {view['size']:#x}",
        f"  Section  : {view['section']}",
        f"  State    : {'simple' if view['simple'] else 'left alone: ' + view['reason']}",
        f"  Blocks   : {len(view['blocks'])}",
    ]
    if view["aliases"]:
        lines.append(f"  Aliases  : {', '.join(view['aliases'])}")
    lines.append("}")
    for block in view["blocks"]:
        lines.append(f"{block['label']} ({len(block['instructions'])} instructions, "
                     f"{block['size']} bytes)")
        for ins in block["instructions"]:
            note = "".join(f"  # {a}" for a in ins["annotations"])
            lines.append(f"    {ins['address']:016x}: {ins['text']}{note}")
        if block["successors"]:
            succ = ", ".join(f"{s['label']} ({s['kind']})" for s in block["successors"])
            lines.append(f"  Successors: {succ}")
    return "\n".join(lines)


def find_function(model, name: str) -> int:
    row = model.functions.by_name(name)
    if row < 0:
        raise KbbError(f"no function named {name!r}")
    return row
