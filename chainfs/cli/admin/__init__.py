"""`chainfs admin ...`: cluster operations. Each module adds its commands."""

from __future__ import annotations

from chainfs.cli.admin.common import admin

__all__ = ["admin"]
