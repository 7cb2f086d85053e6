"""The data-plane transport: bytes arrive identical, errors are precise, bad peers are contained."""

from __future__ import annotations

import array
import asyncio
import contextvars
import errno
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from chainfs.common.dataplane import (
    DataClient,
    DataPlaneConfig,
    DataServer,
    FileRegion,
    Request,
    Response,
)
from chainfs.common.dataplane.frame import FIXED_HEADER_SIZE, FLAG_RESPONSE, encode_fixed
from chainfs.common.dataplane.server import run_eagerly
from chainfs.common.errors import ChainfsError, Code

pytestmark = pytest.mark.timeout(60)
MiB = 1024 * 1024

ECHO, SLOW, FAIL, FILE, STALL = 1, 2, 3, 4, 5


def _small_cfg(**kw: int) -> DataPlaneConfig:
    base = dict(
        max_payload_bytes=4 * MiB,
        buffer_pool_bytes=16 * MiB,
        buffer_pool_cached_bytes=8 * MiB,
    )
    base.update(kw)
    return DataPlaneConfig(**base)


async def _echo(req: Request) -> Response:
    return Response(req.msg_type, req.header, payload=[req.payload])


async def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``cond`` with a bounded deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class _Env:
    def __init__(self) -> None:
        self.servers: list[DataServer] = []
        self.clients: list[DataClient] = []

    async def server(
        self,
        handler: Callable[[Request], Response | Awaitable[Response]] = _echo,
        cfg: DataPlaneConfig | None = None,
        unix_path: str | None = None,
    ) -> DataServer:
        s = DataServer(handler, unix_path=unix_path, config=cfg or _small_cfg())
        await s.start()
        self.servers.append(s)
        return s

    def client(self, cfg: DataPlaneConfig | None = None) -> DataClient:
        c = DataClient(cfg or _small_cfg())
        self.clients.append(c)
        return c


@pytest.fixture
async def env() -> AsyncIterator[_Env]:
    e = _Env()
    try:
        yield e
    finally:
        for c in e.clients:
            await c.close()
        for s in e.servers:
            await s.stop()
            assert s.pool.in_use_bytes == 0, "pooled buffers leaked"


def _raw_connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


# ---- echo -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 4095, 4096, 65535, 65536, 65537, MiB + 3, 4 * MiB - 1])
async def test_echo_sizes_byte_identical(env: _Env, size: int) -> None:
    server = await env.server()
    client = env.client()
    data = random.Random(size).randbytes(size)
    reply = await client.request(server.address, ECHO, b"hdr-%d" % size, [data])
    assert reply.msg_type == ECHO
    assert reply.header == b"hdr-%d" % size
    assert reply.payload_len == size
    assert reply.payload.tobytes() == data


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("size", [16 * MiB, 64 * MiB])
async def test_echo_large_payload_uvloop(env: _Env, size: int) -> None:
    cfg = DataPlaneConfig()  # production bounds: 64 MiB + slack
    server = await env.server(cfg=cfg)
    client = env.client(cfg)
    data = os.urandom(size)
    # Several scatter-gather pieces on the way out; one fresh buffer on the way back.
    pieces = [memoryview(data)[i : i + 7 * MiB] for i in range(0, size, 7 * MiB)]
    reply = await client.request(server.address, ECHO, b"", pieces)
    assert reply.payload_len == size
    assert reply.payload == data


async def test_header_larger_than_staging(env: _Env) -> None:
    cfg = _small_cfg(recv_staging_bytes=8192)
    server = await env.server(cfg=cfg)
    client = env.client(cfg)
    header = os.urandom(100_000)
    data = os.urandom(300_000)
    reply = await client.request(server.address, ECHO, header, [data])
    assert reply.header == header
    assert reply.payload == data


async def test_unix_socket_echo(env: _Env, tmp_path: Path) -> None:
    path = str(tmp_path / "dp.sock")
    server = await env.server(unix_path=path)
    client = env.client()
    assert server.unix_address == f"unix:{path}"
    data = os.urandom(3 * MiB + 11)
    reply = await client.request(f"unix:{path}", ECHO, b"u", [data])
    assert reply.header == b"u"
    assert reply.payload == data


