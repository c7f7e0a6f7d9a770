"""The ``kbuild-bolt`` command line: thin subcommands over the layers below."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys

import numpy as np

from kbuild_bolt import __version__
from kbuild_bolt.errors import Interrupted, KbbError
from kbuild_bolt.processes import install_signal_handlers


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------
# info


def cmd_info(args) -> int:
    from kbuild_bolt.analysis.inventory import describe, format_text
    from kbuild_bolt.kernel.vmlinux import open_vmlinux

    with open_vmlinux(args.vmlinux) as image:
        report = describe(image, analyse=not args.no_analysis)
    if args.json:
        _print_json(report)
    else:
        print(format_text(report))
    return 0


# ---------------------------------------------------------------------------
# dump


def cmd_dump(args) -> int:
    from kbuild_bolt.analysis import dump
    from kbuild_bolt.binary.cfg import build_cfg
    from kbuild_bolt.binary.model import BinaryModel
    from kbuild_bolt.analysis.crosscheck import check_all

    model = BinaryModel.open(args.vmlinux)
    checks = check_all(model)
    wanted = args.table or []
    if "all" in wanted:
        wanted = list(model.tables)
    for name in wanted:
        if name not in model.tables:
            raise KbbError(f"this kernel has no table {name!r} (has: {', '.join(model.tables)})")
    rows = [dump.find_function(model, name) for name in args.function or []]
    cfg = build_cfg(model) if rows else None
    summary = not wanted and not rows
    if args.json:
        out = {"file": str(model.image.path), "version": model.version.release, "tables": {}}
        for name, data in model.tables.items():
            if summary or name in wanted:
                out["tables"][name] = dump.table_json(model, data, checks.get(name),
                                                      with_entries=name in wanted,
                                                      limit=args.limit)
        if rows:
            out["functions"] = [dump.function_view(model, cfg, row) for row in rows]
        _print_json(out)
        return 0
    chunks = []
    if summary:
        for name, data in model.tables.items():
            check = checks[name]
            state = "ok" if check.ok else f"{len(check.mismatches)} MISMATCHES"
            chunks.append(f"{name:<32} {data.count:>9,} entries  {state}")
    for name in wanted:
        chunks.append(dump.table_text(model, model.tables[name], checks.get(name), args.limit))
    for row in rows:
        chunks.append(dump.function_text(dump.function_view(model, cfg, row)))
    print("\n".join(chunks))
    return 0


# ---------------------------------------------------------------------------
# rewrite / verify


def _name_list(values) -> set[str] | None:
    if not values:
        return None
    out = set()
    for value in values:
        if value.startswith("@"):
            try:
                text = open(value[1:]).read()
            except OSError as err:
                raise KbbError(f"{value[1:]}: {err.strerror}") from None
            out.update(line.strip() for line in text.splitlines() if line.strip())
        else:
            out.update(v for v in value.split(",") if v)
    return out


def rewrite_options(args):
    from kbuild_bolt.rewrite.engine import RewriteOptions

    profile = getattr(args, "profile", None)  # a path: loaded against the vmlinux
    if profile and not os.path.exists(profile):
        raise KbbError(f"{profile}: no such profile")
    if args.plant_fault and args.verify:
        raise KbbError("--plant-fault leaves a table stale on purpose: add --no-verify")
    return RewriteOptions(
        reorder_blocks=args.reorder_blocks, seed=args.seed, funcs=_name_list(args.funcs),
        skip_funcs=_name_list(args.skip_funcs) or set(), profile=profile, verify=args.verify,
        plant_fault=args.plant_fault, progress=not args.quiet,
        dyno_stats=getattr(args, "dyno_stats", False),
        reorder_functions=args.reorder_functions, split_functions=args.split_functions,
        strip_debug=getattr(args, "strip_debug", False),
        address_map=getattr(args, "address_map", None),
        reverse_static_keys=getattr(args, "reverse_static_keys", True),
        indirect_call_promotion=getattr(args, "indirect_call_promotion", "calls"),
        icp_share=getattr(args, "icp_share", 80.0),
        icp_min_calls=getattr(args, "icp_min_calls", 100),
        icp_every_site=getattr(args, "icp_every_site", False),
        cache_dir=getattr(args, "cache_dir", None),
    )


def cmd_rewrite(args) -> int:
    from kbuild_bolt.rewrite.engine import rewrite

    if args.reorder_blocks == "ext-tsp" and not args.profile:
        raise KbbError("--reorder-blocks=ext-tsp needs --profile (or choose none/reverse/random)")
    if args.reorder_functions in ("cdsort", "hfsort") and not args.profile:
        raise KbbError(f"--reorder-functions={args.reorder_functions} needs --profile "
                       "(or choose none/reverse/random)")
    options = rewrite_options(args)
    from kbuild_bolt.rewrite.module import is_module, rewrite_module

    if str(args.vmlinux).endswith((".ko.xz", ".ko.gz", ".ko.zst")):
        raise KbbError(f"{args.vmlinux}: a compressed module: decompress it first "
                       "(xz -d, gzip -d, zstd -d) and rewrite the .ko")
    if args.sign_key and not is_module(args.vmlinux):
        raise KbbError("--sign-key signs a module (.ko); vmlinux is not signed this way")
    if args.leave_as_is and not is_module(args.vmlinux):
        raise KbbError("--leave-as-is is for a module (.ko)")
    if is_module(args.vmlinux):             # a .ko (ET_REL): a loadable module
        if args.report:
            raise KbbError("--report is for a vmlinux (a module's page is not done yet)")
        from kbuild_bolt.rewrite.module import ModuleLeftAsIs, Signing

        log = None if args.quiet else (lambda m: print(f"  BOLT    {m}", file=sys.stderr))
        signing = None
        if args.sign_key:
            for path in (args.sign_key, args.sign_cert):
                if path and not os.path.exists(path):
                    raise KbbError(f"{path}: no such file")
            signing = Signing(args.sign_key, args.sign_cert or args.sign_key, args.sign_hash,
                              args.sign_file)
        try:
            result = rewrite_module(args.vmlinux, args.output, options, log=log,
                                    signing=signing)
        except ModuleLeftAsIs as left:
            if not args.leave_as_is:
                raise
            _leave_module(args.vmlinux, args.output, signing)
            print(f"module {left.module}: left as it is: {left.reason}")
            return 0
        print(result.brief() if args.quiet else result.summary())
        return 0
    if args.report:
        if not args.profile:
            raise KbbError("--report needs --profile (the page shows the profile's run)")
        _check_report_path(args.report)
        options.keep_record = True
        # (the predicted dyno-stats need the profile attached: ext-TSP does that)
        options.dyno_stats |= args.reorder_blocks == "ext-tsp"
    result = rewrite(args.vmlinux, args.output, options)
    print(result.brief() if args.quiet else result.summary())
    if args.report:
        from kbuild_bolt.report.collect import from_rewrite

        _write_report(args.report, lambda: from_rewrite(result, args.vmlinux, args.output,
                                                        options))
    return 0


def _leave_module(path, output, signing) -> None:
    """The output of a module left as it is: the input's bytes (signed when asked)."""
    from kbuild_bolt.atomic import atomic_output

    if os.path.realpath(path) == os.path.realpath(output) and signing is None:
        return
    with atomic_output(output) as tmp:
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        if signing is not None:
            signing.sign(tmp)


