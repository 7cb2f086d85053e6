"""kill -9 of a storage node in the middle of a small in-place chunk update.

Real processes (mgmtd + 3 storage nodes, chains of 3). A fault point
(``CHAINFS_FAULT_STALL``) stalls the first node that reaches a step of a
journaled overwrite; the test SIGKILLs it there, restarts it, retries the same
request until it is acknowledged, and checks every replica: the new bytes with
the right CRCs (the servers verify per-block CRC32Cs on read), the write
applied once, the neighbouring bytes intact.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.storage_client import StorageClient
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.fault_points import STALL_ENV
from tests.integration.storage_fixtures import StorageCluster
from tests.integration.test_storage import CHUNK, read_from, replicas, send_update, update_req

pytestmark = pytest.mark.timeout(150)

INODE = 4242
RETRY_S = 60.0  # the restarted node serves again well within this


def _stalled_node(c: StorageCluster, marker: Path) -> int:
    """Index of the storage process that wrote the marker (it stalls at the fault point)."""
    pid = int(marker.read_text().split()[0])
    return next(i for i, p in enumerate(c.storage) if p.pid == pid)


async def _wait_marker(marker: Path, update: asyncio.Task[object]) -> None:
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(marker.exists):
        assert not update.done(), f"update finished without reaching the fault point: {update}"
        assert time.monotonic() < deadline, "no node reached the fault point"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "point, victim",
    [
        ("journal-prepared", 0),  # the head dies after journaling, before any commit
        ("journal-torn", 2),  # the tail dies with half the new bytes in its chunk file
    ],
)
def test_kill9_mid_small_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, victim: int
) -> None:
    marker = tmp_path / "stalled"
    monkeypatch.setenv(STALL_ENV, f"{point}:{marker}")
    base = os.urandom(CHUNK)
    patch = os.urandom(6000)  # crosses a CRC block boundary
    at = 64 * 1024 - 1000
    want = bytearray(base)
    want[at : at + len(patch)] = patch
    with StorageCluster(tmp_path / "c") as c:

        async def go() -> None:
            client, mgmt = await c.client()
            try:
                chain = c.chains[0]
                await client.write(chain, INODE, 0, 0, base, CHUNK)
                routing = await client.routing.refresh()
                order = [t.target_id for t in routing.chain_targets(chain)]
                req = update_req(routing, chain, INODE, patch, offset=at, request_id=77)
                head = order[0]
                update = asyncio.create_task(send_update(client, routing, head, req, patch))
                await _wait_marker(marker, update)
                node = _stalled_node(c, marker)
                assert (
                    routing.node_of_target(order[victim]).node_id == c.storage[node].info["node_id"]
                ), "an unexpected replica reached the fault point first"
                c.storage[node].kill()
                try:
                    await asyncio.wait_for(update, 30)
                except (ChainfsError, OSError, TimeoutError):
                    pass  # not acknowledged: the retry below decides
                _check_left_on_disk(c.target_dirs()[order[victim]], point, base, bytes(want))
                c.storage[node].start()
                rsp = await _retry_until_acked(client, req, patch)
                assert rsp.committed_version == 2  # applied once
                assert rsp.crc32c == crc32c(bytes(want))
                await _wait_serving(client, chain, len(order))
                for tid in order:
                    got = await read_from(client, tid, chain, INODE, 0)
                    assert got == bytes(want), f"target {tid} holds a mix"
                metas = await replicas(client, chain, INODE, 0)
                assert [(m["committed_version"], m["pending_version"]) for m in metas] == [
                    (2, 0)
                ] * 3, metas
                assert {m["crc32c"] for m in metas} == {crc32c(bytes(want))}
            finally:
                await client.close()
                await mgmt.close()

        asyncio.run(go())
        c.check_alive()


def _check_left_on_disk(target_dir: Path, point: str, old: bytes, new: bytes) -> None:
    """Open what the killed process left (recovery runs) and check the chunk: the old
    version with the new one pending, or (decided before the kill) the new one."""
    eng = ChunkEngine(target_dir)
    try:
        rec = eng.get(INODE, 0)
        assert rec is not None
        if point == "journal-prepared":
            assert eng.recovered["pending_kept"] == 1 and rec.pending_journal
            assert bytes(eng.read_pending(INODE, 0, rec)) == new
            committed = eng.files.read(
                INODE, 0, rec.file_gen, 0, memoryview(buf := bytearray(CHUNK))
            )
            assert committed == CHUNK and bytes(buf) == old and crc32c(old) == rec.crc32c
        else:
            assert eng.recovered["journals_applied"] == 1 and not rec.journal_applying
            assert (rec.committed_version, rec.crc32c) == (2, crc32c(new))
            assert bytes(eng.read(INODE, 0, 0, CHUNK, verify=True)[1]) == new
    finally:
        eng.close()


async def _wait_serving(client: StorageClient, chain: int, n: int) -> None:
    """Until the restarted node is back in the chain, filled and serving."""
    deadline = time.monotonic() + RETRY_S
    while len((await client.routing.refresh()).chain_targets(chain, (mp.SERVING,))) < n:
        assert time.monotonic() < deadline, "the restarted node did not serve again"
        await asyncio.sleep(0.2)


async def _retry_until_acked(
    client: StorageClient, req: sp.UpdateReq, patch: bytes
) -> sp.UpdateRsp:
    """Resend the same request (same client and request id) until a head acknowledges."""
    deadline = time.monotonic() + RETRY_S
    while True:
        routing = await client.routing.refresh()
        head = routing.head(req.chain_id)
        try:
            if head is None:
                raise ChainfsError(Code.UNAVAILABLE, f"chain {req.chain_id} has no head")
            req.chain_version = routing.chains[req.chain_id].chain_version
            req.target_id = head.target_id
            return await send_update(client, routing, head.target_id, req, patch)
        except (ChainfsError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
