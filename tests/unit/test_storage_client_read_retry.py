"""StorageClient reads against replicas that crash mid-reply or send malformed frames.

The replicas are small socket servers speaking the frame format (the client's
neighbours, faked): a good one, one that dies halfway through its reply, one
that answers bytes that are not a frame. A read succeeds while one replica
can serve it; when none can, it fails after a bounded number of tries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chainfs.common.dataplane.frame import (
    FIXED_HEADER_SIZE,
    FLAG_RESPONSE,
    decode_fixed,
    encode_fixed,
)
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.storage_client import StorageClient, StorageClientConfig
from chainfs.proto import common_pb2 as cp
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp

DATA = bytes(range(256)) * 4096  # 1 MiB, the whole "chunk"
CHAIN = 1


class _Replica:
    """One fake storage node: ``mode`` is good, crash (mid-reply) or garbage."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                fixed = await reader.readexactly(FIXED_HEADER_SIZE)
                hdr = decode_fixed(memoryview(fixed), 0, 1 << 20, 1 << 30)
                req = sp.BatchReadReq.FromString(await reader.readexactly(hdr.header_len))
                await reader.readexactly(hdr.payload_len)
                self.requests += 1
                if self.mode == "garbage":
                    writer.write(b"\xee" * FIXED_HEADER_SIZE)  # not a frame: bad magic
                    await writer.drain()
                    continue
                rsp = sp.BatchReadRsp()
                payload = b""
                for io in req.ios:
                    piece = DATA[io.offset : io.offset + io.length]
                    rsp.results.add(
                        status=cp.Status(code=0), length=len(piece), committed_version=1,
                        chunk_length=len(DATA),
                    )  # fmt: skip
                    payload += piece
                header = rsp.SerializeToString()
                frame = encode_fixed(
                    FLAG_RESPONSE, sp.BATCH_READ, hdr.request_id, len(header), 0, len(payload)
                )
                if self.mode == "crash":  # half the reply, then the process is gone
                    writer.write(frame + header + payload[: len(payload) // 2])
                    await writer.drain()
                    writer.transport.abort()
                    return
                writer.write(frame + header + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class _StaticRouting:
    """Routing that never changes: one chain over the given replicas, all serving."""

    def __init__(self, addresses: list[str]) -> None:
        info = mp.RoutingInfo(version=1)
        for i, address in enumerate(addresses, start=1):
            info.nodes.add(node_id=i, data_address=address, status=mp.NODE_ONLINE)
            info.targets.add(target_id=i, node_id=i, chain_id=CHAIN, public_state=mp.SERVING)
        info.chains.add(chain_id=CHAIN, chain_version=1, targets=range(1, len(addresses) + 1))
        self._routing = Routing(info)

    async def get(self) -> Routing:
        return self._routing

    async def refresh(self) -> Routing:
        return self._routing


@pytest.fixture
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[list[_Replica]]:
    reps = [_Replica(mode) for mode in request.param]
    yield reps
    for r in reps:
        if r.server is not None:
            await r.stop()


async def _client(reps: list[_Replica], attempts: int) -> StorageClient:
    addresses = [await r.start() for r in reps]
    config = StorageClientConfig(attempts=attempts, retry_backoff_ms=1, prefer_unix_socket=False)
    return StorageClient(_StaticRouting(addresses), b"test-client", config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "replicas",
    [("crash", "garbage", "good"), ("garbage", "crash", "good"), ("crash", "crash", "good")],
    indirect=True,
)
async def test_read_goes_past_crashed_and_malformed_replicas(replicas: list[_Replica]) -> None:
    client = await _client(replicas, attempts=10)
    try:
        for seed in range(10):  # the first replica tried is random: cover several orders
            client._rng.seed(seed)
            got = await client.read(CHAIN, 7, 0, 0, len(DATA))
            assert bytes(got) == DATA
    finally:
        await client.close()


@pytest.mark.parametrize("replicas", [("garbage", "garbage", "crash")], indirect=True)
async def test_read_no_replica_can_serve_fails_after_bounded_tries(
    replicas: list[_Replica],
) -> None:
    attempts = 4
    client = await _client(replicas, attempts)
    try:
        with pytest.raises(ChainfsError) as ei:
            await asyncio.wait_for(client.read(CHAIN, 7, 0, 0, len(DATA)), 60)
        assert ei.value.code in (Code.BAD_FRAME, Code.UNAVAILABLE)
        assert f"after {attempts} attempts" in ei.value.message
        assert sum(r.requests for r in replicas) == attempts  # one request per attempt
    finally:
        await client.close()