def cmd_report(args) -> int:
    from kbuild_bolt.report.collect import standalone

    if not args.profile:
        raise KbbError("report needs --profile (the page shows the profile's run)")
    for path in (args.vmlinux, args.optimized, args.reprofile):
        if path is not None and not os.path.exists(path):
            raise KbbError(f"{path}: no such file")
    if args.top < 0:
        raise KbbError(f"--top {args.top}: must not be negative")
    _check_report_path(args.output)
    options = rewrite_options(args)
    log = (lambda m: print(f"  REPORT  {m}", file=sys.stderr, flush=True)) \
        if not args.quiet else None
    _write_report(args.output, lambda: standalone(
        args.vmlinux, options, optimized=args.optimized, reprofile=args.reprofile,
        top=args.top, log=log))
    return 0


def _check_report_path(path) -> None:
    """Fail before the work, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise KbbError(f"{path}: no such directory {folder}")
    if os.path.isdir(path):
        raise KbbError(f"{path}: is a directory")


def _write_report(path, gather) -> None:
    import time

    from kbuild_bolt.report.render import write_report

    started = time.perf_counter()
    size = write_report(path, gather())
    print(f"  REPORT  {path} ({size / 1e6:.2f} MB, {time.perf_counter() - started:.1f} s)")


def cmd_bisect(args) -> int:
    from kbuild_bolt.rewrite.bisect import run_bisect

    if args.initrd is None and not args.drive:
        raise KbbError("bisect needs --initrd and/or --drive")
    if args.initrd is not None and not os.path.exists(args.initrd):
        raise KbbError(f"{args.initrd}: no such file")
    boot_kwargs = dict(workload=args.workload, iterations=args.iterations, timeout=args.timeout,
                       smp=args.smp, memory=args.memory, append=args.append or "",
                       extra_qemu=args.qemu_arg or [], drives=args.drive or ())
    if args.expect is not None or args.drive:
        boot_kwargs.update(lab=False, expect_text=args.expect)
    result = run_bisect(args.vmlinux, args.initrd, rewrite_options(args), boot_kwargs)
    print(result.summary())
    return 0 if result.full_run_ok else 1


def cmd_bzimage(args) -> int:
    from kbuild_bolt.kbuild.bzimage import rebuild_bzimage

    out = rebuild_bzimage(args.build_dir, args.vmlinux, args.output)
    print(f"  BZIMAGE {out}")
    return 0


def cmd_verify(args) -> int:
    from kbuild_bolt.rewrite.verify import verify

    if args.debug:
        from kbuild_bolt.rewrite.verify_debug import verify_debug

        if not args.against or not args.address_map:
            raise KbbError("verify --debug needs --against INPUT and --address-map MAP")
        for path in (args.vmlinux, args.against, args.address_map):
            if not os.path.exists(path):
                raise KbbError(f"{path}: no such file")
        report = verify_debug(args.vmlinux, args.against, args.address_map,
                              sample=args.sample, seed=args.seed, dwarfdump=args.dwarfdump)
        print(report.summary())
        return 0 if report.ok else 1
    report = verify(args.vmlinux, against=args.against)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_install_hooks(args) -> int:
    from kbuild_bolt.kbuild.hooks import install_hooks

    print(install_hooks(args.tree))
    return 0


def cmd_check_modules(args) -> int:
    from kbuild_bolt.kbuild.modules import check_modules

    for path in (args.vmlinux, args.symvers, args.system_map):
        if path and not os.path.exists(path):
            raise KbbError(f"{path}: no such file")
    report = check_modules(args.vmlinux, args.modules_dir, symvers=args.symvers,
                           system_map=args.system_map)
    if args.json:
        _print_json({"modules": report.modules, "imports": report.imports,
                     "ok": report.ok, "problems": report.problems})
    else:
        print(report.summary())
    return 0 if report.ok else 1


def cmd_repack_initramfs(args) -> int:
    from kbuild_bolt.initramfs.repack import repack

    stats = repack(args.input, args.output, args.modules)
    print(f"  INITRD  {args.output}: {stats['modules']} modules and {stats['depmod_files']} "
          f"depmod files replaced, {stats['entries'] - stats['modules'] - stats['depmod_files']} "
          f"other entries kept, {stats['compression']}"
          + (f", {stats['early_bytes']} bytes of early cpio kept" if stats["early_bytes"] else ""))
    return 0


def add_rewrite_arguments(p) -> None:
    from kbuild_bolt.layout.functions import STRATEGIES as FUNCTION_STRATEGIES
    from kbuild_bolt.layout.orders import STRATEGIES

    p.add_argument("--reorder-blocks", choices=STRATEGIES, default="ext-tsp",
                   help="block order: ext-tsp (needs --profile), random, reverse or none")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed for the random block and function orders and splits")
    p.add_argument("--reorder-functions", choices=FUNCTION_STRATEGIES, default="none",
                   help="function order inside each text region: cdsort or hfsort (need "
                        "--profile), random, reverse, or none (functions keep their places)")
    p.add_argument("--split-functions", action="store_true",
                   help="move blocks the profile never saw (random ones without a profile) "
                        "to a cold part of each function")
    p.add_argument("--profile", help="profile (kbuild-bolt, BOLT .fdata or perf script)")
    p.add_argument("--funcs", action="append", metavar="NAMES",
                   help="only these functions (comma-separated, or @file)")
    p.add_argument("--skip-funcs", action="append", metavar="NAMES",
                   help="leave these functions alone (comma-separated, or @file)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not verify the output before writing it")
    p.add_argument("--strip-debug", action="store_true",
                   help="empty the debug sections instead of updating their DWARF")
    p.add_argument("--no-reverse-static-keys", dest="reverse_static_keys",
                   action="store_false",
                   help="keep every static-key site's branch sense (by default a site the "
                        "profile saw jump is reversed where its jump side follows it)")
    p.add_argument("--indirect-call-promotion", choices=("none", "calls"), default="calls",
                   help="calls (default): a hot indirect call whose profile shows a dominant "
                        "target gets a direct path to it (cmp; jne fallback; call target)")
    p.add_argument("--icp-share", type=float, default=80.0, metavar="PERCENT",
                   help="share of a site's calls its target must take to be promoted "
                        "(default 80: each call that goes elsewhere takes two more jumps)")
    p.add_argument("--icp-min-calls", type=int, default=100, metavar="N",
                   help="calls a site must make in the profile to be promoted (default 100)")
    p.add_argument("--icp-every-site", action="store_true",
                   help="torture mode: promote every indirect call that may be (to its "
                        "profiled target, else to some function), to prove the fixups")
    p.add_argument("--address-map", metavar="FILE",
                   help="write where old code is now (for verify --debug and profiles of the "
                        "optimized kernel)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep the input's decoded code and CFGs here between runs, keyed by "
                        "its build-id (Kbuild: the build tree's .kbuild-bolt/); a rewrite of "
                        "the same vmlinux then skips that analysis")
    p.add_argument("--plant-fault", metavar="KIND[@FUNCTION]", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


# ---------------------------------------------------------------------------
# profile / dyno


def _model_and_cfg(path):
    from kbuild_bolt.binary.cfg import build_cfg
    from kbuild_bolt.binary.model import BinaryModel

    model = BinaryModel.open(path)
    return model, build_cfg(model)


def _iterations(text: str) -> tuple[int, int]:
    """N (as 0,N) or SHORT,LONG."""
    try:
        parts = [int(x) for x in text.split(",")]
        a, b = parts if len(parts) == 2 else (0, *parts)
    except ValueError:
        raise KbbError(f"--iterations {text}: expected N or SHORT,LONG (e.g. 10 or 2,12)") \
            from None
    return a, b


def _convert_perf(args, model, head: bytes):
    """A Profile from perf: perf script text (a file, or "-": standard input) or
    a perf.data (perf script runs on it). The running kernel's _text: --kallsyms,
    --text-base, else perf's kernel map line (--show-mmap-events, which is asked
    of perf for a perf.data), else the link address (KASLR off)."""
    from kbuild_bolt.profile import perf
    from kbuild_bolt.profile.thunks import thunk_ranges

    text_base = None
    if args.kallsyms:
        text_base = perf.text_base_from_kallsyms(args.kallsyms)
    elif args.text_base:
        try:
            text_base = int(args.text_base, 16)
        except ValueError:
            raise KbbError(f"--text-base {args.text_base}: not a hex address") from None
    vmlinux_text = model.image.symbols.address("_text") or 0
    thunks = thunk_ranges(model.image)
    if perf.is_perf_data(head):
        if args.input == "-":
            raise KbbError("a perf.data on standard input: give its path (perf script runs on it)")
        reader = perf.read_perf_data(args.input, text_base, vmlinux_text, thunks)
    else:
        name = "standard input" if args.input == "-" else args.input
        reader = perf.PerfScriptReader(text_base, vmlinux_text, thunks=thunks, name=name)
        if args.input == "-":
            reader.feed(sys.stdin.buffer)
        else:
            with open(args.input, "rb") as f:
                reader.feed(f)
    modules_note = _place_perf_modules(args, reader)
    profile = reader.profile()
    if modules_note:
        from kbuild_bolt.profile.modules import describe_modules

        in_modules = describe_modules(profile)
        print(f"perf: modules: {modules_note}" + (f"; {in_modules}" if in_modules else "")
              + (f"; {reader.module_code_dropped:,} counts in modules not placed left out"
                 if reader.module_code_dropped else ""), file=sys.stderr)
    where = {"given": "from --kallsyms" if args.kallsyms else "from --text-base",
             "perf": "from perf's kernel map"}.get(reader.text_base_from)
    kaslr = (f"running _text {reader.text_base:#x} ({where}), KASLR offset "
             f"{reader.text_base - vmlinux_text:#x}" if where else
             "no running _text (--text-base, --kallsyms or perf script --show-mmap-events): "
             "the kernel is taken to have run at its link address")
    read = (f"{reader.records:,} branch records" if reader.lbr
            else f"{reader.samples:,} samples")
    print(f"perf: {read}; {kaslr}", file=sys.stderr)
    if not where:
        # Nothing said where the kernel ran: the link address is a guess, checked
        # (under KASLR the counts would land on the wrong code).
        from kbuild_bolt.profile.attach import attach

        matched = attach(model, profile).matched if profile.total else 0.0
        if matched < 0.5:
            raise KbbError(f"only {100 * matched:.1f}% of the perf counts fall on this "
                           "vmlinux's code at its link address (KASLR?): give --kallsyms (a "
                           "/proc/kallsyms saved where perf ran), --text-base, or the perf.data")
    from kbuild_bolt.profile.modules import vmlinux_code_spans, without_other_code

    profile, other = without_other_code(profile, vmlinux_code_spans(model.image))
    if other:
        print(f"perf: {other:,} counts in code that is neither vmlinux's nor a placed "
              "module's left out", file=sys.stderr)
    return profile


def _add_module_shapes(profile, tree) -> None:
    """The shapes of the module functions the profile saw, from the .ko files
    (what lets the profile apply to rebuilt modules)."""
    if tree and profile.module_sections:
        from kbuild_bolt.rewrite.module import module_shapes

        profile.shapes.update(module_shapes(profile, tree))


def _place_perf_modules(args, reader) -> str:
    """Where the modules' code sections were in the run perf recorded: a saved
    list of them (--module-sections), else each module's text start (perf's
    module maps, or a saved /proc/modules) laid out as the loader does from the
    .ko files (--modules). What was used, for the summary ("": no modules)."""
    from kbuild_bolt.profile import modules as mods

    if args.module_sections:
        reader.modules = mods.read_module_sections(args.module_sections)
        sized = mods.add_sizes(reader.modules, args.modules) if args.modules else 0
        return (f"{len(set(reader.modules.module))} from {args.module_sections}"
                f" ({sized} of {len(reader.modules)} sections sized from {args.modules})"
                if args.modules else
                f"{len(set(reader.modules.module))} from {args.module_sections} (no --modules: "
                "each section reaches the next one)")
    bases = (mods.read_proc_modules(args.proc_modules) if args.proc_modules
             else reader.module_bases)
    if not bases:
        return ""
    source = args.proc_modules or "perf's module maps"
    if not args.modules:
        return (f"{len(bases)} in {source}, their code left out (--modules DIR, the .ko "
                "files, places it)")
    reader.modules, missing = mods.from_text_bases(bases, args.modules)
    return (f"{len(bases) - len(missing)} of {len(bases)} in {source} laid out from "
            f"{args.modules}" + (f" (no .ko for {', '.join(sorted(missing)[:5])})"
                                 if missing else ""))


def cmd_profile(args) -> int:
    from kbuild_bolt.profile.model import write_profile
    from kbuild_bolt.profile.model import combine

    log = (lambda m: print(f"  PROFILE {m}", file=sys.stderr, flush=True))
    if getattr(args, "modules", None):      # (before any work: a typo fails at once)
        from kbuild_bolt.profile.modules import module_tree

        module_tree(args.modules)
    if args.profile_command == "record":
        from kbuild_bolt.qemu.runner import kernel_entry
        from kbuild_bolt.profile import qemu
        from kbuild_bolt.profile.stale import describe_build

        vmlinux = args.vmlinux or (args.kernel if kernel_entry(args.kernel) == "pvh" else None)
        if vmlinux is None:
            raise KbbError("--vmlinux is needed with a bzImage (to map the profile to code)")
        if args.initrd is None and not args.drive:
            raise KbbError("profile record needs --initrd and/or --drive")
        kaslr_note = None
        if args.workload is not None:        # the lab /init's workload
            if args.with_boot:
                profile = qemu.record_boot(args.kernel, args.initrd, args.workload,
                                           _iterations(args.iterations)[1],
                                           kaslr=not args.nokaslr, vmlinux=vmlinux)
            else:
                profile = qemu.record(args.kernel, args.initrd, args.workload,
                                      _iterations(args.iterations), kaslr=not args.nokaslr,
                                      log=log, vmlinux=vmlinux, smp=args.smp,
                                      modules_tree=args.modules)
        else:                                 # any guest
            profile, recording = qemu.record_guest(
                args.kernel, vmlinux=vmlinux, initrd=args.initrd, drives=args.drive or (),
                append=args.append or "", qemu_args=args.qemu_arg or [],
                start=args.start_marker, stop=args.stop_marker, kaslr=not args.nokaslr,
                smp=args.smp, memory=args.memory, timeout=args.timeout,
                modules_tree=args.modules)
            profile.source = "qemu:guest"
            kaslr_note = (f"KASLR on, offset {recording.kaslr_offset:#x} found from the code"
                          if recording.boot.kaslr else
                          "KASLR off" + ("" if not args.nokaslr else " (--nokaslr)"))
            log(f"recorded the {recording.cutoff}, {recording.boot.seconds:.0f} s; {kaslr_note}")
            if recording.modules is not None and len(recording.modules):
                mods = recording.modules
                log(f"modules: {len(set(mods.module))} listed by the guest, "
                    f"{len(mods)} code sections"
                    + (f", {mods.sized} sized from {args.modules}" if args.modules else
                       " (no --modules: each section reaches the next one)"))
            if recording.other_code:
                log(f"{recording.other_code:,} executions of code that is neither vmlinux's "
                    "nor a listed module's left out")
        model, cfg = _model_and_cfg(vmlinux)
        profile.kernel = model.version.release
        describe_build(profile, model, cfg)
        _add_module_shapes(profile, args.modules)
        from kbuild_bolt.profile.attach import attach
        matched = attach(model, profile).matched
        write_profile(profile, args.output)
        from kbuild_bolt.profile.modules import describe_modules

        in_modules = describe_modules(profile)
        print(f"profile: {len(profile.range_start):,} ranges, {len(profile.src):,} transfers, "
              f"{profile.total:,} executions of kernel blocks"
              f"{f'; {in_modules}; of the rest' if in_modules else ','} {100 * matched:.2f}% "
              f"on {vmlinux}'s code{f' ({kaslr_note})' if kaslr_note else ''} -> {args.output}")
        return 0
    if args.profile_command == "convert":
        from kbuild_bolt.profile import fdata, perf
        from kbuild_bolt.profile.formats import load_profile
        from kbuild_bolt.profile.model import MAGIC, read_profile

        model, cfg = _model_and_cfg(args.vmlinux)
        if args.input == "-":                     # perf script ... | kbuild-bolt profile convert -
            head = sys.stdin.buffer.peek(4096)[:4096]
        else:
            try:
                with open(args.input, "rb") as f:
                    head = f.read(4096)
            except OSError as err:
                raise KbbError(f"{args.input}: {err.strerror}") from None
        if args.input != "-" and head.startswith(MAGIC.encode()):
            profile = read_profile(args.input)
        elif args.input == "-" or perf.is_perf_data(head) or (perf.looks_like(head)
                                                              and not fdata.looks_like(head)):
            profile = _convert_perf(args, model, head)
        else:
            profile = load_profile(args.input, model)
        profile.kernel = model.version.release
        if args.to == "fdata":
            lines = fdata.write_fdata(profile, model, args.output)
            print(f"fdata: {lines:,} lines -> {args.output}")
            return 0
        from kbuild_bolt.profile.stale import describe_build
        if not profile.shapes:
            describe_build(profile, model, cfg)
            _add_module_shapes(profile, args.modules)
        write_profile(profile, args.output)
        print(f"profile: {len(profile.range_start):,} ranges, {len(profile.src):,} transfers "
              f"-> {args.output}")
        return 0
    if args.profile_command == "merge":
        from kbuild_bolt.profile.model import read_profile
        # One profile read at a time and folded into the sum: a fleet's hundreds
        # of profiles merge in the memory of a few.
        merged = combine(read_profile(p) for p in args.inputs)
        write_profile(merged, args.output)
        print(f"profile: {len(args.inputs)} merged ({len(merged.range_start):,} ranges, "
              f"{len(merged.src):,} transfers) -> {args.output}")
        return 0
    if args.profile_command == "modules":
        from kbuild_bolt.profile.model import MAGIC, read_profile

        # (only kbuild-bolt's own profiles keep module code: .fdata and perf
        # script text name vmlinux's functions and addresses only)
        try:
            with open(args.profile, "rb") as f:
                own = f.read(len(MAGIC)) == MAGIC.encode()
        except OSError as err:
            raise KbbError(f"{args.profile}: {err.strerror}") from None
        if own:
            totals = read_profile(args.profile).module_totals()
            for name in sorted(m for m, n in totals.items() if n > 0):
                print(name)
        return 0
    if args.profile_command == "show":
        from kbuild_bolt.profile.formats import resolve_profile
        from kbuild_bolt.profile.attach import attach

        from kbuild_bolt.profile.formats import load_profile

        model, cfg = _model_and_cfg(args.vmlinux)
        raw = load_profile(args.profile, model)
        profile = resolve_profile(raw, model, cfg, log=log)
        cp = attach(model, profile)
        counts = cp.block_counts(cfg)
        per_function = np.bincount(cfg.block_func, weights=counts * 1.0,
                                   minlength=len(model.functions))
        print(f"{args.profile}: {profile.total:,} counts, {100 * cp.matched:.2f}% on this "
              f"kernel's code, {int((per_function > 0).sum()):,} functions ran")
        _show_modules(raw)
        for row in np.argsort(-per_function)[:args.top].tolist():
            if per_function[row] <= 0:
                break
            print(f"  {int(per_function[row]):>14,}  {model.functions.names[row]}")
        from kbuild_bolt.profile.attach import indirect_calls

        sites = indirect_calls(model, cp).by_site()
        if sites:
            total = sum(n for _, n, _ in sites)
            print(f"indirect calls: {total:,} at {len(sites):,} sites (through a register, "
                  f"memory or a retpoline thunk); hottest, with their most frequent target:")
            for site, n, targets in sites[:args.top]:
                target, hits = targets[0]
                print(f"  {n:>14,}  {model.symbolize(int(model.insns.addr[site]))} -> "
                      f"{model.symbolize(int(target))} ({100 * hits / n:.0f}%, "
                      f"{len(targets)} target{'s' if len(targets) > 1 else ''})")
        from kbuild_bolt.profile.footprint import footprint, format_footprint

        print("code footprint:")
        print("  " + format_footprint(footprint(model, profile)).replace("\n", "\n  "))
        return 0
    raise KbbError(f"unknown profile action {args.profile_command}")


def _show_modules(raw) -> None:
    """``profile show``'s lines about module code: each module, its share of the
    run and its sections."""
    from kbuild_bolt.profile.modules import module_shares

    if not raw.module_sections:
        return
    what, share, shares = module_shares(raw)
    counts = raw.module_totals()
    print(f"modules: {100 * share:.1f}% of the {what} in {len(shares)} modules")
    for module, part in shares.items():
        sections = [s for m, s in raw.module_sections if m == module]
        print(f"  {100 * part:>6.1f}%  {module:<20} {counts.get(module, 0):>14,} block "
              f"executions  ({', '.join(sections)})")


def cmd_dyno(args) -> int:
    from kbuild_bolt.layout.exttsp import ProfileLayout
    from kbuild_bolt.profile.formats import resolve_profile
    from kbuild_bolt.profile.dyno import (MemoryCounter, dyno_stats, format_comparison,
                                          mostly_jumping, whole_run_taken)

    model, cfg = _model_and_cfg(args.vmlinux)
    profile = resolve_profile(args.profile, model, cfg)
    layout = ProfileLayout(model, cfg, profile)
    memory = MemoryCounter(model)
    before = dyno_stats(model, cfg, layout.profile, memory=memory)
    orders = {}
    for row in sorted(layout.hot_rows):
        if row >= 0 and cfg.func_reason[row] == 0:
            orders[row] = layout.order(row, list(cfg.blocks_of(row)))
    reverse = mostly_jumping(model, layout.profile)
    after = dyno_stats(model, cfg, layout.profile, orders=orders, memory=memory,
                       reverse_sites=False if reverse is None else reverse)
    print(format_comparison(before, after, "as built", "ext-tsp (predicted)",
                            whole_run=whole_run_taken(model, layout.profile, before, after)))
    return 0


# ---------------------------------------------------------------------------
# boot


def cmd_boot(args) -> int:
    from kbuild_bolt.qemu.runner import boot

    initrd = args.initrd
    guest = args.expect is not None or bool(args.drive)
    if guest and initrd is None and not args.drive:
        raise KbbError("--expect boots your own guest: give --initrd and/or --drive")
    if initrd is None and not guest:
        from kbuild_bolt.lab.initramfs import build_lab_initramfs
        import tempfile

        tmpdir = tempfile.mkdtemp(prefix="kbuild-bolt-boot-")
        initrd = os.path.join(tmpdir, "initramfs.cpio.gz")
        modules = tuple(args.load or ())
        if modules and not args.modules:
            raise KbbError("--load needs --modules (an INSTALL_MOD_PATH with lib/modules/<release>)")
        release = None
        if args.modules:
            root = os.path.join(args.modules, "lib/modules")
            releases = sorted(os.listdir(root)) if os.path.isdir(root) else []
            if len(releases) != 1:
                raise KbbError(f"{args.modules}: expected exactly one lib/modules/<release>")
            release = releases[0]
        build_lab_initramfs(initrd, modules_root=args.modules, release=release, modules=modules)
    echo = (lambda line: print(line, file=sys.stderr)) if args.verbose else None
    result = boot(args.kernel, initrd, workload=args.workload, iterations=args.iterations,
                  kaslr=not args.nokaslr, timeout=args.timeout, append=args.append or "",
                  memory=args.memory, smp=args.smp, log=args.log, echo=echo, lab=not guest,
                  expect_text=args.expect, drives=args.drive or (),
                  extra_qemu=args.qemu_arg or [])
    if args.json:
        _print_json(result.to_json())
    else:
        print(result.summary())
    return 0 if result.ok else 1


# ---------------------------------------------------------------------------
# lab


def cmd_lab(args) -> int:
    from kbuild_bolt.lab.kernels import FLAVORS, lab_kernel

    if args.lab_command == "demo":
        return lab_demo(args)
    if args.lab_command == "list":
        for name in FLAVORS:
            try:
                kernel = lab_kernel(name, build=False)
                state = f"built: {kernel.root}"
            except KbbError as err:
                state = str(err)
            print(f"{name:<16} {state}")
        return 0
    names = list(FLAVORS) if args.flavor == ["all"] else args.flavor
    for name in names:
        kernel = lab_kernel(name, build=args.lab_command == "build")
        if args.json:
            _print_json({
                "name": kernel.name, "release": kernel.release, "root": str(kernel.root),
                "vmlinux": str(kernel.vmlinux), "bzImage": str(kernel.bzimage),
                "initramfs": str(kernel.initramfs), "modules": str(kernel.modules_root),
                "system_map": str(kernel.system_map),
            })
        else:
            print(f"{kernel.name}: {kernel.release}")
            print(f"  vmlinux (with relocations) {kernel.vmlinux}")
            print(f"  bzImage                    {kernel.bzimage}")
            print(f"  initramfs                  {kernel.initramfs}")
            print(f"  modules                    {kernel.modules_root}")
    return 0


def lab_demo(args) -> int:
    """The main job on a lab kernel: build → profile → rewrite (whole-kernel layout) →
    boot → dyno-stats, taken branches and code footprint measured."""
    import tempfile

    from kbuild_bolt.kbuild.bzimage import rebuild_bzimage
    from kbuild_bolt.analysis.inventory import describe, format_text
    from kbuild_bolt.kernel.vmlinux import open_vmlinux
    from kbuild_bolt.lab.kernels import lab_kernel
    from kbuild_bolt.qemu.runner import boot
    from kbuild_bolt.profile import qemu
    from kbuild_bolt.profile.model import write_profile
    from kbuild_bolt.profile.attach import attach
    from kbuild_bolt.profile.dyno import measured_taken_branches
    from kbuild_bolt.profile.footprint import footprint
    from kbuild_bolt.rewrite.engine import RewriteOptions, rewrite

    def step(text):
        print(f"\n== {text}", flush=True)

    kernel = lab_kernel(args.flavor)
    workdir = args.workdir or tempfile.mkdtemp(prefix="kbuild-bolt-demo-")
    os.makedirs(workdir, exist_ok=True)
    step(f"{kernel.name}: {kernel.vmlinux}")
    with open_vmlinux(kernel.vmlinux) as image:
        print(format_text(describe(image)))
    failed = False
    step(f"boot the kernel as built ({kernel.bzimage.name}, KASLR on)")
    result = boot(kernel.bzimage, kernel.initramfs, workload="files", kaslr=True, iterations=3)
    print(result.summary())
    failed |= not result.ok
    for workload in args.workload or ("files",):
        step(f"profile the {workload} workload under QEMU (exact, its loop only, KASLR on)")
        profile = qemu.record(kernel.bzimage, kernel.initramfs, workload=workload, kaslr=True,
                              vmlinux=kernel.vmlinux,
                              log=lambda m: print(f"  {m}", flush=True))
        path = os.path.join(workdir, f"{workload}.kbb")
        write_profile(profile, path)
        print(f"  {len(profile.src):,} transfers, {profile.total:,} block executions -> {path}")
        step("rewrite as make CONFIG_BOLT=y does with a profile: blocks by ext-TSP, functions "
             "by cdsort, the blocks that never ran split off (verified before it is written)")
        out = os.path.join(workdir, f"vmlinux.{workload}")
        res = rewrite(kernel.vmlinux, out, RewriteOptions(
            reorder_blocks="ext-tsp", reorder_functions="cdsort", split_functions=True,
            profile=profile, dyno_stats=True))
        print(res.summary())
        bzimage = rebuild_bzimage(kernel.build_dir, out, os.path.join(workdir,
                                                                      f"bzImage.{workload}"))
        step(f"boot the optimized kernel ({bzimage}, KASLR on and off)")
        for kaslr in (True, False):
            result = boot(bzimage, kernel.initramfs, workload=workload, kaslr=kaslr,
                          iterations=3)
            print(result.summary())
            failed |= not result.ok
        step("measure: the same workload profiled on the optimized kernel")
        from kbuild_bolt.binary.model import BinaryModel
        model = BinaryModel.open(kernel.vmlinux)
        before = measured_taken_branches(model, attach(model, profile))
        before.update(footprint(model, profile))
        after_profile = qemu.record(out, kernel.initramfs, workload=workload, kaslr=False)
        model = BinaryModel.open(out)
        after = measured_taken_branches(model, attach(model, after_profile))
        after.update(footprint(model, after_profile))
        cut = 100 * (1 - after["taken_branches"] / max(1, before["taken_branches"]))
        predicted = res.predicted_taken_change()
        print(f"  taken jmp/jcc in the {workload} workload: {before['taken_branches']:,} -> "
              f"{after['taken_branches']:,} ({cut:.1f}% fewer, measured"
              + (f"; {-100 * predicted:.1f}% predicted" if predicted is not None else "") + ")")
        for key, what in (("pages99", "4-KiB pages holding 99% of instruction fetches"),
                          ("lines90", "64-byte lines holding 90% of instruction fetches")):
            print(f"  {what}: {before[key]:,} -> {after[key]:,} "
                  f"({after[key] / max(1, before[key]):.2f}x)")
        if before.get("l1i_mpki") and after.get("l1i_mpki"):
            print(f"  L1i misses per 1000 instructions (simulated 32 KiB 8-way): "
                  f"{before['l1i_mpki']:.2f} -> {after['l1i_mpki']:.2f} "
                  f"({after['l1i_mpki'] / before['l1i_mpki']:.2f}x)")
    return 1 if failed else 0


# ---------------------------------------------------------------------------


def add_guest_arguments(p, expect: bool = False) -> None:
    """A guest of the user's: disk images and QEMU arguments; ``expect``: its boot
    is judged by a console line of the user's choosing."""
    if expect:
        p.add_argument("--expect", metavar="TEXT",
                       help="your own guest (--initrd/--drive, no lab /init): a boot is good "
                            "when a console line contains TEXT and no kernel problem appears")
    p.add_argument("--drive", action="append", metavar="IMAGE",
                   help="disk image (raw or qcow2) as a virtio disk, /dev/vda first "
                        "(repeatable); implies your own guest")
    p.add_argument("--qemu-arg", action="append", metavar="ARG",
                   help="one more QEMU argument (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbuild-bolt",
        description="Post-link optimizer for the Linux kernel: lays vmlinux code out again "
                    "from a profile and keeps every kernel table consistent.",
    )
    parser.add_argument("--version", action="version", version=f"kbuild-bolt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="what a vmlinux holds: version, relocations, functions, tables",
                       description="Report a vmlinux's kernel version, relocations, function "
                                   "counts and kernel patch tables.")
    p.add_argument("vmlinux", help="an x86-64 vmlinux (ELF)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-analysis", action="store_true",
                   help="skip decoding (no CFG, function states or table cross-check)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("dump", help="kernel tables and functions: entries, disassembly, CFG",
                       description="Dump kernel patch tables (symbolized entries, cross-check "
                                   "results) and functions (disassembly with basic blocks, "
                                   "successors and table annotations). With neither --table "
                                   "nor --function: a summary of every table.")
    p.add_argument("vmlinux")
    p.add_argument("--table", action="append", metavar="NAME",
                   help="dump this table's entries (repeatable; 'all' for every table)")
    p.add_argument("--function", action="append", metavar="NAME",
                   help="dump this function (repeatable)")
    p.add_argument("--limit", type=int, help="at most this many entries per table")
    p.add_argument("--json", action="store_true", help="stable JSON (docs/json.md)")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("rewrite", help="lay out vmlinux code again and update every table",
                       description="Reorder the basic blocks of every function that can be "
                                   "rewritten safely, inside its own address range, and update "
                                   "every relocation and kernel table; the output is verified "
                                   "and written atomically.")
    p.add_argument("vmlinux", help="vmlinux with relocations (--emit-relocs), or a module "
                                   "(.ko: docs/modules.md)")
    p.add_argument("-o", "--output", required=True, help="where to write the new vmlinux")
    add_rewrite_arguments(p)
    p.add_argument("--dyno-stats", action="store_true",
                   help="print BOLT's dyno-stats before and after (needs --profile)")
    p.add_argument("--leave-as-is", action="store_true",
                   help="a module the profile holds no code of, or one with debug info, is "
                        "left as it is, with a line saying why, instead of an error (the "
                        "Kbuild module pass)")
    p.add_argument("--sign-key", metavar="KEY",
                   help="a module: sign the new one with KEY (as modules_install does: "
                        "PEM, e.g. the kernel tree's certs/signing_key.pem)")
    p.add_argument("--sign-cert", metavar="CERT",
                   help="the certificate of --sign-key (default: in the key file)")
    p.add_argument("--sign-hash", default="sha256",
                   help="the hash of the signature (CONFIG_MODULE_SIG_HASH; default sha256)")
    p.add_argument("--sign-file", default="sign-file", metavar="PATH",
                   help="the kernel tree's scripts/sign-file (default: sign-file on PATH)")
    p.add_argument("--report", metavar="FILE.html",
                   help="also write an HTML page of the layout (heatmaps, hot footprint, "
                        "dyno-stats, hot functions' blocks, what was left alone; needs "
                        "--profile, implies --dyno-stats with ext-tsp)")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("report", help="an HTML page of a layout: heatmaps, footprint, "
                                      "dyno-stats, hot functions",
                       description="Write one self-contained HTML page (no network) about "
                                   "the layout the given rewrite options make of VMLINUX for "
                                   "the profile: heatmaps of .text before and after, hot "
                                   "footprint curves, dyno-stats, the hottest functions' "
                                   "block layouts, what is left alone and why. The layout is "
                                   "analysed again (give the options of the rewrite; those "
                                   "that do not change the layout are ignored); nothing "
                                   "but the page is written. With --optimized, the rewritten "
                                   "vmlinux is verified against VMLINUX; with --reprofile, a "
                                   "profile recorded on it gives the measured figures.")
    p.add_argument("vmlinux", help="the vmlinux as built (with relocations)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.html",
                   help="where to write the page")
    p.add_argument("--optimized", metavar="VMLINUX",
                   help="the rewritten vmlinux (what rewrite wrote with these options)")
    p.add_argument("--reprofile", metavar="PROFILE",
                   help="a profile recorded on --optimized: the measured 'after'")
    p.add_argument("--top", type=int, default=20, metavar="N",
                   help="draw the block layouts of the N hottest functions (default 20)")
    add_rewrite_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("profile", help="record, convert, merge and show kernel profiles",
                       description="Profiles say where the kernel spends its time: recorded "
                                   "exactly under QEMU (no LBR needed), or converted from perf "
                                   "script output (LBR brstack or plain samples) and BOLT .fdata.")
    prof = p.add_subparsers(dest="profile_command", metavar="ACTION")
    prof.required = True
    q = prof.add_parser("record", help="boot a kernel under QEMU and record where it runs",
                        description="Boot a guest under QEMU (TCG) and record every kernel "
                                    "branch it executes, exactly: your own initramfs and/or "
                                    "disk images, the whole run until the guest powers off, or "
                                    "only between two console lines (--start-marker, "
                                    "--stop-marker). With --workload, the lab /init's "
                                    "workload (a lab initramfs).")
    q.add_argument("--kernel", required=True, help="bzImage or vmlinux (PVH) to boot")
    q.add_argument("--initrd", help="initramfs (your own, or a lab one with --workload)")
    add_guest_arguments(q)
    q.add_argument("--append", help="kernel command line (root=/dev/vda, init=..., ...)")
    q.add_argument("--start-marker", metavar="TEXT",
                   help="record from the first console line containing TEXT")
    q.add_argument("--stop-marker", metavar="TEXT",
                   help="... to the first line after it containing TEXT")
    q.add_argument("--smp", type=int, default=1, help="guest CPUs (default 1)")
    q.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    q.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before the VM is killed (default 1800)")
    q.add_argument("--vmlinux", help="the vmlinux of --kernel (default: --kernel itself)")
    q.add_argument("--workload", help="the lab /init's workload: files, server, or disk "
                                      "(ext4 and loop modules: the 6.12-modules lab kernel)")
    q.add_argument("--iterations", default="2,12",
                   help="with --workload: iterations (N, or SHORT,LONG: LONG - SHORT)")
    q.add_argument("--with-boot", action="store_true",
                   help="with --workload: one run, boot included")
    q.add_argument("--nokaslr", action="store_true", help="boot with nokaslr")
    q.add_argument("--modules", metavar="DIR",
                   help="the guest's modules (a tree of .ko files: INSTALL_MOD_PATH or "
                        "/lib/modules/RELEASE): their section sizes, for the module code "
                        "the guest's console places (grep . /sys/module/*/sections/.*text*)")
    q.add_argument("-o", "--output", required=True)
    q = prof.add_parser("convert",
                        help="perf.data, perf script / .fdata to kbuild-bolt, or to .fdata",
                        description="Convert a perf.data (perf script runs on it, streaming), "
                                    "perf script text (-F pid,ip,brstack with LBR, or -F pid,ip "
                                    "samples; - reads standard input) or BOLT .fdata. With KASLR "
                                    "the running _text comes from --text-base, --kallsyms, or "
                                    "the kernel map perf prints (--show-mmap-events: asked "
                                    "of perf for a perf.data).")
    q.add_argument("input", help="perf.data, perf script text (- for standard input), .fdata "
                                 "or a kbuild-bolt profile")
    q.add_argument("--vmlinux", required=True)
    q.add_argument("--text-base", help="the running kernel's _text (hex) for perf data (KASLR)")
    q.add_argument("--kallsyms", help="a saved /proc/kallsyms of the running kernel (KASLR)")
    q.add_argument("--modules", metavar="DIR",
                   help="the modules that ran (a tree of .ko files: INSTALL_MOD_PATH or "
                        "/lib/modules/RELEASE): module code kept as (module, section, offset), "
                        "placed by perf's module maps or --proc-modules")
    q.add_argument("--proc-modules", metavar="FILE",
                   help="a /proc/modules saved (as root) where perf ran")
    q.add_argument("--module-sections", metavar="FILE",
                   help="the module sections saved where perf ran "
                        "(grep . /sys/module/*/sections/.*text* > FILE)")
    q.add_argument("--to", choices=("kbb", "fdata"), default="kbb")
    q.add_argument("-o", "--output", required=True)
    q = prof.add_parser("merge", help="sum several kbuild-bolt profiles (read one at a time)")
    q.add_argument("inputs", nargs="+")
    q.add_argument("-o", "--output", required=True)
    q = prof.add_parser("modules", help="the modules whose code a profile saw, one name a "
                                        "line (what the Kbuild module pass lays out)")
    q.add_argument("profile")
    q = prof.add_parser("show", help="what a profile covers on a vmlinux, hottest functions")
    q.add_argument("profile")
    q.add_argument("--vmlinux", required=True)
    q.add_argument("--top", type=int, default=20)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("dyno", help="BOLT's dyno-stats of a vmlinux for a profile",
                       description="Dyno-stats (executed/taken branches, calls, instructions, "
                                   "loads, stores) as built and as ext-TSP would lay it out.")
    p.add_argument("vmlinux")
    p.add_argument("--profile", required=True)
    p.set_defaults(func=cmd_dyno)

    p = sub.add_parser("bisect", help="find the rewritten functions that break a kernel",
                       description="Rewrite with the given options and boot the result in QEMU; "
                                   "if it fails or warns, rewrite subsets of the functions and "
                                   "boot them until the smallest failing set is found. Exit "
                                   "status 1 when culprits were found, 0 when the full rewrite "
                                   "boots clean.")
    p.add_argument("vmlinux", help="vmlinux with relocations (boots through its PVH entry)")
    p.add_argument("--initrd", help="initramfs to boot with (a lab initramfs, or your own with "
                                    "--expect)")
    add_rewrite_arguments(p)
    add_guest_arguments(p, expect=True)
    p.add_argument("--append", help="more kernel command line")
    p.add_argument("--workload", default="files", help="lab workload to run at each boot")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--memory", default="512M")
    p.set_defaults(func=cmd_bisect)

    p = sub.add_parser("bzimage", help="rebuild bzImage for a rewritten vmlinux",
                       description="Replay the kernel build's own commands (vmlinux.relocs, "
                                   "compression, decompressor, setup) for a new vmlinux, in a "
                                   "scratch directory: the build tree is not modified.")
    p.add_argument("vmlinux", help="the (rewritten) vmlinux, with its relocations")
    p.add_argument("--build-dir", required=True, help="the kernel build tree (O=) it came from")
    p.add_argument("-o", "--output", required=True, help="where to write the bzImage")
    p.set_defaults(func=cmd_bzimage)

    p = sub.add_parser("verify", help="check a rewritten vmlinux (tables, relocations, headers)",
                       description="Check every kernel table against the code and every "
                                   "relocation against its bytes; with --against, also that "
                                   "headers, symbols and unchanged bytes match the input.")
    p.add_argument("vmlinux")
    p.add_argument("--against", metavar="VMLINUX", help="the input it was rewritten from")
    p.add_argument("--debug", action="store_true",
                   help="check the DWARF instead: at the new address of each moved instruction, "
                        "the inline chain (llvm-symbolizer), the call-frame rules "
                        "(.debug_frame), the scopes and the location expressions equal "
                        "the input's at the old one, and llvm-dwarfdump --verify finds no "
                        "error the input does not have")
    p.add_argument("--address-map", metavar="MAP", help="what rewrite --address-map wrote")
    p.add_argument("--sample", type=int, default=20000,
                   help="check this many moved instructions (0: all)")
    p.add_argument("--seed", type=int, default=0, help="which sample")
    p.add_argument("--no-dwarfdump", dest="dwarfdump", action="store_false",
                   help="skip llvm-dwarfdump --verify (it reads the whole files)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("install-hooks", help="patch a kernel tree for make CONFIG_BOLT=y",
                       description="Apply kbuild-bolt's Kbuild patch (Kconfig.bolt, "
                                   "Makefile.bolt) for the tree's version (6.12 or 6.1).")
    p.add_argument("tree", help="kernel source tree")
    p.set_defaults(func=cmd_install_hooks)

    p = sub.add_parser("check-modules", help="do these modules load on this vmlinux?",
                       description="Check every module's vermagic and every imported symbol's "
                                   "CRC against the vmlinux's exports (and Module.symvers), and "
                                   "run depmod with the System.map. Exit status 1 on a problem.")
    p.add_argument("vmlinux")
    p.add_argument("modules_dir", help="lib/modules/<release>, or an INSTALL_MOD_PATH")
    p.add_argument("--symvers", metavar="FILE", help="Module.symvers of the build")
    p.add_argument("--system-map", metavar="FILE", help="System.map for depmod")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_modules)

    p = sub.add_parser("repack-initramfs", help="put the optimized kernel's modules in an initramfs",
                       description="Replace the kernel modules (and depmod files) inside an "
                                   "initramfs; every other entry, an uncompressed early cpio in "
                                   "front and the compression method are kept.")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--modules", required=True, metavar="DIR",
                   help="lib/modules/<release>, or an INSTALL_MOD_PATH")
    p.set_defaults(func=cmd_repack_initramfs)

    p = sub.add_parser("boot", help="boot a kernel in QEMU (TCG) and check its console",
                       description="Boot a bzImage (KASLR on by default) or a vmlinux (PVH entry) "
                                   "in QEMU with an initramfs; report markers reached and every "
                                   "WARNING/BUG/Oops/panic/'missing return thunk' line. Exit "
                                   "status 1 when a marker is missing or a problem appears.")
    p.add_argument("kernel", help="bzImage or vmlinux")
    p.add_argument("--initrd", help="initramfs to boot with (default: a lab initramfs built now)")
    p.add_argument("--modules", help="with no --initrd: INSTALL_MOD_PATH whose modules go in")
    p.add_argument("--load", action="append", metavar="MODULE",
                   help="with no --initrd: module to modprobe at boot (repeatable)")
    p.add_argument("--workload", default="files",
                   help="lab workload: files, server, disk (6.12-modules) or none")
    p.add_argument("--iterations", type=int, help="workload iterations (lab /init default 20)")
    p.add_argument("--nokaslr", action="store_true", help="boot with nokaslr")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds before the VM is killed")
    p.add_argument("--append", help="more kernel command line")
    p.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    p.add_argument("--smp", type=int, default=2, help="guest CPUs (default 2)")
    add_guest_arguments(p, expect=True)
    p.add_argument("--log", help="write the serial console log here")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("-v", "--verbose", action="store_true", help="echo the console to stderr")
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("lab", help="the kernel lab: build and locate the test kernels",
                       description="Build (once, cached under ~/.cache/kbuild-bolt) and locate "
                                   "the lab kernels made from Debian's linux-source packages.")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    lab_sub.required = True
    q = lab_sub.add_parser("build", help="build lab kernels (cached)")
    q.add_argument("flavor", nargs="+", help="6.12-regular, 6.12-hardened, 6.1-regular or all")
    q.add_argument("--json", action="store_true")
    q = lab_sub.add_parser("path", help="print where a built lab kernel's files are")
    q.add_argument("flavor", nargs="+")
    q.add_argument("--json", action="store_true")
    lab_sub.add_parser("list", help="list lab kernels and whether they are built")
    q = lab_sub.add_parser("demo", help="the main job: build, profile, rewrite, boot, dyno-stats",
                           description="Build the lab kernel (cached), report what it holds, "
                                       "boot it, record an exact profile of a workload, rewrite "
                                       "it with ext-TSP, boot the result (KASLR on and off) and "
                                       "measure the taken branches again.")
    q.add_argument("flavor", nargs="?", default="6.12-regular")
    q.add_argument("--workload", action="append", default=None,
                   help="workload(s) to optimize for (default: files)")
    q.add_argument("--workdir", help="keep profiles and kernels here (default: a temp dir)")
    p.set_defaults(func=cmd_lab)
    return parser


def whole_lines(stream):
    """``stream``, set to write each printed line in one write(2).

    Under ``make -j`` many kbuild-bolt processes share one stdout and stderr.
    With PYTHONUNBUFFERED (set on CI and many build machines) print() makes
    two writes, the text and then its newline, so another process's line can
    land between them; a block-buffered stream cuts lines where its buffer
    fills. Line buffering without write-through keeps each line whole (pipes
    write up to PIPE_BUF bytes atomically). The stream is set in place: a new
    wrapper would close the file under it when collected."""
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        stream.reconfigure(line_buffering=True, write_through=False)
    return stream


def main(argv: list[str] | None = None) -> int:
    whole_lines(sys.stdout), whole_lines(sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    install_signal_handlers()
    try:
        return args.func(args)
    except KbbError as err:
        print(f"kbuild-bolt: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("kbuild-bolt: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as stop:
        print(f"kbuild-bolt: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("KBUILD_BOLT_DEBUG"):
            raise
        print(f"kbuild-bolt: internal error: {type(err).__name__}: {err} "
              "(set KBUILD_BOLT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3
