"""Which paths a cluster wrote are open to other users."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def exposed_paths(base: Path) -> list[str]:
    """Paths under ``base`` (itself included) that group or others may use."""
    found = []
    for root, dirs, files in os.walk(base):
        for p in [root, *(os.path.join(root, n) for n in [*dirs, *files])]:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                found.append(f"{oct(stat.S_IMODE(st.st_mode))} {p}")
    return sorted(set(found))
