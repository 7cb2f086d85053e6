"""StorageControl client: paging through a target's chunk metadata, and a new
client reaching a node that just started on an address another channel of the
process failed to reach (the storage integration tests' first query-chunk
used to fail "Connection refused" right after the cluster came up)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import grpc.aio
import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc import grpc_util
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg

pytestmark = pytest.mark.timeout(60)

CHUNKS = [sp.ChunkMeta(chunk=sp.ChunkId(inode=9, index=i), committed_version=1) for i in range(7)]


class _Node(sg.StorageControlServicer):
    """A storage node's control service over a fixed list of chunks on target 5."""

    def __init__(self) -> None:
        self.pages: list[tuple[bytes, int]] = []  # (start_after, limit) asked

    @grpc_util.rpc_handler
    async def GetTargets(self, request: sp.GetTargetsReq, context: Any) -> sp.GetTargetsRsp:
        return sp.GetTargetsRsp(node_id=7)

    @grpc_util.rpc_handler
    async def DumpChunkMeta(
        self, request: sp.DumpChunkMetaReq, context: Any
    ) -> sp.DumpChunkMetaRsp:
        if request.target_id != 5:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {request.target_id} is not here")
        self.pages.append((request.start_after, request.limit))
        start = int(request.start_after or b"0")
        limit = request.limit or 3
        rsp = sp.DumpChunkMetaRsp(chunks=CHUNKS[start : start + limit])
        if start + limit < len(CHUNKS):
            rsp.next = str(start + limit).encode()
        return rsp


async def _serve(port: int = 0) -> tuple[grpc.aio.Server, _Node, int]:
    node = _Node()
    server = grpc_util.server()
    sg.add_StorageControlServicer_to_server(node, server)
    bound = grpc_util.bind(server, "127.0.0.1", port)
    await server.start()
    return server, node, bound


def test_chunk_meta_pages_through_every_chunk_in_order() -> None:
    async def go() -> None:
        server, node, port = await _serve()
        try:
            async with StorageControl(f"127.0.0.1:{port}", timeout_s=10) as control:
                got = [m.chunk.index async for m in control.chunk_meta(5, page_chunks=2)]
                assert got == list(range(7))
                assert node.pages == [(b"", 2), (b"2", 2), (b"4", 2), (b"6", 2)]
                node.pages.clear()
                got = [m.chunk.index async for m in control.chunk_meta(5, start_after=b"3")]
                assert got == [3, 4, 5, 6] and len(node.pages) == 2  # server's page bound
                with pytest.raises(ChainfsError) as e:
                    [m async for m in control.chunk_meta(6)]
                assert e.value.code == Code.UNKNOWN_TARGET
        finally:
            await server.stop(None)

    asyncio.run(go())


def test_new_client_reaches_a_node_another_channel_failed_to_reach() -> None:
    async def go() -> None:
        with socket.socket() as s:  # a port nothing listens on (yet)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"127.0.0.1:{port}"
        # Another client of this process (say a routing watch) tried the address
        # before the node started there, and is still open.
        other = grpc_util.channel(address)
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await sg.StorageControlStub(other).GetTargets(sp.GetTargetsReq(), timeout=5)
            server, _, _ = await _serve(port)
            try:
                async with StorageControl(address, timeout_s=10) as control:
                    assert (await control.get_targets()).node_id == 7
            finally:
                await server.stop(None)
        finally:
            await other.close()

    asyncio.run(go())


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError):
        StorageControl("127.0.0.1:1", timeout_s=0)
