"""Errors a user can act on.

Anything raised as :class:`KbbError` is printed by the command line as one line
(``kbuild-bolt: error: ...``) with exit status 2, never as a traceback.
"""


class KbbError(Exception):
    """A problem with the input or the environment, explained in one line."""

    exit_status = 2