# ---- concurrency ----------------------------------------------------------------


async def test_many_concurrent_requests_on_one_connection(env: _Env) -> None:
    order: list[int] = []

    async def handler(req: Request) -> Response:
        i = int(req.header)
        # Later requests finish first: responses must be matched by request id.
        await asyncio.sleep((200 - i) * 0.0002)
        order.append(i)
        return Response(ECHO, req.header, payload=[req.payload, b"!"])

    cfg = _small_cfg(max_connections_per_peer=1, max_inflight_per_connection=32)
    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice([0, 10, 5000, 70_000, 300_000])) for _ in range(200)]
    replies = await asyncio.gather(
        *(client.request(server.address, ECHO, b"%d" % i, [p]) for i, p in enumerate(payloads))
    )
    for i, (p, r) in enumerate(zip(payloads, replies, strict=True)):
        assert r.header == b"%d" % i
        assert r.payload == p + b"!"
    assert client.connection_count(server.address) == 1
    assert order != sorted(order), "responses were not reordered; the test proves nothing"
    assert server.stats["connections"] == 1


async def test_connections_spread_up_to_the_bound(env: _Env) -> None:
    gate = asyncio.Event()

    async def handler(req: Request) -> Response:
        await gate.wait()
        return Response(ECHO, req.header)

    cfg = _small_cfg(max_connections_per_peer=3, max_inflight_per_connection=4)
    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    tasks = [
        asyncio.create_task(client.request(server.address, ECHO, b"%d" % i)) for i in range(20)
    ]
    # 3 connections x 4 in flight = 12 requests reach the server; the rest wait.
    await _until(lambda: server.stats["requests"] == 12)
    assert client.connection_count(server.address) == 3
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert [r.header for r in replies] == [b"%d" % i for i in range(20)]
    assert client.connection_count(server.address) == 3


