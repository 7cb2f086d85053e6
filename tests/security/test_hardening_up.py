"""`chainfs up` keeps what it writes to itself: its data directory is 0700 and
nothing under it (configs, logs, KV store, chunk files, sockets) is open to
group or others."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from chainfs.cli.up import _start
from tests.security.paths import exposed_paths

pytestmark = pytest.mark.timeout(300)


def test_chainfs_up_data_is_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "up"
    # What `chainfs up --data DATA` starts (its foreground loop aside).
    cluster = _start(data, 0, storage_nodes=1, targets_per_node=1, replicas=1)
    try:
        with cluster.client() as fs, fs.open("/sample", "wb") as f:
            f.write(b"x" * 1_000_000)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        chunk_files = [p for p in data.rglob("*") if p.is_file() and p.parent.parent.name == "data"]
        assert chunk_files, "the write left no chunk files"
        assert exposed_paths(data) == []
    finally:
        cluster.stop()
