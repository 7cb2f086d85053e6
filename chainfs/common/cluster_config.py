"""The cluster-wide settings an operator may change at run time (`chainfs admin
config set KEY VALUE`), kept by mgmtd.

Only the keys listed here are accepted, each with its type and range checked
by mgmtd before anything is stored; each names the processes that read it and
when a change reaches them. A key not set keeps every process on the value of
its own TOML file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chainfs.common.errors import ChainfsError, Code


@dataclass(frozen=True)
class Setting:
    key: str
    type: type
    consumer: str  # which processes read it
    applies: str  # when a change reaches them
    help: str
    check: Callable[[int], bool] = lambda v: True
    requirement: str = ""  # what ``check`` demands, for the error text


def _non_negative(v: int) -> bool:
    return v >= 0


def _positive(v: int) -> bool:
    return v > 0


# Meta servers apply a change at their next poll; each reads these per round or per file.
_META_POLL = "each meta server within its cluster_config_poll_ms"


def _meta_int(field: str, help: str, check: Callable[[int], bool], requirement: str) -> Setting:
    """An integer field of MetaConfig that meta servers apply at run time."""
    return Setting(f"meta.{field}", int, "meta", _META_POLL, help, check, requirement)


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        _meta_int(
            "gc_delay_ms",
            "how long a removed file's chunks stay on storage after its last close",
            _non_negative,
            ">= 0",
        ),
        _meta_int(
            "gc_batch", "removed files one GC round of a meta server collects", _positive, "> 0"
        ),
        _meta_int(
            "gc_retry_delay_ms",
            "pause before GC retries a file whose chunk removal failed",
            _positive,
            "> 0",
        ),
        _meta_int(
            "trash_retention_ms",
            "how long a removed file stays in /.trash before it is purged (0: no trash)",
            _non_negative,
            ">= 0",
        ),
    )
}


def parse_setting(key: str, text: str) -> int:
    """The typed value of ``text`` for ``key``; ChainfsError(EINVAL) if the key
    is not settable or the value does not fit it."""
    setting = SETTINGS.get(key)
    if setting is None:
        known = ", ".join(sorted(SETTINGS))
        raise ChainfsError(Code.EINVAL, f"unknown config key {key!r} (settable keys: {known})")
    try:
        value = setting.type(text)
    except ValueError:
        raise ChainfsError(
            Code.EINVAL, f"config {key} takes {setting.type.__name__}, not {text!r}"
        ) from None
    if not setting.check(value):
        raise ChainfsError(Code.EINVAL, f"config {key} must be {setting.requirement}, not {text}")
    return int(value)
