"""Fencing: storage nodes that cannot reach mgmtd stop serving, and resume after.

mgmtd is frozen with SIGSTOP (a process this test started) for less than its
heartbeat timeout: every storage node loses mgmtd contact, fences itself after
half the timeout (data-plane requests answer FENCED), and serves again once a
heartbeat is acknowledged after SIGCONT.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import StorageClient, StorageClientConfig
from chainfs.local import cluster as cluster_mod
from chainfs.proto import common_pb2 as cpb
from tests.fault import faultlib as fl

CHUNK = 1024 * 1024


async def _read_once(address: str, chain: int, ino: int, cred: cpb.Credential) -> Any:
    mgmt = MgmtClient([address], timeout_s=1.0)
    routing = RoutingCache(mgmt)
    client = StorageClient(routing, b"fence-test", StorageClientConfig(attempts=1), credential=cred)
    try:
        await routing.refresh()
        return bytes(await client.read(chain, ino, 0, 0, 100))
    except ChainfsError as e:
        return e.code
    finally:
        await client.close()
        await mgmt.close()


@pytest.mark.timeout(120)
def test_node_without_mgmtd_fences_then_recovers(tmp_path: Path) -> None:
    with cluster_mod.LocalCluster(
        tmp_path,
        storage_nodes=3,
        targets_per_node=1,
        replicas=3,
        heartbeat_interval_ms=200,
        heartbeat_timeout_ms=8000,
    ) as c:
        r = fl.routing(c.address)
        chain = min(r.chains)
        ino = 1 << 50
        # Chunks written and read straight on storage, as one of the nodes.
        cred = fl.node_credential_of(c.secret_file, r)

        async def write(client: StorageClient, _r: Any) -> None:
            await client.write(chain, ino, 0, 0, b"fenced?" * 10, CHUNK)

        from tests.fault.test_fsck import _storage

        asyncio.run(_storage(c, write))
        assert asyncio.run(_read_once(c.address, chain, ino, cred)) == (b"fenced?" * 10)[:100]
        # The routing used by the probe is fetched before mgmtd freezes.
        mgmt_pid = c.mgmtd.pid if c.mgmtd is not None else None
        assert mgmt_pid is not None
        mgmt = MgmtClient([c.address])

        async def probe_frozen() -> Any:
            routing = RoutingCache(mgmt)
            await routing.refresh()
            client = StorageClient(
                routing, b"fence-probe", StorageClientConfig(attempts=1), credential=cred
            )
            os.kill(mgmt_pid, signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 7.0  # fencing is due after 4 s (half of 8 s)
                while loop.time() < deadline:
                    try:
                        await client.read(chain, ino, 0, 0, 100)
                    except ChainfsError as e:
                        if e.code == Code.FENCED:
                            return Code.FENCED
                    await asyncio.sleep(0.1)
                return None
            finally:
                os.kill(mgmt_pid, signal.SIGCONT)
                await client.close()

        try:
            assert asyncio.run(probe_frozen()) == Code.FENCED
        finally:
            os.kill(mgmt_pid, signal.SIGCONT)
            asyncio.run(mgmt.close())
        fl.poll(
            lambda: asyncio.run(_read_once(c.address, chain, ino, cred)) == (b"fenced?" * 10)[:100],
            30,
            "reads served again after mgmtd returns",
        )
        fl.poll(lambda: fl.all_serving(c.address), 30, "all targets serving")

        # With every replica dead, a write keeps retrying for retry_total_ms, then
        # fails with a clear error (not a hang).
        for i in range(3):
            c.kill_storage(i)

        async def doomed() -> ChainfsError:
            mgmt = MgmtClient([c.address], timeout_s=2.0)
            routing = RoutingCache(mgmt)
            client = StorageClient(
                routing,
                b"doomed",
                StorageClientConfig(attempts=2, retry_total_ms=1500),
                credential=cred,
            )
            try:
                with pytest.raises(ChainfsError) as e:
                    await asyncio.wait_for(client.write(chain, ino, 1, 0, b"x", CHUNK), 60)
                return e.value
            finally:
                await client.close()
                await mgmt.close()

        err = asyncio.run(doomed())
        assert err.code in (Code.UNAVAILABLE, Code.TARGET_NOT_SERVING, Code.ETIMEDOUT)
        assert "gave up after" in err.message and "retry_total_ms=1500" in err.message
