"""chainfs: a 3FS-style distributed file system for AI workloads."""

from __future__ import annotations

__version__ = "0.1.0"