# ---- payload sink ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, 65536, 5 * MiB // 2])
async def test_payload_sink_receives_into_caller_buffers(env: _Env, size: int) -> None:
    server = await env.server()
    client = env.client()
    data = os.urandom(size)
    # Three destination pieces of uneven sizes, one of them a non-byte memoryview.
    a = bytearray(size // 3)
    b = array.array("I", bytes((size // 3 + 3) // 4 * 4))
    c = bytearray(size - len(a) - b.itemsize * len(b) + 5)  # 5 bytes of spare room
    seen: list[tuple[int, bytes]] = []

    def sink(msg_type: int, header: bytes) -> list[memoryview | bytearray]:
        seen.append((msg_type, header))
        return [a, memoryview(b), c]

    reply = await client.request(server.address, ECHO, b"sink", [data], payload_sink=sink)
    assert reply.payload_len == size
    assert len(reply.payload) == 0
    got = bytes(a) + b.tobytes() + bytes(c)
    assert got[:size] == data
    assert got[size:] == bytes(5)
    if size:
        assert seen == [(ECHO, b"sink")]


async def test_payload_sink_too_small_fails_request_not_connection(env: _Env) -> None:
    cfg = _small_cfg(max_connections_per_peer=1)
    server = await env.server(cfg=cfg)
    client = env.client(cfg)
    with pytest.raises(ChainfsError) as ei:
        await client.request(
            server.address, ECHO, b"", [bytes(1000)], payload_sink=lambda t, h: [bytearray(10)]
        )
    assert ei.value.code == Code.EINVAL
    reply = await client.request(server.address, ECHO, b"after", [b"x" * 100])
    assert reply.payload == b"x" * 100
    assert server.stats["connections"] == 1


async def test_payload_sink_errors_and_error_replies(env: _Env) -> None:
    async def handler(req: Request) -> Response:
        if req.header == b"fail":
            raise ChainfsError(Code.CHUNK_NOT_FOUND, "gone")
        return Response(ECHO, req.header, payload=[req.payload])

    cfg = _small_cfg(max_connections_per_peer=1)
    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    calls: list[bytes] = []

    def broken_sink(msg_type: int, header: bytes) -> list[bytearray]:
        calls.append(header)
        raise ValueError("caller's sink is broken")

    with pytest.raises(ValueError, match="broken"):
        await client.request(server.address, ECHO, b"x", [bytes(200_000)], payload_sink=broken_sink)
    with pytest.raises(ChainfsError) as ei:  # the sink is not called for an error reply
        await client.request(server.address, ECHO, b"fail", [b"abc"], payload_sink=broken_sink)
    assert ei.value.code == Code.CHUNK_NOT_FOUND
    reply = await client.request(server.address, ECHO, b"y", payload_sink=broken_sink)
    assert reply.payload_len == 0  # nor for an empty payload
    assert calls == [b"x"]
    reply = await client.request(server.address, ECHO, b"z", [b"q" * 300_000])
    assert reply.payload == b"q" * 300_000
    assert server.stats["connections"] == 1


# ---- sendfile -----------------------------------------------------------------------


async def test_file_regions_sent_with_sendfile(env: _Env, tmp_path: Path) -> None:
    blob = os.urandom(3 * MiB + 123)
    path = tmp_path / "chunk"
    path.write_bytes(blob)
    done: list[bool] = []

    async def handler(req: Request) -> Response:
        off, length = struct.unpack("<QQ", req.header)
        fd = os.open(path, os.O_RDONLY)

        def on_done(sent: bool) -> None:
            os.close(fd)
            done.append(sent)

        # memory, file, memory, file: the order on the wire is the order given.
        return Response(
            FILE,
            b"ok",
            payload=[b"<", FileRegion(fd, off, length), b">"],
            file_regions=[FileRegion(fd, 0, 10)],
            on_done=on_done,
        )

    server = await env.server(handler)
    client = env.client()
    for off, length in [(0, len(blob)), (5, 1), (MiB - 1, 2 * MiB + 7), (100, 0)]:
        reply = await client.request(server.address, FILE, struct.pack("<QQ", off, length))
        assert reply.payload == b"<" + blob[off : off + length] + b">" + blob[:10]
    assert done == [True] * 4


async def test_file_region_past_end_of_file_drops_connection(env: _Env, tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"abc")

    async def handler(req: Request) -> Response:
        fd = os.open(path, os.O_RDONLY)
        return Response(
            FILE, b"", file_regions=[FileRegion(fd, 0, 100)], on_done=lambda s: os.close(fd)
        )

    server = await env.server(handler)
    client = env.client()
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, FILE, b"")
    assert ei.value.code in (Code.BAD_FRAME, Code.UNAVAILABLE)


# ---- errors ---------------------------------------------------------------------------


async def test_handler_errors_carry_code_and_errno(env: _Env) -> None:
    async def handler(req: Request) -> Response:
        if req.header == b"enoent":
            raise ChainfsError(Code.ENOENT, "no such chunk")
        if req.header == b"stale":
            raise ChainfsError(Code.STALE_CHAIN_VERSION, "chain 7 is at version 3")
        if req.header == b"bug":
            raise ValueError("boom")
        return Response(ECHO, b"fine")

    server = await env.server(handler, cfg=_small_cfg(max_connections_per_peer=1))
    client = env.client(_small_cfg(max_connections_per_peer=1))
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, FAIL, b"enoent", [b"payload ignored"])
    assert (ei.value.code, ei.value.errno, ei.value.message) == (
        Code.ENOENT,
        errno.ENOENT,
        "no such chunk",
    )
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, FAIL, b"stale")
    assert ei.value.code == Code.STALE_CHAIN_VERSION
    assert ei.value.errno == errno.EAGAIN
    assert ei.value.retryable
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, FAIL, b"bug")
    assert ei.value.code == Code.INTERNAL
    assert "boom" in ei.value.message
    # The connection survives error replies.
    assert (await client.request(server.address, ECHO, b"ok")).header == b"fine"
    assert server.stats["connections"] == 1


