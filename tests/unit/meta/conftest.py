"""In-process meta server over ``memory://`` for unit tests.

The server is the real one (gRPC, namespace, background tasks); only its
neighbours are stand-ins: a fixed chain list instead of mgmtd's routing info,
and :class:`FakeChunkStore` instead of storage nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from chainfs.common.rpc.meta_client import FRAME_PREFIX, MetaClient, UserInfo
from chainfs.kv import KVStore
from chainfs.kv import open as kv_open
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.namespace import Namespace
from chainfs.meta_service.server import MetaServer, StaticCluster
from chainfs.meta_service.service import NAMESPACE_METHODS

CHAINS = list(range(1, 9))
ROOT = UserInfo(0, 0, ())


class FakeChunkStore:
    """Chunk lengths per (chain, inode, index), with the StorageClient methods meta uses."""

    def __init__(self) -> None:
        self.chunks: dict[tuple[int, int, int], int] = {}
        self.calls: list[tuple[str, int, int]] = []

    def write(self, layout_chains: list[int], chunk_size: int, ino: int, size: int) -> None:
        """Pretend a client wrote bytes [0, size) of a file."""
        index = 0
        while index * chunk_size < size:
            chain = layout_chains[index % len(layout_chains)]
            self.chunks[(chain, ino, index)] = min(chunk_size, size - index * chunk_size)
            index += 1

    def of(self, ino: int) -> dict[tuple[int, int], int]:
        return {(c, i): n for (c, x, i), n in self.chunks.items() if x == ino}

    async def query_last_chunk(self, chain_id: int, inode: int) -> tuple[int, int] | None:
        self.calls.append(("query", chain_id, inode))
        mine = [(i, n) for (c, x, i), n in self.chunks.items() if c == chain_id and x == inode]
        return max(mine) if mine else None

    async def remove_chunks(
        self, chain_id: int, inode: int, begin_index: int = 0, end_index: int = 2**32
    ) -> int:
        self.calls.append(("remove", chain_id, inode))
        doomed = [
            k
            for k in self.chunks
            if k[0] == chain_id and k[1] == inode and begin_index <= k[2] < end_index
        ]
        for k in doomed:
            del self.chunks[k]
        return len(doomed)

    async def truncate(
        self, chain_id: int, inode: int, chunk_index: int, length: int, chunk_size: int
    ) -> None:
        self.calls.append(("truncate", chain_id, inode))
        assert 0 <= length <= chunk_size
        self.chunks[(chain_id, inode, chunk_index)] = length


class _DirectStub:
    """Calls the Namespace without gRPC (in-process gRPC costs ~2 ms a call);
    requests and answers still go through protobuf serialization."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    def __getattr__(self, rpc: str) -> Any:
        fn = getattr(self.ns, NAMESPACE_METHODS[rpc])

        async def call(request: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
            rsp = await fn(type(request).FromString(request.SerializeToString()))
            return type(rsp).FromString(rsp.SerializeToString())

        return call


class DirectMetaClient(MetaClient):
    """MetaClient whose calls go straight to one server's Namespace."""

    def __init__(self, ns: Namespace, **kwargs: Any) -> None:
        super().__init__("direct:0", **kwargs)
        self._direct = _DirectStub(ns)

    def _stub(self, address: str) -> Any:
        return self._direct


@dataclass
class MetaEnv:
    server: MetaServer
    client: MetaClient  # over gRPC
    direct: MetaClient  # same API, no gRPC
    storage: FakeChunkStore
    kv: KVStore
    cfg: MetaConfig

    @property
    def ns(self) -> Namespace:
        assert self.server.ns is not None
        return self.server.ns

    def as_user(self, uid: int, gid: int, gids: tuple[int, ...] = ()) -> MetaClient:
        c = DirectMetaClient(self.ns, user=UserInfo(uid, gid, gids))
        self.extra.append(c)
        return c

    def __post_init__(self) -> None:
        self.extra: list[MetaClient] = []


def make_config(**overrides: object) -> MetaConfig:
    cfg = MetaConfig(static_chains=CHAINS, default_stripe=4)
    cfg.alloc_batch = 16  # small batches: the allocator's refill path runs in tests
    cfg.gc_interval_ms = 20
    cfg.session_prune_interval_ms = 20
    cfg.idempotency_clean_interval_ms = 20
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


@asynccontextmanager
async def served(
    kv: KVStore, timeout_s: float = 10.0, **overrides: object
) -> AsyncIterator[tuple[MetaServer, DirectMetaClient]]:
    """A real MetaServer on ``kv`` (``make_config(**overrides)``, the fixed chains,
    a FakeChunkStore) and a DirectMetaClient of root on it. On the way out the
    client and the server stop and ``kv`` is closed, whatever failed."""
    server = MetaServer(
        make_config(**overrides), kv=kv, storage=FakeChunkStore(), cluster=StaticCluster(CHAINS)
    )
    client: DirectMetaClient | None = None
    try:
        await server.start()
        assert server.ns is not None
        client = DirectMetaClient(server.ns, user=ROOT, timeout_s=timeout_s)
        yield server, client
    finally:
        if client is not None:
            await client.aclose()
        await server.stop()
        await kv.close()


async def start_env(**overrides: object) -> MetaEnv:
    cfg = make_config(**overrides)
    kv = kv_open("memory://")
    storage = FakeChunkStore()
    server = MetaServer(cfg, kv=kv, storage=storage, cluster=StaticCluster(CHAINS))
    await server.start()
    client = MetaClient(server.rpc_address, user=ROOT, timeout_s=10.0)
    assert server.ns is not None
    direct = DirectMetaClient(server.ns, user=ROOT, timeout_s=10.0)
    return MetaEnv(server, client, direct, storage, kv, cfg)


async def stop_env(env: MetaEnv) -> None:
    for c in env.extra:
        await c.aclose()
    await env.client.aclose()
    await env.direct.aclose()
    await env.server.stop()
    await env.kv.close()


@pytest.fixture
async def env() -> AsyncIterator[MetaEnv]:
    e = await start_env()
    try:
        yield e
    finally:
        await stop_env(e)


class SilentServer:
    """A framed-transport address that accepts connections and never answers
    (a hung meta server: no reset, no reply); ``connections`` counts them."""

    def __init__(self) -> None:
        self.address = ""
        self.connections = 0
        self._held: list[asyncio.StreamWriter] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._held.append(writer)
        while await reader.read(65536):
            pass


@pytest.fixture
async def silent() -> AsyncIterator[SilentServer]:
    s = SilentServer()
    server = await asyncio.start_server(s._accept, "127.0.0.1", 0)
    s.address = f"{FRAME_PREFIX}127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield s
    finally:
        for w in s._held:
            w.close()
        server.close()
