"""Data-plane bounds against hostile or careless peers: header cap and pool-held
headers, per-connection pool quota, slow senders under pool pressure, idle
connections, per-address and reserved connection slots, unix-socket fallback."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from chainfs.common.dataplane import DataPlaneConfig, Request, Response
from chainfs.common.dataplane.buffers import BufferPool, size_class
from chainfs.common.dataplane.frame import encode_fixed
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import mgmt_pb2 as mp
from chainfs.storage_service.config import StorageConfig
from chainfs.storage_service.node import is_storage_host
from tests.unit.dataplane.test_dataplane import (
    ECHO,
    MiB,
    _Env,
    _raw_connect,
    _read_until_closed,
    _small_cfg,
    _until,
    env,
)

pytestmark = pytest.mark.timeout(60)
__all__ = ["env"]  # the fixture, imported for these tests

HOLD = 9  # a handler that waits until released


def _raw_from(source_host: str, address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10, source_address=(source_host, 0))


async def test_header_over_the_request_cap_closes_the_connection(env: _Env) -> None:
    server = await env.server(cfg=_small_cfg(max_request_header_bytes=MiB))
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        # The 41-byte frame that used to make a server allocate 16 MiB.
        raw.sendall(encode_fixed(0, ECHO, 1, 16 * MiB, 0, 0) + b"x")
        assert await asyncio.to_thread(_read_until_closed, raw) == b""
    finally:
        raw.close()
    await _until(lambda: server.stats["bad_frames"] == 1)
    assert server.pool.in_use_bytes == 0


async def test_big_header_is_held_in_the_pool_and_served(env: _Env) -> None:
    cfg = _small_cfg(recv_staging_bytes=64 * 1024, max_request_header_bytes=MiB)
    server = await env.server(cfg=cfg)
    header = os.urandom(512 * 1024)
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        raw.sendall(encode_fixed(0, ECHO, 7, len(header), 0, 0) + header[:1000])
        await _until(lambda: server.pool.in_use_bytes == size_class(len(header)))
        raw.sendall(header[1000:])
        await _until(lambda: server.stats["requests"] == 1)
    finally:
        raw.close()
    await _until(lambda: server.connections == 0)
    assert server.pool.in_use_bytes == 0


async def test_one_connection_holds_at_most_its_pool_quota(env: _Env) -> None:
    release = asyncio.Event()

    async def hold(req: Request) -> Response:
        if req.msg_type == HOLD:
            await release.wait()
        return Response(req.msg_type, b"ok")

    cfg = _small_cfg(max_pool_bytes_per_connection=8 * MiB, buffer_pool_bytes=16 * MiB)
    server = await env.server(hold, cfg=cfg)
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        body = bytes(4 * MiB)
        frames = b"".join(encode_fixed(0, HOLD, i, 0, 0, len(body)) + body for i in range(1, 4))
        sender = asyncio.create_task(asyncio.to_thread(raw.sendall, frames))
        await _until(lambda: server.stats["requests"] == 2)
        assert server.pool.in_use_bytes == 8 * MiB  # the third waits for this connection's own
        # Another client is not starved by it.
        reply = await env.client().request(server.address, ECHO, b"", [bytes(4 * MiB)])
        assert reply.header == b"ok"
        release.set()
        await sender
        await _until(lambda: server.stats["requests"] == 4)
    finally:
        raw.close()


async def test_stalled_senders_lose_their_pool_space_to_waiting_clients(env: _Env) -> None:
    cfg = _small_cfg(
        buffer_pool_bytes=8 * MiB,
        max_pool_bytes_per_connection=4 * MiB,
        frame_stall_timeout_ms=60_000,  # only the pressure rule may act here
        pool_pressure_window_ms=200,
    )
    server = await env.server(cfg=cfg)
    stalled = [await asyncio.to_thread(_raw_connect, server.address) for _ in range(3)]
    try:
        for s in stalled:
            s.sendall(encode_fixed(0, ECHO, 1, 0, 0, 4 * MiB) + b"x")
        await _until(lambda: server.pool.in_use_bytes == 8 * MiB)
        data = os.urandom(4 * MiB)
        reply = await env.client().request(server.address, ECHO, b"mine", [data])
        assert bytes(reply.payload) == data
        assert server.stats["slow_senders_closed"] >= 1
    finally:
        for s in stalled:
            s.close()


async def test_idle_connection_is_closed_and_the_client_reconnects(env: _Env) -> None:
    cfg = _small_cfg(idle_timeout_ms=300)
    server = await env.server(cfg=cfg)
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        assert await asyncio.to_thread(_read_until_closed, raw) == b""
    finally:
        raw.close()
    client = env.client(_small_cfg(client_idle_timeout_ms=60_000))
    assert (await client.request(server.address, ECHO, b"1", [b"a"])).header == b"1"
    await _until(lambda: server.connections == 0)
    assert server.stats["idle_closed"] == 2
    # The server closed the client's idle connection: the next request just works.
    assert (await client.request(server.address, ECHO, b"2", [b"b"])).header == b"2"


async def test_client_closes_its_idle_connections_first(env: _Env) -> None:
    server = await env.server()
    client = env.client(_small_cfg(client_idle_timeout_ms=200, liveness_check_ms=50))
    await client.request(server.address, ECHO, b"", [b"a"])
    await _until(lambda: client.connection_count(server.address) == 0)
    await _until(lambda: server.connections == 0)
    assert server.stats["idle_closed"] == 0


async def test_per_address_cap_leaves_room_for_other_hosts(env: _Env) -> None:
    server = await env.server(cfg=_small_cfg(max_connections_per_address=3))
    flood = [await asyncio.to_thread(_raw_from, "127.0.0.2", server.address) for _ in range(5)]
    try:
        await _until(lambda: server.stats["refused_connections"] == 2)
        assert server.connections == 3
        reply = await env.client().request(server.address, ECHO, b"served", [b"x"])
        assert reply.header == b"served"
    finally:
        for s in flood:
            s.close()


async def test_reserved_slots_are_for_cluster_peers_only(env: _Env) -> None:
    cfg = _small_cfg(max_server_connections=4, reserved_peer_connections=2)
    server = await env.server(cfg=cfg)
    server.is_cluster_peer = lambda host: host == "127.0.0.3"
    socks = [await asyncio.to_thread(_raw_from, "127.0.0.2", server.address) for _ in range(3)]
    try:
        await _until(lambda: server.stats["refused_connections"] == 1)
        assert server.connections == 2
        for _ in range(2):
            socks.append(await asyncio.to_thread(_raw_from, "127.0.0.3", server.address))
        await _until(lambda: server.connections == 4)
        assert server.stats["refused_connections"] == 1
    finally:
        for s in socks:
            s.close()


async def test_unix_socket_is_owner_only(env: _Env, tmp_path: Path) -> None:
    path = str(tmp_path / "dp.sock")
    await env.server(unix_path=path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("case", ["missing", "stale"])
async def test_unusable_unix_socket_falls_back_to_tcp(env: _Env, tmp_path: Path, case: str) -> None:
    server = await env.server()
    path = str(tmp_path / "gone.sock")
    if case == "stale":  # a socket file nobody listens on: ECONNREFUSED
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
    client = env.client()
    client.unix_fallbacks["unix:" + path] = server.address
    reply = await client.request("unix:" + path, ECHO, b"via tcp", [b"x"])
    assert reply.header == b"via tcp"


def test_config_rejects_caps_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="max_pool_bytes_per_connection"):
        DataPlaneConfig(max_pool_bytes_per_connection=MiB).validate()
    with pytest.raises(ValueError, match="reserved_peer_connections"):
        DataPlaneConfig(max_server_connections=10, reserved_peer_connections=10).validate()
    with pytest.raises(ValueError, match="max_request_header_bytes"):
        DataPlaneConfig(max_request_header_bytes=0).validate()


async def test_client_refuses_a_request_header_servers_would_drop(env: _Env) -> None:
    server = await env.server()
    client = env.client(_small_cfg(max_request_header_bytes=64 * 1024))
    with pytest.raises(ChainfsError) as e:
        await client.request(server.address, ECHO, bytes(64 * 1024 + 1))
    assert e.value.code == Code.E2BIG
    assert server.stats["bad_frames"] == 0


def test_storage_header_cap_holds_its_largest_batch_read() -> None:
    cfg = StorageConfig()
    cfg.validate()
    cfg.max_batch_read_ios = cfg.dataplane.max_request_header_bytes  # ~50 bytes each: too many
    with pytest.raises(ValueError, match="max_batch_read_ios"):
        cfg.validate()


def test_reserved_slots_go_to_storage_hosts_and_the_unix_socket() -> None:
    info = mp.RoutingInfo(
        nodes=[
            mp.NodeInfo(node_id=1, type=mp.STORAGE, data_address="10.0.0.5:9000"),
            mp.NodeInfo(node_id=2, type=mp.STORAGE, data_address="[fd00::7]:9000"),
            mp.NodeInfo(node_id=3, type=mp.META, data_address="10.0.0.9:9000"),
        ]
    )
    routing = Routing(info)
    assert is_storage_host(routing, "10.0.0.5")
    assert is_storage_host(routing, "fd00::7")
    assert is_storage_host(routing, "unix")  # owner-only socket: the service's own user
    assert not is_storage_host(routing, "10.0.0.9")  # a meta server is not a chain peer
    assert not is_storage_host(routing, "10.0.0.6")
    assert not is_storage_host(None, "10.0.0.5")  # no routing yet: nobody by address


async def test_peer_not_reading_replies_is_dropped_when_their_pool_is_wanted(env: _Env) -> None:
    reply = bytes(8 * MiB)

    async def big(req: Request) -> Response:
        return Response(req.msg_type, b"", payload=[reply])

    cfg = _small_cfg(
        max_payload_bytes=8 * MiB, frame_stall_timeout_ms=60_000, pool_pressure_window_ms=200
    )
    server = await env.server(big, cfg=cfg)
    reply_pool = BufferPool(8 * MiB, 0)  # where replies' buffers would come from
    server.pressure_pools.append(reply_pool)
    held = reply_pool.try_acquire(8 * MiB)
    assert held is not None
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.sendall(encode_fixed(0, ECHO, 1, 0, 0, 0))  # and never read the reply
        await _until(lambda: server.stats["requests"] == 1)
        waiter = asyncio.ensure_future(reply_pool.acquire(MiB))
        await _until(lambda: server.stats["slow_senders_closed"] == 1)
        held.release()
        (await waiter).release()
    finally:
        raw.close()
