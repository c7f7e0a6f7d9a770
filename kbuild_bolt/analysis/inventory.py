"""What a vmlinux holds, as ``kbuild-bolt info`` reports it.

The report is a plain dict (stable keys, documented in docs/json.md) so
``--json`` and the text output come from the same data.
"""

from __future__ import annotations

import numpy as np

from kbuild_bolt.arrays import unique
from kbuild_bolt.analysis.crosscheck import check_all
from kbuild_bolt.binary.cfg import build_cfg
from kbuild_bolt.binary.model import BinaryModel
from kbuild_bolt.elf.image import ElfImage
from kbuild_bolt.kernel import tables
from kbuild_bolt.kernel.tables import kallsyms
from kbuild_bolt.kernel.version import kernel_version

CODE_SECTIONS = (".text", ".init.text", ".exit.text")
# Symbols the compiler/objtool add in front of functions (call padding, kCFI).
PREFIX_SYMBOLS = ("__pfx_", "__cfi_")


def function_starts(image: ElfImage, section_name: str) -> np.ndarray:
    """Distinct start addresses of the functions in a code section.

    Aliases share an address and count once; ``__pfx_``/``__cfi_`` prefix
    symbols describe padding in front of a function, not functions.
    """
    section = image.section(section_name)
    if section is None or not image.has_symbols:
        return np.zeros(0, np.uint64)
    symbols = image.symbols
    idx = symbols.functions_in(section.index)
    names = symbols.names
    keep = [i for i in idx.tolist() if not names[i].startswith(PREFIX_SYMBOLS)]
    return unique(symbols.value[np.array(keep, dtype=np.int64)]) if keep else np.zeros(0, np.uint64)


def relocation_counts(image: ElfImage) -> dict[str, int]:
    return {r.name: r.size // 24 for r in image.rela_sections}


def describe(image: ElfImage, analyse: bool = True) -> dict:
    """The whole inventory of a vmlinux."""
    version = kernel_version(image)
    report: dict = {
        "file": str(image.path),
        "version": version.release,
        "banner": version.banner,
        "arch": "x86_64",
        "symbols": image.has_symbols,
        "relocations": {
            "present": image.has_relocations,
            "sections": relocation_counts(image),
        },
    }
    text = image.section(".text")
    report["text_size"] = text.size if text is not None else 0
    report["functions"] = {name: int(len(function_starts(image, name))) for name in CODE_SECTIONS
                           if image.section(name) is not None}
    problems = []
    if not image.has_symbols:
        problems.append("no symbol table (stripped): commands that move code refuse it")
    if not image.has_relocations:
        problems.append("no relocations: link with --emit-relocs and keep them "
                        "(6.12's x86 post-link pass strips them; use vmlinux.unstripped)")
    report["problems"] = problems

    table_report = {}
    if image.has_symbols:
        for name, data in tables.read_all(image, version.series).items():
            entry = {
                "entries": data.count,
                "entry_size": data.layout.entry_size,
                "address": data.addr,
                "located_by": data.located_by,
            }
            if data.padding:
                entry["padding_entries"] = data.padding
            table_report[name] = entry
        ks = kallsyms.read_count(image)
        if ks is not None:
            table_report["kallsyms"] = {"entries": ks.count, "entry_size": 0,
                                        "address": ks.names_addr, "located_by": "symbols"}
    report["tables"] = table_report
    if image.has_symbols and analyse:
        report["analysis"] = analysis(image)
    return report


def analysis(image: ElfImage) -> dict:
    """Decode every function, build CFGs and cross-check every table."""
    model = BinaryModel(image)
    cfg = build_cfg(model)
    checks = check_all(model)
    unnamed = unnamed_code(model)
    return {
        "instructions": len(model.insns),
        "blocks": len(cfg),
        "functions_by_reason": cfg.reason_counts(),
        "unnamed_code": unnamed,
        "mismatches": {name: len(c.mismatches) for name, c in checks.items() if c.mismatches},
        "seconds": model.timing.steps,
    }


def unnamed_code(model) -> dict:
    """Code in function sections that no STT_FUNC symbol covers and that is not
    int3/nop fill: assembly SYM_CODE (entry code) or functions without symbols."""
    from iced_x86 import Decoder, Mnemonic

    regions = [r for r in model.regions if r.kind == "code"]
    count = size = 0
    labelled = 0
    for region in regions:
        raw = model.image.read(region.start, region.end - region.start)
        if not raw.strip(b"\xcc"):
            continue
        real = sum(ins.len for ins in Decoder(64, raw, ip=region.start)
                   if ins.mnemonic not in (Mnemonic.NOP, Mnemonic.INT3))
        if real:
            count += 1
            size += real
            labelled += bool(region.label)
    return {"regions": count, "bytes": size, "labelled": labelled}


def format_text(report: dict) -> str:
    lines = [
        f"file:        {report['file']}",
        f"kernel:      {report['version']} ({report['arch']})",
        f"symbols:     {'yes' if report['symbols'] else 'no'}",
    ]
    rel = report["relocations"]
    if rel["present"]:
        total = sum(rel["sections"].values())
        lines.append(f"relocations: {total:,} in {len(rel['sections'])} sections (--emit-relocs)")
        for name, count in rel["sections"].items():
            lines.append(f"  {name:<28} {count:>9,}")
    else:
        lines.append("relocations: none")
    lines.append(f".text size:  {report['text_size']:,} bytes")
    lines.append("functions:")
    for name, count in report["functions"].items():
        lines.append(f"  {name:<28} {count:>9,}")
    if report["tables"]:
        lines.append("kernel tables:")
        for name, t in report["tables"].items():
            extra = f" (+{t['padding_entries']} padding)" if t.get("padding_entries") else ""
            size = f"{t['entry_size']:>3} B" if t["entry_size"] else "     "
            lines.append(f"  {name:<28} {t['entries']:>9,}  {size}  at {t['address']:#x}{extra}")
    a = report.get("analysis")
    if a:
        lines.append(f"code:        {a['instructions']:,} instructions, {a['blocks']:,} basic blocks")
        lines.append("functions by state:")
        for reason, count in a["functions_by_reason"].items():
            label = "simple (can be laid out again)" if reason == "simple" else f"left alone: {reason}"
            lines.append(f"  {label:<40} {count:>9,}")
        u = a["unnamed_code"]
        lines.append(f"unnamed code: {u['bytes']:,} bytes in {u['regions']} regions "
                     f"({u['labelled']} under non-function symbols), never moved")
        if a["mismatches"]:
            bad = ", ".join(f"{k}: {v}" for k, v in a["mismatches"].items())
            lines.append(f"table cross-check: MISMATCHES ({bad}); see kbuild-bolt dump --table")
        else:
            lines.append("table cross-check: every entry matches the code")
    for problem in report["problems"]:
        lines.append(f"note: {problem}")
    return "\n".join(lines)
