"""Process-wide logging set-up for servers and the CLI."""

from __future__ import annotations

import logging
import os
import sys


def setup(name: str, level: str | None = None) -> None:
    """Log to stderr as ``time level name[pid] logger: message``."""
    lvl = (level or os.environ.get("CHAINFS_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