async def test_a_handler_may_answer_at_once_or_later(env: _Env) -> None:
    """A handler returning a Response is answered without a task (payload sent,
    on_done called, buffer returned); raising at once gives the error frame; an
    awaitable it returns is awaited. Requests of one connection mix freely."""
    release = asyncio.Event()
    sent: list[bool] = []

    async def later(req: Request) -> Response:
        await release.wait()
        return Response(ECHO, b"later:" + req.header, payload=[req.payload])

    def handler(req: Request) -> Response | Awaitable[Response]:
        if req.header == b"now":
            return Response(ECHO, b"now", payload=[bytes(req.payload)], on_done=sent.append)
        if req.header == b"refused":
            raise ChainfsError(Code.EPERM, "not yours")
        if req.header == b"bug":
            raise ValueError("boom")
        return later(req)

    server = await env.server(handler)
    client = env.client()
    slow = asyncio.ensure_future(client.request(server.address, ECHO, b"x", [b"late"]))
    got = await client.request(server.address, ECHO, b"now", [b"p" * 5000])
    assert (got.header, bytes(got.payload)) == (b"now", b"p" * 5000)
    await _until(lambda: sent == [True])
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"refused")
    assert ei.value.code == Code.EPERM and ei.value.message == "not yours"
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"bug")
    assert ei.value.code == Code.INTERNAL and "boom" in ei.value.message
    assert not slow.done()
    release.set()
    late = await slow
    assert (late.header, bytes(late.payload)) == (b"later:x", b"late")
    await _until(lambda: server.pool.in_use_bytes == 0)
    assert server.stats["errors"] == 2


async def test_an_eager_handler_keeps_its_context_across_waits(env: _Env) -> None:
    """run_eagerly: a coroutine that never waits is answered at once, one that
    waits goes on where it stopped; a context variable it set before the wait
    is still set after it, and never leaks into the loop's own context;
    errors before and after the wait reach the caller with their code."""
    caller: contextvars.ContextVar[bytes] = contextvars.ContextVar("caller", default=b"")
    release = asyncio.Event()

    async def handler(req: Request) -> Response:
        caller.set(req.header)
        if req.header.startswith(b"wait"):
            await release.wait()
        if req.header.endswith(b"fail"):
            raise ChainfsError(Code.ENOENT, "gone")
        return Response(ECHO, caller.get(), payload=[req.payload])

    server = await env.server(run_eagerly(handler))
    client = env.client()
    waiting = [
        asyncio.ensure_future(client.request(server.address, ECHO, b"wait%d" % i, [b"w"]))
        for i in range(3)
    ]
    failing = asyncio.ensure_future(client.request(server.address, ECHO, b"wait-fail"))
    got = await client.request(server.address, ECHO, b"now", [b"n"])
    assert (got.header, bytes(got.payload)) == (b"now", b"n")
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"now-fail")
    assert ei.value.code == Code.ENOENT
    assert not any(f.done() for f in waiting)
    release.set()
    assert [(await f).header for f in waiting] == [b"wait0", b"wait1", b"wait2"]
    with pytest.raises(ChainfsError) as ei:
        await failing
    assert ei.value.code == Code.ENOENT
    assert caller.get() == b""
    await _until(lambda: server.pool.in_use_bytes == 0)


async def test_request_timeout_then_connection_still_works(env: _Env) -> None:
    release = asyncio.Event()

    async def handler(req: Request) -> Response:
        if req.header == b"slow":
            await release.wait()
        return Response(ECHO, req.header, payload=[req.payload])

    cfg = _small_cfg(max_connections_per_peer=1)
    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, SLOW, b"slow", [b"x" * 200_000], timeout_s=0.2)
    assert ei.value.code == Code.ETIMEDOUT
    assert server.address in ei.value.message
    release.set()  # the late reply arrives and is dropped
    reply = await client.request(server.address, ECHO, b"fast", [b"y" * 200_000])
    assert reply.payload == b"y" * 200_000
    assert server.stats["connections"] == 1


