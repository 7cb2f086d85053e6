"""Fault points for crash tests of real storage processes.

``CHAINFS_FAULT_STALL=<point>:<marker path>`` in a storage process's
environment makes the first thread that reaches ``<point>`` (of the whole
machine: the marker is created exclusively) write the marker file and stall
there, so a test can SIGKILL the process at exactly that step. Unset, a
fault point costs one string compare.
"""

from __future__ import annotations

import os
import time

STALL_ENV = "CHAINFS_FAULT_STALL"
STALL_MAX_S = 120.0  # a stalled thread gives up after this long (the test died first)

_point, _, _marker = os.environ.get(STALL_ENV, "").partition(":")


def armed(point: str) -> bool:
    """Is ``point`` the fault point this process was told to stall at?"""
    return bool(_point) and point == _point


def stall(point: str, what: str) -> None:
    """If armed at ``point`` and first to get there: write ``what`` to the marker and
    block until killed (raising after STALL_MAX_S, never carrying on silently)."""
    if not armed(point):
        return
    try:
        fd = os.open(_marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # another process or thread stalled already: this one runs on
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {what}\n")
    time.sleep(STALL_MAX_S)
    raise RuntimeError(f"fault point {point} stalled {STALL_MAX_S} s without being killed")
