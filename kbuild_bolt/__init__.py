"""kbuild-bolt: a post-link optimizer for the Linux kernel."""

import os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per CPU as numpy is imported (50-60 ms of every
# run on this machine's two); kbuild-bolt does no linear algebra. A value the
# user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
