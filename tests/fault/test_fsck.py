"""`chainfs fsck` against a real cluster: clean, orphan chunks (repaired), lost chunks,
a divergent replica."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chainfs.cli.fsck import dump_target
from chainfs.common.checksum import crc32c
from chainfs.common.dataplane.client import DataClient
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import StorageClient, data_address
from chainfs.proto import common_pb2 as cp
from chainfs.proto import storage_pb2 as sp
from tests.fault import faultlib as fl
from tests.fault.test_storage_faults import _cluster

CHUNK = 4 * 1024 * 1024


def fsck(address: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", "fsck", "--address", address, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


async def _storage(address: str, fn: Any) -> Any:
    mgmt = MgmtClient([address])
    routing = RoutingCache(mgmt)
    client = StorageClient(routing, b"fsck-test")
    try:
        return await fn(client, await routing.refresh())
    finally:
        await client.close()
        await mgmt.close()


@pytest.mark.timeout(120)
def test_fsck_finds_and_repairs(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        fs = c.client()
        rng = random.Random(9)
        for i in range(6):
            fs.write_file(f"/f{i}", rng.randbytes(200_000))
        code, problems = fsck(c.address)
        assert (code, problems) == (0, [])

        lost_ino = fs.stat("/f1").st_ino
        div_ino = fs.stat("/f2").st_ino
        orphan_ino = 1 << 60

        async def damage(client: StorageClient, routing: Any) -> None:
            cid = min(routing.chains)
            await client.write(cid, orphan_ino, 0, 0, b"orphan", CHUNK)
            for chain in routing.chains.values():
                await client.remove_chunks(chain.chain_id, lost_ino)
            # A forwarded full-chunk update sent to one tail only: that replica diverges.
            for chain in routing.chains.values():
                tail = chain.targets[-1]
                dump = await dump_target(routing.node_of_target(tail), tail, 10)
                meta = dump.get((div_ino, 0))
                if meta is None:
                    continue
                data = b"diverged"
                req = sp.UpdateReq(
                    req=cp.RequestInfo(client_id=b"fsck-test", request_id=1),
                    chain_id=chain.chain_id,
                    chain_version=chain.chain_version,
                    target_id=tail,
                    from_target=chain.targets[-2],
                    chunk=sp.ChunkId(inode=div_ino, index=0),
                    type=sp.WRITE,
                    length=len(data),
                    crc32c=crc32c(data),
                    chunk_size=CHUNK,
                    update_version=meta.committed_version + 1,
                    full_chunk=True,
                )
                dc = DataClient()
                try:
                    await dc.request(
                        data_address(routing.node_of_target(tail)),
                        sp.UPDATE,
                        req.SerializeToString(),
                        payload=[memoryview(data)],
                        timeout_s=10,
                    )
                finally:
                    await dc.close()

        asyncio.run(_storage(c.address, damage))
        code, problems = fsck(c.address)
        kinds = {(p["kind"], p.get("path") or tuple(p.get("chunk", ()))) for p in problems}
        assert code == 1
        assert ("orphan_chunk", (orphan_ino, 0)) in kinds
        assert ("lost_chunks", "/f1") in kinds
        assert ("divergent_replica", "/f2") in kinds

        code, problems = fsck(c.address, "--repair")
        assert any(p.get("repair") == "removed" for p in problems)
        # Offlined replicas resync from the tail side; then fsck sees no orphan or divergence.
        fl.poll(lambda: fl.all_serving(c.address), 60, "every target serving after repair")

        def left() -> list[str]:
            return sorted({p["kind"] for p in fsck(c.address)[1]})

        fl.poll(lambda: left() == ["lost_chunks"], 60, "only the unrepairable loss left")
