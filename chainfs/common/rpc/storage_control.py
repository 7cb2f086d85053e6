"""Client of one storage node's StorageControl service (gRPC control plane).

Operators (`chainfs admin`, `chainfs fsck`), resync and the fault tests use
it; the bulk chunk bytes never pass here (they go over the data plane, see
:mod:`chainfs.common.rpc.storage_client`).

    async with StorageControl(node.rpc_address, timeout_s=10.0) as control:
        async for meta in control.chunk_meta(target_id):
            ...

Every call is bounded by the ``timeout_s`` the caller gives (its own
configured bound); failures raise :class:`ChainfsError`.

Each client has its own connection (a local subchannel pool). gRPC otherwise
shares one connection per address among all channels of a process, and a new
channel inherits that connection's state: after any channel of the process
failed to reach an address (a node not yet started, or a dead process whose
port a new node now has), a new client of the node now listening there failed
at once with the old "Connection refused" until the reconnect backoff ran out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from chainfs.common.auth.tokens import resolve_token
from chainfs.common.rpc import grpc_util
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg

# A connection of its own per client: never another channel's failed connect.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *grpc_util.CHANNEL_OPTIONS,
    ("grpc.use_local_subchannel_pool", 1),
]


class StorageControl:
    """The StorageControl RPCs of the storage node at ``address`` (host:port)."""

    def __init__(
        self, address: str, timeout_s: float, credential: cpb.Credential | None = None
    ) -> None:
        """``credential``: a node's (resync, repair) or an admin's; None = the user
        token of the environment (CHAINFS_TOKEN / CHAINFS_TOKEN_FILE), if any.
        StorageControl serves nodes and admins only."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        if credential is None:
            token = resolve_token()
            credential = cpb.Credential(token=token) if token else None
        self._channel = grpc_util.channel(address, credential, options=CHANNEL_OPTIONS)
        self._stub = sg.StorageControlStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> StorageControl:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def query_chunk(self, inode: int, index: int, chain_id: int = 0) -> sp.QueryChunkRsp:
        """Every local replica of chunk (inode, index) (of ``chain_id`` only, if set)."""
        req = sp.QueryChunkReq(chunk=sp.ChunkId(inode=inode, index=index), chain_id=chain_id)
        rsp: sp.QueryChunkRsp = await grpc_util.call(
            self._stub.QueryChunk, req, self.timeout_s, self.address
        )
        return rsp

    async def chunk_meta_page(
        self, target_id: int, start_after: bytes = b"", limit: int = 0
    ) -> sp.DumpChunkMetaRsp:
        """One page of ``target_id``'s chunk metadata in key order, after the cursor
        ``start_after`` (b"" = from the start); ``limit`` 0 = the server's bound.
        The reply's ``next`` is the cursor of the following page (b"" = done)."""
        req = sp.DumpChunkMetaReq(target_id=target_id, start_after=start_after, limit=limit)
        rsp: sp.DumpChunkMetaRsp = await grpc_util.call(
            self._stub.DumpChunkMeta, req, self.timeout_s, self.address
        )
        return rsp

    async def chunk_meta(
        self, target_id: int, start_after: bytes = b"", page_chunks: int = 0
    ) -> AsyncIterator[sp.ChunkMeta]:
        """Every chunk's metadata on ``target_id`` in key order, fetched a page at a
        time (``page_chunks`` per page, 0 = the server's bound): memory stays
        bounded by one page whatever the target holds."""
        cursor = start_after
        while True:
            rsp = await self.chunk_meta_page(target_id, cursor, page_chunks)
            for meta in rsp.chunks:
                yield meta
            if not rsp.next:
                return
            cursor = rsp.next

    async def get_targets(self) -> sp.GetTargetsRsp:
        rsp: sp.GetTargetsRsp = await grpc_util.call(
            self._stub.GetTargets, sp.GetTargetsReq(), self.timeout_s, self.address
        )
        return rsp

    async def create_targets(self, count: int, parent_dir: str) -> sp.CreateTargetsRsp:
        req = sp.CreateTargetsReq(count=count, parent_dir=parent_dir)
        rsp: sp.CreateTargetsRsp = await grpc_util.call(
            self._stub.CreateTargets, req, self.timeout_s, self.address
        )
        return rsp

    async def drop_chunks(self, target_id: int, min_routing_version: int) -> sp.DropChunksRsp:
        """Have the node remove every chunk of ``target_id``, a target in no chain."""
        req = sp.DropChunksReq(target_id=target_id, min_routing_version=min_routing_version)
        rsp: sp.DropChunksRsp = await grpc_util.call(
            self._stub.DropChunks, req, self.timeout_s, self.address
        )
        return rsp

    async def repair_chunk(
        self, target_id: int, inode: int, index: int, prefer_target: int = 0
    ) -> sp.RepairChunkRsp:
        """Have the node copy chunk (inode, index) onto ``target_id`` from a healthy
        replica (``prefer_target`` first among equally new ones)."""
        req = sp.RepairChunkReq(
            target_id=target_id,
            chunk=sp.ChunkId(inode=inode, index=index),
            prefer_target=prefer_target,
        )
        rsp: sp.RepairChunkRsp = await grpc_util.call(
            self._stub.RepairChunk, req, self.timeout_s, self.address
        )
        return rsp

    async def verify_chunks(
        self, target_id: int, chunks: list[tuple[int, int]]
    ) -> sp.VerifyChunksRsp:
        """Have the node read the chunks of ``target_id`` and check them against their
        stored CRCs, locally: a verdict per chunk, no chunk bytes on the wire."""
        req = sp.VerifyChunksReq(
            target_id=target_id, chunks=[sp.ChunkId(inode=i, index=x) for i, x in chunks]
        )
        rsp: sp.VerifyChunksRsp = await grpc_util.call(
            self._stub.VerifyChunks, req, self.timeout_s, self.address
        )
        return rsp
