"""`chainfs admin ...`: cluster operations. Each module adds its commands."""

from __future__ import annotations

from chainfs.cli.admin import chunks as _chunks  # noqa: F401  (registers commands)
from chainfs.cli.admin import cluster as _cluster  # noqa: F401  (registers commands)
from chainfs.cli.admin import create_targets as _create_targets  # noqa: F401  (registers commands)
from chainfs.cli.admin import gc as _gc  # noqa: F401  (registers commands)
from chainfs.cli.admin import info as _info  # noqa: F401  (registers commands)
from chainfs.cli.admin import layout as _layout  # noqa: F401  (registers commands)
from chainfs.cli.admin import rebalance as _rebalance  # noqa: F401  (registers commands)
from chainfs.cli.admin import targets_ops as _targets_ops  # noqa: F401  (registers commands)
from chainfs.cli.admin import top as _top  # noqa: F401  (registers commands)
from chainfs.cli.admin import trash as _trash  # noqa: F401  (registers commands)
from chainfs.cli.admin import users as _users  # noqa: F401  (registers commands)
from chainfs.cli.admin.common import admin

__all__ = ["admin"]
