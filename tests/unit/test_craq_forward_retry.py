"""A forward to a successor that routing has since dropped is not retried.

A partitioned successor answers nothing: every forward attempt waits its whole
timeout. Once mgmtd's new routing (successor offline) has arrived, retrying it
only stalls the chain; the update must fail back at once so that it is
re-driven along the new chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.config import StorageConfig
from chainfs.storage_service.craq import Craq, LocalTarget
from tests.unit.test_craq import FakeLinks, routing_info, write_req


def _without_tail(old: Routing) -> Routing:
    """mgmtd's next routing: target 103 offline (last in the chain), chain version + 1."""
    info = mp.RoutingInfo()
    info.CopyFrom(old.info)
    info.version += 1
    for t in info.targets:
        if t.target_id == 103:
            t.public_state = mp.OFFLINE
    info.chains[0].chain_version += 1
    return Routing(info)


class PartitionedLinks(FakeLinks):
    """Node 3 answers nothing; its first failed forward brings the new routing."""

    def __init__(self, holder: dict[str, Routing]) -> None:
        super().__init__()
        self.holder = holder
        self.to_node3 = 0

    async def update(
        self, node: mp.NodeInfo, req: sp.UpdateReq, payload: Sequence[memoryview], timeout_s: float
    ) -> sp.UpdateRsp:
        if node.node_id == 3:
            self.to_node3 += 1
            if self.to_node3 == 1:
                self.holder["routing"] = _without_tail(self.holder["routing"])
            raise ChainfsError(Code.ETIMEDOUT, "no reply (partitioned)")
        return await super().update(node, req, payload, timeout_s)


async def test_dropped_successor_is_not_retried(tmp_path: Path) -> None:
    holder = {"routing": routing_info()}
    links = PartitionedLinks(holder)
    config = StorageConfig(forward_retries=3, forward_retry_backoff_ms=1)
    pool = ThreadPoolExecutor(2)
    engines: dict[int, ChunkEngine] = {}

    async def no_refresh(_v: int) -> Routing | None:
        return None

    try:
        for i in (1, 2, 3):
            eng = ChunkEngine(tmp_path / f"t{i}")
            engines[100 + i] = eng
            links.craqs[i] = Craq(
                config,
                {100 + i: LocalTarget(100 + i, eng)},
                lambda: holder["routing"],
                no_refresh,
                links,
                pool,
            )
        data = b"across a partition"
        with pytest.raises(ChainfsError):
            await links.craqs[1].update(write_req(data), memoryview(data))
        assert links.to_node3 == 1, "a forward to a target routing dropped was retried"

        # The client's retry (same request id, new chain version) lands on 101 and 102.
        retry = write_req(data)
        retry.chain_version = holder["routing"].chains[1].chain_version
        rsp = await links.craqs[1].update(retry, memoryview(data))
        assert rsp.committed_version == 1
        for tid in (101, 102):
            rec = engines[tid].get(7, 0)
            assert rec is not None and rec.committed_version == 1 and not rec.has_pending
        assert links.to_node3 == 1
    finally:
        pool.shutdown()
        for eng in engines.values():
            eng.close()
