"""Owner-only paths for what a local cluster writes: data, configs, logs.

Chunk data, KV files and configs are readable by nobody but the user running
the cluster (directories 0700, files 0600); spawned services run with umask
0077 so whatever they create inherits the same.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077  # of the services a local cluster spawns


def make_private_dir(path: Path) -> None:
    """Create ``path`` as 0700 (missing parents too); an existing one keeps its mode,
    since it may be a directory the user chose and shares."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def private_opener(path: str, flags: int) -> int:
    """``open(..., opener=private_opener)``: a file created 0600."""
    return os.open(path, flags, PRIVATE_FILE_MODE)


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as a 0600 file (an existing file is made 0600)."""
    with open(path, "w", opener=private_opener) as f:
        os.fchmod(f.fileno(), PRIVATE_FILE_MODE)
        f.write(text)
