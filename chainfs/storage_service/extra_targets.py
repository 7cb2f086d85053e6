"""Targets a running storage node adds (`chainfs admin create-targets`).

The node's config lists the targets it always serves. Targets created at
runtime are recorded in a small JSON file (``StorageConfig.extra_targets_file``,
by default inside the first configured target directory) and opened after the
configured ones at every start, so they survive a restart like any other.

Creating targets changes nothing unless it all succeeds: the parent directory
is checked, fresh directories are created, the record is written (before mgmtd
learns of the targets, so a crash in between leaves a target the next start
re-registers by path), then mgmtd registers them. Any failure removes what was
created and restores the record.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service.config import StorageConfig

NAME_PREFIX = "target"  # new directories are <parent>/target<j>, the first j free


def record_path(config: StorageConfig) -> Path:
    p = Path(config.extra_targets_file)
    if p.is_absolute():
        return p
    if not config.targets:
        raise ChainfsError(Code.CONFIG_ERROR, "no targets configured")
    return Path(config.targets[0]) / p


def load(config: StorageConfig) -> list[str]:
    """Target directories added at runtime, in the order they were added."""
    path = record_path(config)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ChainfsError(Code.CONFIG_ERROR, f"cannot read {path}: {e}") from None
    targets = data.get("targets") if isinstance(data, dict) else None
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ChainfsError(Code.CONFIG_ERROR, f"{path}: 'targets' must be a list of directories")
    configured = set(config.targets)
    return [t for t in dict.fromkeys(targets) if t not in configured]


def save(config: StorageConfig, targets: Sequence[str]) -> None:
    """Replace the record atomically and durably (tmp file, fsync, rename, fsync dir)."""
    path = record_path(config)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"targets": list(targets)}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def default_parent(config: StorageConfig) -> str:
    """Where new targets go without --path: beside the node's first target."""
    return str(Path(config.targets[0]).resolve().parent)


def check_parent(parent: str, node_id: int) -> Path:
    """The directory new targets are created in; a clear error naming it if unusable."""
    where = f"on storage node {node_id}"
    if not parent or not os.path.isabs(parent):
        raise ChainfsError(Code.EINVAL, f"path {parent!r} must be an absolute directory ({where})")
    p = Path(parent)
    if not p.exists():
        raise ChainfsError(Code.ENOENT, f"path {parent} does not exist {where}")
    if not p.is_dir():
        raise ChainfsError(Code.ENOTDIR, f"path {parent} is not a directory {where}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ChainfsError(Code.EACCES, f"path {parent} is not writable {where}")
    marker = p / "target.json"
    if marker.exists():
        try:
            ids = json.loads(marker.read_text())
            what = f"target {ids.get('target_id')} of node {ids.get('node_id')}"
        except (OSError, ValueError):
            what = "a target"
        raise ChainfsError(
            Code.EEXIST,
            f"path {parent} already holds {what} {where}; give the directory to create "
            "new targets in",
        )
    return p


def pick_dirs(parent: Path, count: int, in_use: Iterable[str]) -> list[Path]:
    """``count`` new directory names <parent>/target<j> that exist nowhere yet."""
    used = {os.path.realpath(u) for u in in_use}
    out: list[Path] = []
    j = 0
    while len(out) < count:
        d = parent / f"{NAME_PREFIX}{j}"
        if not os.path.lexists(d) and os.path.realpath(d) not in used:
            out.append(d)
        j += 1
    return out


def remove_dirs(dirs: Iterable[Path]) -> None:
    """Undo: remove directories this request created (never anything else)."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
