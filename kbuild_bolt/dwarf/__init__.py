"""DWARF as GCC writes it for the kernel (versions 4 and 5), read and written
again for code that moved.

Each module knows one kind of section: ``info`` (abbreviations and the DIE walk
that finds every code address), ``lines`` (line programs), ``lists`` (range and
location lists, both versions), ``frame`` (.debug_frame), ``aranges``. They see
bytes and an :class:`~kbuild_bolt.dwarf.image.CodeImage` (where old code is
now), never the rewrite engine; ``update`` puts them together.
"""

# The debug sections a rewrite writes again (or empties) when code moved. (Here,
# not in ``update``: a rewrite without debug info asks only for this.)
UPDATED = (".debug_info", ".debug_abbrev", ".debug_line", ".debug_loclists", ".debug_rnglists",
           ".debug_loc", ".debug_ranges", ".debug_aranges", ".debug_frame")
