"""Abbreviations and the DIE walk of .debug_info: where every code address is.

One pass over every unit finds, without building DIEs, the fields that hold or
lead to code addresses:

- scopes: ``DW_AT_low_pc``/``DW_AT_high_pc`` pairs and ``DW_AT_ranges``;
- points: ``DW_AT_entry_pc``, ``DW_AT_call_return_pc``, ``DW_AT_call_pc``, a lone
  ``DW_AT_low_pc`` (labels; a DWARF 4 ``DW_TAG_GNU_call_site``'s is a return
  address);
- location lists (``DW_AT_location``, ``DW_AT_frame_base``... as section offsets)
  and their ``DW_AT_GNU_locviews``;
- expressions (exprloc), which may hold ``DW_OP_addr`` of code.

Abbreviations are compiled once per table into skip plans: a DIE whose
abbreviation holds none of these is stepped over in one addition when all its
forms have a fixed size.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from kbuild_bolt.dwarf.leb import DwarfError, skip_leb, sleb, u16, u32, uleb, unit_length

# forms
FORM_ADDR, FORM_BLOCK2, FORM_BLOCK4, FORM_DATA2, FORM_DATA4, FORM_DATA8 = 0x01, 0x03, 0x04, 0x05, 0x06, 0x07
FORM_STRING, FORM_BLOCK, FORM_BLOCK1, FORM_DATA1, FORM_FLAG, FORM_SDATA = 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d
FORM_STRP, FORM_UDATA, FORM_REF_ADDR, FORM_REF1, FORM_REF2, FORM_REF4 = 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13
FORM_REF8, FORM_REF_UDATA, FORM_INDIRECT, FORM_SEC_OFFSET, FORM_EXPRLOC = 0x14, 0x15, 0x16, 0x17, 0x18
FORM_FLAG_PRESENT, FORM_IMPLICIT_CONST = 0x19, 0x21

FIXED_SIZE = {
    FORM_ADDR: 8, FORM_DATA1: 1, FORM_DATA2: 2, FORM_DATA4: 4, FORM_DATA8: 8, FORM_FLAG: 1,
    FORM_STRP: 4, FORM_REF_ADDR: 4, FORM_REF1: 1, FORM_REF2: 2, FORM_REF4: 4, FORM_REF8: 8,
    FORM_SEC_OFFSET: 4, FORM_FLAG_PRESENT: 0, FORM_IMPLICIT_CONST: 0,
    0x1a: 4,    # strx (DWARF 5 forms, fixed ones)
    0x1b: 4, 0x1c: 4, 0x1d: 16, 0x1e: 16, 0x1f: 4, 0x20: 8,
    0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4, 0x29: 1, 0x2a: 2, 0x2b: 3, 0x2c: 4,
    0x1f02: 4, 0x1f20: 4, 0x1f21: 4,   # GNU_ref_alt, GNU_strp_alt
}
# variable-size forms: how the walk steps over them
V_STRING, V_LEB, V_BLOCK, V_BLOCK1, V_BLOCK2, V_BLOCK4 = -1, -2, -3, -4, -5, -6
VARIABLE = {FORM_STRING: V_STRING, FORM_SDATA: V_LEB, FORM_UDATA: V_LEB, FORM_REF_UDATA: V_LEB,
            0x1a: None, FORM_BLOCK: V_BLOCK, FORM_EXPRLOC: V_BLOCK, FORM_BLOCK1: V_BLOCK1,
            FORM_BLOCK2: V_BLOCK2, FORM_BLOCK4: V_BLOCK4, 0x22: V_LEB, 0x23: V_LEB,
            0x1f01: V_LEB, 0x1f03: V_LEB}
for _f in (0x1a,):
    VARIABLE.pop(_f)

# attributes
AT_SIBLING, AT_LOCATION, AT_LOW_PC, AT_HIGH_PC, AT_STMT_LIST = 0x01, 0x02, 0x11, 0x12, 0x10
AT_FRAME_BASE, AT_ENTRY_PC, AT_RANGES, AT_CALL_RETURN_PC, AT_CALL_VALUE = 0x40, 0x52, 0x55, 0x7d, 0x7e
AT_CALL_PC, AT_CALL_TARGET, AT_CALL_DATA_LOCATION, AT_CALL_DATA_VALUE = 0x81, 0x83, 0x85, 0x86
AT_GNU_CALL_SITE_VALUE, AT_GNU_CALL_SITE_DATA_VALUE = 0x2111, 0x2112
AT_GNU_CALL_SITE_TARGET, AT_GNU_CALL_SITE_TARGET_CLOBBERED = 0x2113, 0x2114
AT_GNU_LOCVIEWS, AT_GNU_ENTRY_VIEW = 0x2137, 0x2138
AT_RETURN_ADDR, AT_SEGMENT, AT_STATIC_LINK, AT_USE_LOCATION = 0x2a, 0x2e, 0x48, 0x4a
AT_VTABLE_ELEM_LOCATION, AT_DATA_MEMBER_LOCATION, AT_STRING_LENGTH = 0x4d, 0x38, 0x19
# A padding attribute of our own (vendor range): where DW_AT_high_pc becomes
# DW_AT_ranges, the bytes DW_AT_ranges does not need; consumers skip it by its form.
AT_KBB_PADDING = 0x3FB0

TAG_COMPILE_UNIT, TAG_PARTIAL_UNIT, TAG_GNU_CALL_SITE = 0x11, 0x3c, 0x4109

# attributes that may be a location list (a section offset) or an expression
LOCATION_ATTRS = {AT_LOCATION, AT_FRAME_BASE, AT_RETURN_ADDR, AT_SEGMENT, AT_STATIC_LINK,
                  AT_USE_LOCATION, AT_VTABLE_ELEM_LOCATION, AT_DATA_MEMBER_LOCATION,
                  AT_STRING_LENGTH}
EXPR_ATTRS = LOCATION_ATTRS | {AT_CALL_VALUE, AT_CALL_TARGET, AT_CALL_DATA_LOCATION,
                               AT_CALL_DATA_VALUE, AT_GNU_CALL_SITE_VALUE,
                               AT_GNU_CALL_SITE_DATA_VALUE, AT_GNU_CALL_SITE_TARGET,
                               AT_GNU_CALL_SITE_TARGET_CLOBBERED}
POINT_ATTRS = {AT_ENTRY_PC, AT_CALL_RETURN_PC, AT_CALL_PC}
INTERESTING = {AT_LOW_PC, AT_HIGH_PC, AT_RANGES, AT_STMT_LIST, AT_GNU_LOCVIEWS} | POINT_ATTRS | EXPR_ATTRS


@dataclass
class Abbrev:
    """One abbreviation's shape. GCC repeats the same declarations in every unit's
    table, so tables share these (a table maps its codes to shapes)."""

    tag: int
    children: bool
    specs: list            # [(attr, form, implicit_const)]
    plan: object           # int: fixed size; tuple: steps (no fields of interest)
    # With fields of interest: their offsets when every form has a fixed size (the
    # walk only notes where each such DIE's attributes start, and its code), else None.
    fixed: dict | None = None
    size: int = 0
    hits: object = None     # array('q') of attribute-start positions
    codes: object = None    # array('q'): the abbreviation code of each hit


def declarations(b, off: int):
    """(code, start, end, tag, children, specs) of every declaration of the table at ``off``."""
    p = off
    n = len(b)
    while True:
        if p >= n:
            raise DwarfError(f".debug_abbrev table at {off:#x} has no end")
        start = p
        code, p = uleb(b, p)
        if code == 0:
            return
        tag, p = uleb(b, p)
        children = bool(b[p])
        p += 1
        specs = []
        while True:
            at, p = uleb(b, p)
            form, p = uleb(b, p)
            const = None
            if form == FORM_IMPLICIT_CONST:
                const, p = sleb(b, p)
            if at == 0 and form == 0:
                break
            specs.append((at, form, const))
        yield code, start, p, tag, children, specs


def read_abbrevs(b, off: int, shapes: dict | None = None) -> tuple[dict[int, Abbrev], int]:
    """The abbreviation table at ``off`` (code -> shape; ``shapes``: the shapes
    seen so far, by declaration bytes) and where it ends."""
    if shapes is None:
        shapes = {}
    table = {}
    p = off
    n = len(b)
    while True:
        if p >= n:
            raise DwarfError(f".debug_abbrev table at {off:#x} has no end")
        code, p = uleb(b, p)
        if code == 0:
            return table, p
        body = p
        p = skip_leb(b, p)          # tag
        p += 1                      # children
        while True:
            at, p = uleb(b, p)
            form, p = uleb(b, p)
            if form == FORM_IMPLICIT_CONST:
                p = skip_leb(b, p)
            if at == 0 and form == 0:
                break
        key = bytes(b[body:p])
        shape = shapes.get(key)
        if shape is None:
            # (the declaration again, with code 1: parsed once per shape)
            _, _, _, tag, children, specs = next(declarations(b"\x01" + key, 0))
            shape = shapes[key] = _shape(tag, children, specs, off)
        table[code] = shape


def _shape(tag, children, specs, off) -> Abbrev:
    a = Abbrev(tag, children, specs, _plan(specs, off))
    if a.plan is None and all(f in FIXED_SIZE for _, f, _ in specs):
        a.fixed = {}
        o = 0
        for at, form, _ in specs:
            if at in INTERESTING:
                a.fixed.setdefault(at, (o, form))
            o += FIXED_SIZE[form]
        a.size = o
        a.hits = array("q")
        a.codes = array("q")
    return a

def _plan(specs, off):
    if any(at in INTERESTING for at, _, _ in specs):
        return None
    steps = []
    fixed = 0
    for at, form, _ in specs:
        size = FIXED_SIZE.get(form)
        if size is not None:
            fixed += size
            continue
        kind = VARIABLE.get(form)
        if kind is None:
            raise DwarfError(f".debug_abbrev table at {off:#x}: form {form:#x} is not supported")
        if fixed:
            steps.append(fixed)
            fixed = 0
        steps.append(kind)
    if fixed or not steps:
        steps.append(fixed)
    if len(steps) == 1 and steps[0] >= 0:
        return steps[0]
    return tuple(steps)


@dataclass
class Unit:
    offset: int
    end: int
    version: int
    abbrev_field: int       # position of debug_abbrev_offset in the header
    abbrev_offset: int
    base: int = 0           # the CU's DW_AT_low_pc (base of its lists)
    stmt_list_field: int = -1
    stmt_list: int = -1


def _q():
    return field(default_factory=lambda: array("q"))


@dataclass
class Found:
    """The fields the walk found (positions in .debug_info), as flat arrays."""

    units: list = field(default_factory=list)
    # scopes: unit, abbrev code, tag, low_pc field, high_pc field, high_pc form,
    # ranges field (-1 where absent)
    s_unit: array = _q()
    s_code: array = _q()
    s_tag: array = _q()
    s_low: array = _q()
    s_high: array = _q()
    s_high_form: array = _q()
    s_ranges: array = _q()
    # points: field position, 1 when the address is just past an instruction
    p_pos: array = _q()
    p_end: array = _q()
    # location lists: field position (-1: only views), unit, the DW_AT_GNU_locviews
    # field of the same DIE (-1: none)
    l_pos: array = _q()
    l_unit: array = _q()
    l_views: array = _q()
    # expressions: position, length
    e_pos: array = _q()
    e_len: array = _q()
    tables: dict = field(default_factory=dict)    # abbrev offset -> table
    table_ends: dict = field(default_factory=dict)

    def _add_fixed(self, shapes) -> None:
        """The DIEs of all-fixed abbreviations, from where their attributes start."""
        import numpy as np

        unit_starts = np.array([u.offset for u in self.units], np.int64)
        for a in shapes:
            if not a.hits:
                continue
            hits = np.frombuffer(a.hits, np.int64)
            codes = np.frombuffer(a.codes, np.int64)
            ui = np.searchsorted(unit_starts, hits, side="right") - 1
            k = len(hits)
            f = a.fixed
            low = f.get(AT_LOW_PC)
            low = low[0] if low and low[1] == FORM_ADDR else None
            high = f.get(AT_HIGH_PC)
            rng = f.get(AT_RANGES)
            if rng and rng[1] != FORM_SEC_OFFSET:
                raise DwarfError(f"DW_AT_ranges as form {rng[1]:#x} is not supported")
            if high or rng:
                self.s_unit.extend(ui.tolist())
                self.s_code.extend(codes.tolist())
                self.s_tag.extend([a.tag] * k)
                self.s_low.extend((hits + low).tolist() if low is not None else [-1] * k)
                self.s_high.extend((hits + high[0]).tolist() if high else [-1] * k)
                self.s_high_form.extend([high[1] if high else 0] * k)
                self.s_ranges.extend((hits + rng[0]).tolist() if rng else [-1] * k)
            elif low is not None:
                self.p_pos.extend((hits + low).tolist())
                self.p_end.extend([1 if a.tag == TAG_GNU_CALL_SITE else 0] * k)
            for at, (o, form) in f.items():
                if at in POINT_ATTRS and form == FORM_ADDR:
                    self.p_pos.extend((hits + o).tolist())
                    self.p_end.extend([1 if at == AT_CALL_RETURN_PC else 0] * k)
            views = f.get(AT_GNU_LOCVIEWS)
            locs = [o for at, (o, form) in f.items()
                    if at in LOCATION_ATTRS and form == FORM_SEC_OFFSET]
            for i, o in enumerate(locs):
                self.l_pos.extend((hits + o).tolist())
                self.l_unit.extend(ui.tolist())
                self.l_views.extend((hits + views[0]).tolist() if views and i == 0
                                    else [-1] * k)
            if views and not locs:
                self.l_pos.extend([-1] * k)
                self.l_unit.extend(ui.tolist())
                self.l_views.extend((hits + views[0]).tolist())
            a.hits = array("q")
            a.codes = array("q")


def walk(info, abbrev) -> Found:
    found = Found()
    p = 0
    n = len(info)
    tables: dict[int, dict] = {}
    shapes: dict[bytes, Abbrev] = {}
    while p < n:
        end, q = unit_length(info, p, ".debug_info unit")
        version = u16(info, q)
        if version not in (2, 3, 4, 5):
            raise DwarfError(f".debug_info unit at {p:#x}: version {version} is not supported")
        if version >= 5:
            unit_type = info[q + 2]
            if unit_type not in (1, 3):       # compile and partial units
                raise DwarfError(f".debug_info unit at {p:#x}: unit type {unit_type} is not supported")
            asize = info[q + 3]
            afield = q + 4
            first = q + 8
        elif version in (2, 3, 4):
            afield = q + 2
            asize = info[q + 6]
            first = q + 7
        else:
            raise DwarfError(f".debug_info unit at {p:#x}: version {version} is not supported")
        if asize != 8:
            raise DwarfError(f".debug_info unit at {p:#x}: address size {asize}, not 8")
        aoff = u32(info, afield)
        table = tables.get(aoff)
        if table is None:
            table, found.table_ends[aoff] = read_abbrevs(abbrev, aoff, shapes)
            tables[aoff] = table
        unit = Unit(p, end, version, afield, aoff)
        found.units.append(unit)
        _walk_unit(info, first, end, table, unit, len(found.units) - 1, found)
        p = end
    found.tables = tables
    found._add_fixed(shapes.values())
    return found


def _walk_unit(b, p, end, table, unit, ui, found) -> None:
    first_die = True
    s_unit, s_code, s_tag = found.s_unit, found.s_code, found.s_tag
    s_low, s_high, s_high_form, s_ranges = found.s_low, found.s_high, found.s_high_form, found.s_ranges
    p_pos, p_end = found.p_pos, found.p_end
    l_pos, l_unit, l_views = found.l_pos, found.l_unit, found.l_views
    e_pos, e_len = found.e_pos, found.e_len
    while p < end:
        die = p
        code = b[p]
        p += 1
        if code >= 0x80:
            code, p = uleb(b, die)
        if code == 0:
            continue
        a = table.get(code)
        if a is None:
            raise DwarfError(f".debug_info DIE at {die:#x}: abbreviation {code} is not in its table")
        plan = a.plan
        if plan.__class__ is int:
            p += plan
            continue
        if a.hits is not None and not first_die:
            a.hits.append(p)
            a.codes.append(code)
            p += a.size
            continue
        if plan is not None:
            for step in plan:
                if step >= 0:
                    p += step
                elif step == V_LEB:
                    p = skip_leb(b, p)
                elif step == V_STRING:
                    p = b.index(0, p) + 1
                elif step == V_BLOCK:
                    n, p = uleb(b, p)
                    p += n
                elif step == V_BLOCK1:
                    p += b[p] + 1
                elif step == V_BLOCK2:
                    p += u16(b, p) + 2
                else:
                    p += u32(b, p) + 4
            continue
        # a DIE with fields we look at: attribute by attribute
        low = high = ranges = views = -1
        high_form = 0
        low_value = None
        locs = []
        for at, form, _ in a.specs:
            pos = p
            size = FIXED_SIZE.get(form)
            if size is not None:
                p += size
            elif form == FORM_EXPRLOC or form == FORM_BLOCK:
                n, p = uleb(b, p)
                pos = p
                p += n
                if at in EXPR_ATTRS:
                    e_pos.append(pos)
                    e_len.append(n)
                continue
            elif form == FORM_BLOCK1:
                n = b[p]
                pos = p + 1
                p = pos + n
                if at in EXPR_ATTRS:
                    e_pos.append(pos)
                    e_len.append(n)
                continue
            elif form == FORM_UDATA or form == FORM_SDATA or form == FORM_REF_UDATA or form in (0x22, 0x23):
                p = skip_leb(b, p)
            elif form == FORM_STRING:
                p = b.index(0, p) + 1
            elif form == FORM_BLOCK2:
                p += u16(b, p) + 2
                continue
            elif form == FORM_BLOCK4:
                p += u32(b, p) + 4
                continue
            else:
                raise DwarfError(f".debug_info DIE at {die:#x}: form {form:#x} is not supported")
            if at == AT_LOW_PC and form == FORM_ADDR:
                low = pos
            elif at == AT_HIGH_PC:
                high, high_form = pos, form
            elif at == AT_RANGES:
                if form != FORM_SEC_OFFSET:
                    raise DwarfError(f".debug_info DIE at {die:#x}: DW_AT_ranges as form {form:#x} "
                                     "is not supported")
                ranges = pos
            elif at in POINT_ATTRS and form == FORM_ADDR:
                p_pos.append(pos)
                p_end.append(1 if at == AT_CALL_RETURN_PC else 0)
            elif at in LOCATION_ATTRS and form == FORM_SEC_OFFSET:
                locs.append(pos)
            elif at == AT_GNU_LOCVIEWS:
                views = pos
            elif at == AT_STMT_LIST:
                unit.stmt_list_field = pos
                unit.stmt_list = u32(b, pos)
        if first_die:
            first_die = False
            if a.tag in (TAG_COMPILE_UNIT, TAG_PARTIAL_UNIT) and low >= 0:
                low_value = int.from_bytes(b[low:low + 8], "little")
                unit.base = low_value
        for i, pos in enumerate(locs):
            l_pos.append(pos)
            l_unit.append(ui)
            l_views.append(views if i == 0 else -1)
        if views >= 0 and not locs:
            l_pos.append(-1)
            l_unit.append(ui)
            l_views.append(views)
        if high >= 0 or ranges >= 0:
            s_unit.append(ui)
            s_code.append(code)
            s_tag.append(a.tag)
            s_low.append(low)
            s_high.append(high)
            s_high_form.append(high_form)
            s_ranges.append(ranges)
        elif low >= 0:
            p_pos.append(low)
            p_end.append(1 if a.tag == TAG_GNU_CALL_SITE else 0)