async def test_unreachable_peer_fails_fast_with_unavailable(env: _Env, tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    client = env.client()
    for address in (f"127.0.0.1:{port}", f"unix:{tmp_path}/nobody.sock"):
        with pytest.raises(ChainfsError) as ei:
            await client.request(address, ECHO, b"", timeout_s=30)
        assert ei.value.code == Code.UNAVAILABLE
        assert address in ei.value.message
    with pytest.raises(ChainfsError) as ei:
        await client.request("no-port-here", ECHO, b"")
    assert ei.value.code == Code.EINVAL


async def test_server_stop_fails_inflight_requests(env: _Env) -> None:
    async def handler(req: Request) -> Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    server = await env.server(handler)
    client = env.client()
    task = asyncio.create_task(client.request(server.address, SLOW, b""))
    await _until(lambda: server.stats["requests"] == 1)
    await server.stop()
    with pytest.raises(ChainfsError) as ei:
        await task
    assert ei.value.code in (Code.UNAVAILABLE, Code.BAD_FRAME)


# ---- bounds and malformed input ----------------------------------------------------------


async def test_oversized_payload_rejected_by_client_before_sending(env: _Env) -> None:
    server = await env.server()
    client = env.client()
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"", [bytes(4 * MiB + 1)])
    assert ei.value.code == Code.E2BIG
    assert server.stats["requests"] == 0


@pytest.mark.parametrize("field", ["payload", "header", "magic", "crc", "flags"])
async def test_bad_frame_closes_only_that_connection(env: _Env, field: str) -> None:
    server = await env.server()
    client = env.client()
    fixed = bytearray(encode_fixed(0, ECHO, 1, 10, 0, 10))
    if field == "payload":
        fixed = bytearray(encode_fixed(0, ECHO, 1, 0, 0, 4 * MiB + 1))
    elif field == "header":
        fixed = bytearray(encode_fixed(0, ECHO, 1, 16 * MiB + 1, 0, 0))
    elif field == "magic":
        fixed[0] ^= 0xFF
    elif field == "crc":
        fixed[8] ^= 0x01  # request id changed after the CRC was computed
    elif field == "flags":
        fixed = bytearray(encode_fixed(FLAG_RESPONSE, ECHO, 1, 0, 0, 0))
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        raw.sendall(bytes(fixed) + bytes(20))
        assert await asyncio.to_thread(_read_until_closed, raw) == b""
    finally:
        raw.close()
    await _until(lambda: server.stats["bad_frames"] == 1)
    reply = await client.request(server.address, ECHO, b"still serving", [b"z"])
    assert reply.header == b"still serving"


async def test_dropped_mid_frame_releases_the_buffer(env: _Env) -> None:
    server = await env.server()
    raw = await asyncio.to_thread(_raw_connect, server.address)
    raw.sendall(encode_fixed(0, ECHO, 1, 3, 0, 2 * MiB) + b"hdr" + bytes(MiB))
    await _until(lambda: server.pool.in_use_bytes > 0)
    raw.close()
    await _until(lambda: server.connections == 0)
    assert server.pool.in_use_bytes == 0
    assert server.stats["bad_frames"] == 0  # a peer that went away sent nothing malformed
    assert server.stats["requests"] == 0


async def test_stalled_frame_is_closed_by_the_watchdog(env: _Env) -> None:
    server = await env.server(cfg=_small_cfg(frame_stall_timeout_ms=200))
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        raw.sendall(encode_fixed(0, ECHO, 1, 0, 0, MiB) + bytes(1000))
        assert await asyncio.to_thread(_read_until_closed, raw) == b""
    finally:
        raw.close()
    assert server.pool.in_use_bytes == 0


