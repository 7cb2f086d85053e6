"""Drop every chunk of a target that left its chain (after a rebalance moved it).

Refused unless this node's routing shows the target in no chain: a target in a
chain may hold the only copy of something. Writes no longer reach it then (it
is in no chain, so CRAQ refuses them); each chunk is removed under its lock,
a page of records at a time, so memory stays bounded whatever the target holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_copy import Key, run_io
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.resync import source_page


def _remove(engine: ChunkEngine, key: Key) -> int:
    """Remove one chunk (runs in an I/O thread) -> bytes it held."""
    rec = engine.prepare_remove(*key)
    if rec is None:
        return 0
    engine.commit(key[0], key[1], rec.pending_version, rec.chain_version)
    return rec.length


async def drop_chunks(
    req: sp.DropChunksReq,
    targets: dict[int, LocalTarget],
    routing: Callable[[int], Awaitable[Routing | None]],
    executor: Executor,
    page_chunks: int,
) -> sp.DropChunksRsp:
    """``routing(min_version)``: this node's routing, refreshed to at least that version."""
    target = targets.get(req.target_id)
    if target is None:
        raise ChainfsError(Code.UNKNOWN_TARGET, f"target {req.target_id} is not on this node")
    r = await routing(req.min_routing_version)
    if r is None or r.version < req.min_routing_version:
        raise ChainfsError(
            Code.EAGAIN, f"routing version {req.min_routing_version} not known here yet"
        )
    info = r.targets.get(req.target_id)
    if info is None or info.chain_id:
        where = f"in chain {info.chain_id}" if info is not None else "not registered"
        raise ChainfsError(Code.EBUSY, f"target {req.target_id} is {where}: chunks kept")
    rsp = sp.DropChunksRsp()
    while True:
        page, last = await run_io(executor, source_page, target.engine, None, page_chunks)
        for key, _ in page:
            async with target.locks.held(key):
                rsp.bytes_removed += await run_io(executor, _remove, target.engine, key)
                rsp.chunks_removed += 1
        if last or not page:
            return rsp
