"""loam: data-centric language-model pretraining in JAX.

A loam command (``python -m loam.…``) run on Linux with glibc restarts itself once, before any
heavy import, with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` added to its environment: glibc's
malloc then backs its large blocks with transparent huge pages (where the kernel allows them on
request, the usual ``madvise`` setting). XLA on the CPU allocates every execution's buffers
afresh, hundreds of megabytes for a train step, and with 4 KB pages each step page-faults and
zero-fills all of them again (about 400,000 faults per step at peer-a); with huge pages that falls
to about a thousand, and the step is 15-20% faster. Set ``LOAM_HOST_MALLOC=system`` to keep the
environment as it is. Importing loam from Python (tests, notebooks) never restarts anything.
"""

from __future__ import annotations

import os
import platform
import sys

_TUNABLE = "glibc.malloc.hugetlb"


def _restart_with_huge_pages() -> None:
    if sys.platform != "linux" or os.environ.get("LOAM_HOST_MALLOC", "") == "system":
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _TUNABLE in tunables:
        return
    argv = list(getattr(sys, "orig_argv", []))
    # Only `python [options] -m loam.<module> ...`: the process is a loam command.
    try:
        at = argv.index("-m")
    except ValueError:
        return
    if at + 1 >= len(argv) or not argv[at + 1].startswith("loam."):
        return
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return  # the tunable arrived in glibc 2.35
    except ValueError:
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{_TUNABLE}=1" if tunables
               else f"{_TUNABLE}=1")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # run on as is


_restart_with_huge_pages()