async def test_peer_that_stops_reading_replies_is_dropped(env: _Env) -> None:
    server = await env.server(cfg=_small_cfg(frame_stall_timeout_ms=300))
    raw = await asyncio.to_thread(_raw_connect, server.address)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = bytes(MiB)
        frames = b"".join(encode_fixed(0, ECHO, i, 0, 0, len(body)) + body for i in range(8))
        await asyncio.to_thread(raw.sendall, frames)  # echoes pile up: we never read
        await _until(lambda: server.connections == 0)
    finally:
        raw.close()
    assert server.pool.in_use_bytes == 0


async def test_client_gets_bad_frame_when_reply_is_over_its_bound(env: _Env) -> None:
    async def handler(req: Request) -> Response:
        return Response(ECHO, b"", payload=[bytes(MiB + 1)])

    server = await env.server(handler)
    client = env.client(_small_cfg(max_payload_bytes=MiB))
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"")
    assert ei.value.code == Code.BAD_FRAME
    assert "bound" in ei.value.message


async def test_server_dropping_mid_reply_fails_pending_and_keeps_sink_untouched() -> None:
    """A fake server sends half a reply and stalls: the client times out and
    never writes into the caller's sink after that, even when the rest comes."""
    proceed = asyncio.Event()
    got_request = asyncio.Event()

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fixed = await reader.readexactly(FIXED_HEADER_SIZE)
        rid = struct.unpack_from("<Q", fixed, 8)[0]
        got_request.set()
        body = b"\xab" * (2 * MiB)
        writer.write(encode_fixed(FLAG_RESPONSE, ECHO, rid, 0, 0, len(body)) + body[:MiB])
        await writer.drain()
        await proceed.wait()
        writer.write(body[MiB:])
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(fake, "127.0.0.1", 0)
    address = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    client = DataClient(_small_cfg())
    sink_buf = bytearray(2 * MiB)
    try:
        with pytest.raises(ChainfsError) as ei:
            await client.request(
                address, ECHO, b"", payload_sink=lambda t, h: [sink_buf], timeout_s=0.5
            )
        assert ei.value.code == Code.ETIMEDOUT
        snapshot = bytes(sink_buf)
        proceed.set()
        # The fake sends the rest, then closes: the client has read every byte
        # of the reply once it sees that EOF and drops the connection.
        await _until(lambda: client.connection_count(address) == 0)
        assert bytes(sink_buf) == snapshot
        assert sink_buf[MiB:] == bytes(MiB)
    finally:
        await client.close()
        srv.close()
        await srv.wait_closed()


async def test_server_gone_mid_reply_is_unavailable_not_bad_frame() -> None:
    """A server that dies halfway through a reply is a lost connection
    (UNAVAILABLE: try another replica), and the connection is discarded."""

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fixed = await reader.readexactly(FIXED_HEADER_SIZE)
        rid = struct.unpack_from("<Q", fixed, 8)[0]
        writer.write(encode_fixed(FLAG_RESPONSE, ECHO, rid, 0, 0, 2 * MiB) + bytes(MiB))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(fake, "127.0.0.1", 0)
    address = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    client = DataClient(_small_cfg())
    try:
        with pytest.raises(ChainfsError) as ei:
            await client.request(address, ECHO, b"", timeout_s=10)
        assert ei.value.code == Code.UNAVAILABLE
        assert "mid-frame" in ei.value.message
        assert client.connection_count(address) == 0
    finally:
        await client.close()
        srv.close()
        await srv.wait_closed()


# ---- pooled buffers, backpressure, chain forwarding ------------------------------------------


