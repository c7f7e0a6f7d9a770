"""DWARF kept true: the emission seen as a CodeImage, and the debug sections
written again through it (kbuild_bolt.dwarf does the DWARF; this module only
knows where the rewrite put things)."""

from __future__ import annotations

import numpy as np

from kbuild_bolt.dwarf.image import INHERIT, LINEAR, POINT, CodeImage
from kbuild_bolt.rewrite.emit import COPY


def code_image(model, emission) -> CodeImage:
    """Old code -> new code for every rewritten function of ``emission``."""
    if not len(emission):
        return CodeImage.identity()
    # Rewritten: every function's old extent, and wherever new code went (a slot's
    # code may grow into the fill after it; cold parts go to free room).
    lo = emission.extent if emission.placed else emission.start
    spans = [np.stack([lo, emission.end], axis=1)]
    moved = emission.moved_ranges()
    spans.append(np.stack([moved[:, 0], np.maximum(moved[:, 1], moved[:, 2])], axis=1))
    rw = np.concatenate(spans).astype(np.uint64)
    rw = rw[np.argsort(rw[:, 0], kind="stable")]
    rw = _merge(rw)
    order = np.argsort(emission.item_addr, kind="stable")
    size = emission.item_size[order].astype(np.int64)
    keep = size > 0
    order, size = order[keep], size[keep]
    new_lo = emission.item_addr[order].astype(np.uint64)
    kind_e = emission.item_kind[order]
    origin = emission.item_origin[order]
    func = emission.item_func[order]
    copy = kind_e == COPY
    kind = np.where(copy, LINEAR, np.where(origin >= 0, POINT, INHERIT)).astype(np.int8)
    o = np.maximum(origin, 0)
    old_lo = np.where(copy, emission.item_base[order],
                      np.where(origin >= 0, model.insns.addr[o], 0)).astype(np.uint64)
    old_len = np.where(copy, size, np.where(origin >= 0, model.insns.length[o].astype(np.int64), 0))
    end = new_lo + size.astype(np.uint64)
    new_part = np.r_[True, (func[1:] != func[:-1]) | (new_lo[1:] != end[:-1])]
    part = np.cumsum(new_part) - 1
    return CodeImage(rw, new_lo, size, old_lo, old_len.astype(np.int64), kind, part)


def _merge(rw: np.ndarray) -> np.ndarray:
    if not len(rw):
        return rw
    out = [list(map(int, rw[0]))]
    for a, b in rw[1:].tolist():
        if a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return np.array(out, np.uint64)


def save_code_image(path, image: CodeImage) -> None:
    """The address map (old code -> new code) beside the output, for ``verify
    --debug`` and for tools that read a profile of the optimized kernel (BOLT's
    address translation plays this part)."""
    import io

    from kbuild_bolt.atomic import atomic_write

    buf = io.BytesIO()
    np.savez(buf, rewritten=image.rewritten, new_lo=image.new_lo, size=image.size,
             old_lo=image.old_lo, old_len=image.old_len, kind=image.kind, part=image.part)
    atomic_write(path, buf.getvalue())


def load_code_image(path) -> CodeImage:
    from kbuild_bolt.errors import KbbError

    try:
        z = np.load(path)
        return CodeImage(z["rewritten"], z["new_lo"], z["size"], z["old_lo"], z["old_len"],
                         z["kind"], z["part"])
    except (OSError, KeyError, ValueError) as e:
        raise KbbError(f"{path}: not an address map ({e})") from None
