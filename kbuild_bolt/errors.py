"""Errors a user can act on.

Anything raised as :class:`KbbError` is printed by the command line as one line
(``kbuild-bolt: error: ...``) with exit status 2, never as a traceback.
"""


class KbbError(Exception):
    """A problem with the input or the environment, explained in one line."""

    exit_status = 2


class Interrupted(BaseException):
    """A signal asked kbuild-bolt to stop (SIGTERM, SIGHUP). A BaseException, like
    KeyboardInterrupt, so that cleanups run and nothing mistakes it for an error."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