@pytest.mark.parametrize("liveness_ms", [500, 1])
async def test_pool_bound_applies_backpressure_without_loss(env: _Env, liveness_ms: int) -> None:
    """Connections stop reading while the pool is full and resume with bytes
    already staged; liveness probes (every 1 ms here) must not jump the queue."""
    peak = 0

    async def handler(req: Request) -> Response:
        nonlocal peak
        peak = max(peak, server.pool.in_use_bytes)
        await asyncio.sleep(0.001)
        return Response(ECHO, req.header, payload=[req.payload])

    cfg = _small_cfg(
        max_payload_bytes=MiB,
        buffer_pool_bytes=3 * MiB,
        buffer_pool_cached_bytes=MiB,
        liveness_check_ms=liveness_ms,
    )
    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    for _ in range(3):
        payloads = [os.urandom(MiB - i) for i in range(24)]
        replies = await asyncio.gather(
            *(client.request(server.address, ECHO, b"%d" % i, [p]) for i, p in enumerate(payloads))
        )
        assert [r.payload.tobytes() for r in replies] == payloads
    assert 0 < peak <= 3 * MiB
    assert server.pool.in_use_bytes == 0
    assert server.stats["bad_frames"] == 0


async def test_mixed_frames_with_tiny_staging_and_constant_probes(env: _Env) -> None:
    """Every reader path at once: headers bigger than staging, payloads straddling
    staging and direct receive, pool waits, and a liveness probe every 1 ms."""
    cfg = _small_cfg(
        max_payload_bytes=512 * 1024,
        buffer_pool_bytes=MiB,
        buffer_pool_cached_bytes=256 * 1024,
        recv_staging_bytes=4096,
        direct_recv_min_bytes=1024,
        liveness_check_ms=1,
        max_inflight_per_connection=8,
        max_connections_per_peer=2,
    )

    async def handler(req: Request) -> Response:
        await asyncio.sleep(0)
        return Response(ECHO, req.header, payload=[req.payload[:7], req.payload[7:]])

    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    rng = random.Random(11)
    cases = [
        (
            rng.randbytes(rng.choice([0, 5, 4000, 4100, 20_000])),
            rng.randbytes(rng.randrange(0, 300_000)),
        )
        for _ in range(150)
    ]
    replies = await asyncio.gather(
        *(client.request(server.address, ECHO, h, [p]) for h, p in cases)
    )
    for (h, p), r in zip(cases, replies, strict=True):
        assert r.header == h
        assert r.payload == p
    assert server.stats["bad_frames"] == 0


async def test_chain_hop_forwards_the_received_buffer(env: _Env) -> None:
    tail_seen: list[bytes] = []

    async def tail(req: Request) -> Response:
        tail_seen.append(req.payload.tobytes())
        return Response(ECHO, b"tail-ack")

    tail_server = await env.server(tail)
    hop_client = env.client()

    async def head(req: Request) -> Response:
        # Forward the very buffer we received (no copy), then answer.
        ack = await hop_client.request(tail_server.address, ECHO, req.header, [req.payload])
        return Response(ECHO, ack.header)

    head_server = await env.server(head)
    client = env.client()
    blobs = [os.urandom(n) for n in (0, 10, MiB, 3 * MiB)]
    for blob in blobs:
        reply = await client.request(head_server.address, ECHO, b"w", [blob])
        assert reply.header == b"tail-ack"
    assert tail_seen == blobs


