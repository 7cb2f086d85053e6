"""The data plane over TLS: bytes arrive identical through every reader and
writer path, and peers that cannot prove who they are get clear errors."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from chainfs.common.dataplane import (
    DataClient,
    DataPlaneConfig,
    FileRegion,
    Request,
    Response,
)
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.tls import TlsConfig
from tests.conftest import require
from tests.unit.dataplane import test_dataplane as plain

pytestmark = pytest.mark.timeout(60)
# The plain tests' fixture: servers and clients it made are closed after each test.
env = plain.env
_Env = plain._Env
_until = plain._until
MiB = 1024 * 1024
ECHO, FILE = 1, 2


@dataclass
class _Material:
    server: TlsConfig  # a node certificate of the CA
    user: TlsConfig  # the CA only: a user client without a certificate
    node_client: TlsConfig  # CA + a client certificate of the same CA
    foreign_ca: TlsConfig  # another CA: does not trust our server
    foreign_client: TlsConfig  # our CA, but a certificate another CA signed


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> _Material:
    require("cryptography", importlib.util.find_spec("cryptography") is not None)
    from chainfs.local.tls_material import init_tls_dir

    ours = init_tls_dir(tmp_path_factory.mktemp("ca"), nodes=["server"], clients=["node"])
    other = init_tls_dir(tmp_path_factory.mktemp("other"), nodes=["x"], clients=["intruder"])
    ca = ours["server"].ca_file
    bad = other["intruder"]
    return _Material(
        server=ours["server"],
        user=TlsConfig(ca_file=ca),
        node_client=ours["node"],
        foreign_ca=TlsConfig(ca_file=other["x"].ca_file),
        foreign_client=TlsConfig(ca_file=ca, cert_file=bad.cert_file, key_file=bad.key_file),
    )


def _cfg(tls: TlsConfig, **kw: int) -> DataPlaneConfig:
    base = dict(max_payload_bytes=4 * MiB, buffer_pool_bytes=16 * MiB)
    base.update(kw)
    return DataPlaneConfig(buffer_pool_cached_bytes=4 * MiB, tls=tls, **base)


@pytest.mark.parametrize("size", [0, 1, 4095, 65537, MiB + 3, 4 * MiB - 1])
async def test_echo_over_tls_byte_identical(env: _Env, material: _Material, size: int) -> None:
    server = await env.server(cfg=_cfg(material.server))
    client = env.client(_cfg(material.user))
    payload = os.urandom(size)
    reply = await client.request(server.address, ECHO, b"hdr", [payload[:7], payload[7:]])
    assert reply.header == b"hdr"
    assert reply.payload == payload
    assert server.stats["tls_failures"] == 0


async def test_every_reader_path_over_tls(env: _Env, material: _Material) -> None:
    """Tiny staging, headers bigger than it, direct receives into several sink
    buffers, many frames per SSL write, and a liveness probe every 1 ms: the
    bytes OpenSSL buffers must never be left unread."""
    kw = dict(
        max_payload_bytes=512 * 1024,
        buffer_pool_bytes=MiB,
        recv_staging_bytes=4096,
        direct_recv_min_bytes=1024,
        liveness_check_ms=1,
        max_inflight_per_connection=8,
        max_connections_per_peer=2,
    )
    server = await env.server(cfg=_cfg(material.server, **kw))
    client = env.client(_cfg(material.user, **kw))
    rng = __import__("random").Random(5)
    cases = [
        (rng.randbytes(rng.choice([0, 5, 4100, 20_000])), rng.randbytes(rng.randrange(0, 300_000)))
        for _ in range(120)
    ]

    async def one(h: bytes, p: bytes) -> tuple[bytes, bytes]:
        pieces = [bytearray(len(p) // 3 + 1) for _ in range(3)]
        reply = await client.request(
            server.address, ECHO, h, [p], payload_sink=lambda _t, _h: pieces
        )
        return reply.header, bytes(b"".join(pieces))[: reply.payload_len]

    results = await asyncio.gather(*(one(h, p) for h, p in cases))
    assert results == cases
    assert server.stats["bad_frames"] == 0


async def test_file_regions_over_tls(env: _Env, material: _Material, tmp_path: Path) -> None:
    """No sendfile under TLS: regions are read and encrypted piece by piece
    (larger than one SSL write, at odd offsets), in order with memory pieces."""
    blob = os.urandom(3 * MiB + 123)
    path = tmp_path / "chunk"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        regions = [(0, len(blob)), (7, 1), (MiB - 1, 2 * MiB + 7), (100, 0), (5, 300_001)]

        async def handler(req: Request) -> Response:
            items: list[bytes | FileRegion] = []
            for off, length in regions:
                items += [struct.pack("<Q", off), FileRegion(fd, off, length)]
            return Response(FILE, b"", payload=items)

        server = await env.server(handler, cfg=_cfg(material.server, max_payload_bytes=8 * MiB))
        client = env.client(_cfg(material.user, max_payload_bytes=8 * MiB))
        reply = await client.request(server.address, FILE, b"")
        want = b"".join(struct.pack("<Q", o) + blob[o : o + n] for o, n in regions)
        assert reply.payload == want
    finally:
        os.close(fd)


async def test_file_region_past_end_drops_connection_over_tls(
    env: _Env, material: _Material, tmp_path: Path
) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"abc")

    async def handler(req: Request) -> Response:
        fd = os.open(path, os.O_RDONLY)
        region = FileRegion(fd, 0, 10)
        return Response(FILE, b"", file_regions=[region], on_done=lambda _: os.close(fd))

    server = await env.server(handler, cfg=_cfg(material.server))
    client = env.client(_cfg(material.user))
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, FILE, b"")
    assert ei.value.code == Code.UNAVAILABLE


async def test_client_with_a_foreign_ca_gets_eacces(env: _Env, material: _Material) -> None:
    server = await env.server(cfg=_cfg(material.server))
    client = env.client(_cfg(material.foreign_ca))
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"x")
    assert ei.value.code == Code.EACCES
    assert "not trusted" in ei.value.message and server.address in ei.value.message


async def test_plain_client_against_tls_server_fails(env: _Env, material: _Material) -> None:
    server = await env.server(cfg=_cfg(material.server))
    client = env.client(_cfg(TlsConfig()))
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"x", timeout_s=5)
    assert ei.value.code in (Code.UNAVAILABLE, Code.BAD_FRAME)
    await _until(lambda: server.stats["tls_failures"] >= 1)
    assert server.stats["requests"] == 0


async def test_tls_client_against_plain_server_fails(env: _Env, material: _Material) -> None:
    server = await env.server(cfg=_cfg(TlsConfig()))
    client = env.client(_cfg(material.user))
    with pytest.raises(ChainfsError) as ei:
        await client.request(server.address, ECHO, b"x", timeout_s=5)
    assert ei.value.code == Code.UNAVAILABLE
    assert "TLS handshake" in ei.value.message
    assert server.stats["requests"] == 0


async def test_client_certificates_are_verified_when_presented(
    env: _Env, material: _Material
) -> None:
    server = await env.server(cfg=_cfg(material.server))
    node = env.client(_cfg(material.node_client))
    assert (await node.request(server.address, ECHO, b"n", [b"ok"])).payload == b"ok"
    intruder = env.client(_cfg(material.foreign_client))
    with pytest.raises(ChainfsError) as ei:
        await intruder.request(server.address, ECHO, b"i", [b"no"], timeout_s=5)
    assert ei.value.code == Code.UNAVAILABLE
    await _until(lambda: server.stats["tls_failures"] >= 1)
    assert server.stats["requests"] == 1  # the node's only


async def test_silent_peer_is_dropped_after_the_handshake_timeout(
    env: _Env, material: _Material
) -> None:
    tls = TlsConfig(**{**material.server.__dict__, "handshake_timeout_ms": 200})
    server = await env.server(cfg=_cfg(tls))
    host, port = server.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        await _until(lambda: server.stats["tls_failures"] == 1)
        sock.settimeout(10)
        assert await asyncio.get_running_loop().run_in_executor(None, sock.recv, 1) == b""
    finally:
        sock.close()


async def test_unix_socket_stays_plain(env: _Env, material: _Material, tmp_path: Path) -> None:
    """Same-host peers use the unix socket without TLS (its file mode guards it)."""
    path = str(tmp_path / "dp.sock")
    await env.server(cfg=_cfg(material.server), unix_path=path)
    plain = env.client(_cfg(TlsConfig()))
    reply = await plain.request(f"unix:{path}", ECHO, b"u", [b"data"])
    assert reply.payload == b"data"


def test_tls_environment_that_does_not_fit_together_is_einval(
    monkeypatch: pytest.MonkeyPatch, material: _Material
) -> None:
    from chainfs.common import tls

    monkeypatch.setenv(tls.CERT_FILE_ENV, material.node_client.cert_file)
    monkeypatch.setenv(tls.KEY_FILE_ENV, material.node_client.key_file)
    with pytest.raises(ChainfsError) as ei:
        DataClient(DataPlaneConfig())  # a certificate but no CA: refused, not silently plain
    assert ei.value.code == Code.EINVAL and tls.CA_FILE_ENV in ei.value.message
    monkeypatch.setenv(tls.CA_FILE_ENV, material.node_client.ca_file)
    assert tls.current() == material.node_client


async def test_pool_backpressure_over_tls_loses_nothing(env: _Env, material: _Material) -> None:
    """A connection paused for a pooled buffer resumes with the bytes OpenSSL
    had already decrypted: the socket alone would not wake it, and the liveness
    probe (which would, much later) is set out of reach here."""
    kw = dict(max_payload_bytes=MiB, buffer_pool_bytes=3 * MiB, liveness_check_ms=60_000)
    server = await env.server(cfg=_cfg(material.server, **kw))
    client = env.client(_cfg(material.user, **kw))
    payloads = [os.urandom(MiB - i) for i in range(24)]
    replies = await asyncio.gather(
        *(client.request(server.address, ECHO, b"%d" % i, [p]) for i, p in enumerate(payloads))
    )
    assert [r.payload.tobytes() for r in replies] == payloads
    assert server.pool.in_use_bytes == 0
