"""A target on a small (tmpfs, size=128m) file system fills up: the writer gets ENOSPC,
no chunk is left pending or divergent, and the other chain keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.storage_client import StorageClient
from chainfs.local import cluster as cluster_mod
from tests.conftest import require
from tests.fault import faultlib as fl
from tests.fault.test_fsck import _storage

CHUNK = 4 * 1024 * 1024


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def small_target_cluster(base: Path, small: Path, **kwargs: Any) -> cluster_mod.LocalCluster:
    """3 nodes x 2 targets, 3 replicas; node 0's first target lives in ``small``."""

    def configure(i: int, c: Any) -> None:
        if i == 0:
            c.targets[0] = str(small / "target0")

    return cluster_mod.LocalCluster(
        base,
        storage_nodes=3,
        targets_per_node=2,
        replicas=3,
        heartbeat_interval_ms=300,
        heartbeat_timeout_ms=3000,
        configure_storage=configure,
        **kwargs,
    )


@pytest.mark.timeout(120)
def test_full_target_gives_enospc_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    small = tmp_path / "small"
    require("tmpfs mount", _mount_tmpfs(small, "128m"), "needs root and mount(2)")
    try:
        with small_target_cluster(tmp_path / "c", small) as c:
            r = fl.routing(c.address)
            node0 = c.storage[0].info["node_id"]
            small_tid = next(
                t.target_id
                for t in r.targets.values()
                if t.node_id == node0 and t.path.startswith(str(small))
            )
            full_chain = r.targets[small_tid].chain_id
            other = next(cid for cid in r.chains if cid != full_chain)
            blob = os.urandom(CHUNK)

            async def fill(client: StorageClient, _r: Any) -> tuple[int, int]:
                written = 0
                for i in range(40):  # 128 MiB / 4 MiB chunks: ENOSPC before 40
                    try:
                        await client.write(full_chain, 7 << 40, i, 0, blob, CHUNK)
                    except ChainfsError as e:
                        return written, e.code
                    written += 1
                return written, 0

            written, code = asyncio.run(_storage(c, fill))
            assert code == Code.ENOSPC and written > 0

            async def after(client: StorageClient, _r: Any) -> None:
                for i in range(written):  # everything acknowledged reads back
                    got = await client.read(full_chain, 7 << 40, i, 0, CHUNK)
                    assert bytes(got) == blob
                await client.write(other, 8 << 40, 0, 0, blob, CHUNK)
                assert bytes(await client.read(other, 8 << 40, 0, 0, CHUNK)) == blob

            asyncio.run(_storage(c, after))
            assert fl.replica_differences(c.address) == []
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)