async def test_cancelled_request_does_not_disturb_others(env: _Env) -> None:
    gate = asyncio.Event()

    async def handler(req: Request) -> Response:
        if req.header == b"wait":
            await gate.wait()
        return Response(ECHO, req.header, payload=[req.payload])

    cfg = _small_cfg(max_connections_per_peer=1)
    server = await env.server(handler, cfg=cfg)
    client = env.client(cfg)
    task = asyncio.create_task(client.request(server.address, SLOW, b"wait", [b"a" * 1000]))
    await _until(lambda: server.stats["requests"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    reply = await client.request(server.address, ECHO, b"next", [b"b" * 1000])
    assert reply.payload == b"b" * 1000
    assert server.stats["connections"] == 1


# ---- resets (uvloop reports a reset socket to nobody: liveness probes find it) -----------

_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends a TCP reset


async def test_server_closes_idle_connection_reset_by_client(env: _Env) -> None:
    server = await env.server(cfg=_small_cfg(liveness_check_ms=50))
    raw = await asyncio.to_thread(_raw_connect, server.address)
    raw.sendall(encode_fixed(0, ECHO, 1, 0, 0, 3) + b"abc")
    reply = await asyncio.to_thread(raw.recv, 100)
    assert reply.endswith(b"abc")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    raw.close()
    await _until(lambda: server.connections == 0)


async def test_pending_request_fails_fast_when_server_resets() -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    address = f"127.0.0.1:{ls.getsockname()[1]}"

    def reset_after_request() -> None:
        conn, _ = ls.accept()
        conn.recv(FIXED_HEADER_SIZE)  # part of the request stays unread
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        conn.close()

    client = DataClient(_small_cfg(liveness_check_ms=50))
    try:
        peer = asyncio.create_task(asyncio.to_thread(reset_after_request))
        with pytest.raises(ChainfsError) as ei:
            await client.request(address, ECHO, b"", [bytes(100)], timeout_s=30)
        assert ei.value.code == Code.UNAVAILABLE  # not ETIMEDOUT: the reset was noticed
        assert address in ei.value.message
        await peer
    finally:
        await client.close()
        ls.close()


async def test_idle_connection_reset_by_server_is_replaced_transparently(env: _Env) -> None:
    cfg = _small_cfg(max_connections_per_peer=1)
    server = await env.server(cfg=cfg)
    client = env.client(cfg)
    assert (await client.request(server.address, ECHO, b"1")).header == b"1"
    for conn in list(server._conns):  # the server resets its side
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        conn.close()
    await _until(lambda: client.connection_count(server.address) == 0)  # the reset arrived
    reply = await client.request(server.address, ECHO, b"2", [b"data"])
    assert (reply.header, reply.payload.tobytes()) == (b"2", b"data")
    assert server.stats["connections"] == 2


async def test_accept_failure_pauses_the_listener_then_serves_again(
    env: _Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE on accept leaves the listener readable: the server must stop
    watching it for a while (no busy loop) and accept again afterwards."""
    server = await env.server()
    client = env.client()
    failures = 0

    def failing_accept(self: socket.socket) -> tuple[socket.socket, object]:
        nonlocal failures
        failures += 1
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket.socket, "accept", failing_accept)
    pending = asyncio.ensure_future(client.request(server.address, ECHO, b"x", [b"data"]))
    await _until(lambda: failures >= 1)
    assert server._accept_retry, "the listener is paused after a failed accept"
    monkeypatch.undo()
    reply = await pending
    assert (reply.header, reply.payload.tobytes()) == (b"x", b"data")
    assert not server._accept_retry


async def test_start_on_a_taken_port_names_the_address_and_leaks_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        s = DataServer(_echo, port=port, config=_small_cfg())
        with pytest.raises(OSError) as e:
            await s.start()
        assert e.value.errno == errno.EADDRINUSE
        assert f"127.0.0.1:{port}" in str(e.value)
        assert s._listeners == []


async def test_a_connect_that_fails_after_its_waiter_gave_up_is_not_left_unread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that accepts but never answers the credential: the request times
    out first, the connect a little later. Its failure must not be left for
    asyncio to log ("Task exception was never retrieved") with a traceback,
    which another thread's traceback formatting can collide with."""
    import gc

    from chainfs.proto import common_pb2 as cpb

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(4)  # the kernel accepts; nobody ever reads or answers
    port = mute.getsockname()[1]
    client = DataClient(
        _small_cfg(connect_timeout_ms=600), credential=cpb.Credential(token="cfs_x")
    )
    try:
        with pytest.raises(ChainfsError) as e:
            await client.request(f"127.0.0.1:{port}", ECHO, b"x", timeout_s=0.2)
        assert e.value.code == Code.ETIMEDOUT
        await asyncio.sleep(1.0)  # the connect attempt ends (its own deadline)
        gc.collect()
        await asyncio.sleep(0)
        unread = [r for r in caplog.records if "never retrieved" in r.getMessage()]
        assert not unread, unread[0].getMessage()
    finally:
        await client.close()
        mute.close()
