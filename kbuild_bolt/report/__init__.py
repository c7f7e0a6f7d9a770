"""The report: one self-contained HTML page that shows what a layout did.

Above the rewrite and the profile (it reads a rewrite's LayoutRecord, or runs
the layout analysis again), below the command line: ``data`` computes the
pictures' numbers with numpy, ``collect`` gathers them for a run, ``render``
draws them with the jinja2 template in ``templates/``.
"""
