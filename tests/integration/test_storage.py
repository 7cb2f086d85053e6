"""Storage service with real processes: a mgmtd + 3 storage nodes, chains of 3."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from chainfs.cli.admin.chunks import query_chunk
from chainfs.cli.main import cli
from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.storage_client import ReadReq, StorageClient
from chainfs.proto import common_pb2 as cp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_engine import ChunkEngine
from tests.integration.storage_fixtures import StorageCluster

pytestmark = pytest.mark.timeout(120)

CHUNK = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageCluster]:
    with StorageCluster(tmp_path_factory.mktemp("storage")) as c:
        yield c
        c.check_alive()


_inodes = iter(range(1000, 1 << 30))


def new_inode() -> int:
    return next(_inodes)


async def replicas(client: StorageClient, chain_id: int, inode: int, index: int) -> list[Any]:
    routing = await client.routing.refresh()
    return await query_chunk(routing, inode, index, chain_id)


async def read_from(
    client: StorageClient,
    target_id: int,
    chain_id: int,
    inode: int,
    index: int,
    offset: int = 0,
    length: int = CHUNK,
) -> bytes:
    """Read one replica directly (raises its error)."""
    routing = await client.routing.get()
    node = routing.node_of_target(target_id)
    req = sp.BatchReadReq(
        ios=[
            sp.ReadIO(
                chain_id=chain_id,
                target_id=target_id,
                chunk=sp.ChunkId(inode=inode, index=index),
                offset=offset,
                length=length,
            )
        ]
    )
    holder: dict[str, Any] = {}

    def sink(_t: int, header: Any) -> list[memoryview]:
        rsp = sp.BatchReadRsp.FromString(bytes(header))
        holder["rsp"] = rsp
        res = rsp.results[0]
        holder["buf"] = bytearray(res.length)
        return [memoryview(holder["buf"])] if res.length else []

    reply = await client.dp.request(
        node.data_address, sp.BATCH_READ, req.SerializeToString(), payload_sink=sink
    )
    if "rsp" not in holder:  # no payload: the sink was not called
        holder["rsp"] = sp.BatchReadRsp.FromString(reply.header)
        holder["buf"] = b""
    res = holder["rsp"].results[0]
    if res.status.code:
        raise ChainfsError(res.status.code, res.status.message)
    return bytes(holder["buf"])


async def send_update(
    client: StorageClient,
    routing: Routing,
    target_id: int,
    req: sp.UpdateReq,
    payload: bytes = b"",
) -> sp.UpdateRsp:
    node = routing.node_of_target(target_id)
    reply = await client.dp.request(
        node.data_address,
        sp.UPDATE,
        req.SerializeToString(),
        payload=[memoryview(payload)] if payload else [],
    )
    return sp.UpdateRsp.FromString(bytes(reply.header))


def update_req(
    routing: Routing,
    chain_id: int,
    inode: int,
    data: bytes,
    offset: int = 0,
    request_id: int = 1,
    client_id: bytes = b"t" * 16,
    **kw: Any,
) -> sp.UpdateReq:
    head = routing.head(chain_id)
    assert head is not None
    fields: dict[str, Any] = dict(
        req=cp.RequestInfo(client_id=client_id, request_id=request_id),
        chain_id=chain_id,
        chain_version=routing.chains[chain_id].chain_version,
        target_id=head.target_id,
        chunk=sp.ChunkId(inode=inode, index=0),
        type=sp.WRITE,
        offset=offset,
        length=len(data),
        crc32c=crc32c(data),
        chunk_size=CHUNK,
    )
    fields.update(kw)
    return sp.UpdateReq(**fields)


async def test_write_read_truncate_remove_roundtrip(cluster: StorageCluster) -> None:
    client, mgmt = await cluster.client(verify_checksums=True)
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        data = os.urandom(300_000)
        await client.write(chain, ino, 0, 0, data, CHUNK)
        await client.write(chain, ino, 0, len(data), b"tail", CHUNK)  # append
        await client.write(chain, ino, 0, 10, b"mid", CHUNK)  # overwrite inside
        want = bytearray(data + b"tail")
        want[10:13] = b"mid"
        assert bytes(await client.read(chain, ino, 0, 0, CHUNK)) == bytes(want)
        out = bytearray(100)
        got = await client.read(chain, ino, 0, 5, 100, out=memoryview(out))
        assert bytes(got) == bytes(want[5:105]) and got.obj is out
        # Past the end: short; a missing chunk: empty.
        assert bytes(await client.read(chain, ino, 0, len(want) - 3, 10)) == bytes(want[-3:])
        assert len(await client.read(chain, ino, 7, 0, 10)) == 0
        # A hole reads as zeros.
        await client.write(chain, ino, 2, 1000, b"x", CHUNK)
        assert bytes(await client.read(chain, ino, 2, 0, 2000)) == bytes(1000) + b"x"
        assert await client.query_last_chunk(chain, ino) == (2, 1001)
        assert [m.chunk.index for m in await client.list_chunks(chain, ino)] == [0, 2]
        await client.truncate(chain, ino, 2, 10, CHUNK)
        assert await client.query_last_chunk(chain, ino) == (2, 10)
        await client.truncate(chain, ino, 0, 20, CHUNK)
        assert bytes(await client.read(chain, ino, 0, 0, CHUNK)) == bytes(want[:20])
        assert await client.remove_chunks(chain, ino, 1) == 1
        assert await client.query_last_chunk(chain, ino) == (0, 20)
        assert await client.remove_chunks(chain, ino) == 1
        assert await client.query_last_chunk(chain, ino) is None
        assert len(await client.read(chain, ino, 0, 0, 10)) == 0
        for r in await replicas(client, chain, ino, 0):
            assert not r["present"]
    finally:
        await client.close()
        await mgmt.close()


async def test_concurrent_writers_leave_identical_replicas(cluster: StorageCluster) -> None:
    client, mgmt = await cluster.client()
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        rng = random.Random(7)
        writes = 0

        async def writer(w: int) -> None:
            nonlocal writes
            for k in range(12):
                off = rng.randrange(0, 200_000)
                data = bytes([w * 16 + k % 16]) * rng.randrange(1, 50_000)
                await client.write(chain, ino, 0, off, data, CHUNK)
                writes += 1

        await asyncio.gather(*(writer(w) for w in range(8)))
        rows = await replicas(client, chain, ino, 0)
        assert len(rows) == 3 and all(r["present"] for r in rows)
        assert {r["committed_version"] for r in rows} == {writes}
        assert {r["pending_version"] for r in rows} == {0}
        assert len({(r["length"], r["crc32c"]) for r in rows}) == 1
        contents = {await read_from(client, r["target_id"], chain, ino, 0) for r in rows}
        assert len(contents) == 1
        (content,) = contents
        assert crc32c(content) == rows[0]["crc32c"]
    finally:
        await client.close()
        await mgmt.close()


async def test_reads_never_see_uncommitted_bytes(cluster: StorageCluster) -> None:
    """A writer replaces the chunk with uniform bytes k = 1, 2, ...; readers must only
    see uniform content, never older than the last write acknowledged before they
    started, never newer than the last write begun."""
    client, mgmt = await cluster.client()
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        size = 256 * 1024
        await client.write(chain, ino, 0, 0, bytes([0]) * size, CHUNK)
        acked = 0
        started = 0
        done = False
        not_committed_seen = 0

        async def writer() -> None:
            nonlocal acked, started, done
            for k in range(1, 40):
                started = k
                await client.write(chain, ino, 0, 0, bytes([k]) * size, CHUNK)
                acked = k
            done = True

        async def reader() -> None:
            nonlocal not_committed_seen
            routing = await client.routing.get()
            targets = list(routing.chains[chain].targets)
            while not done:
                floor, ceiling = acked, started
                target = random.choice(targets)
                try:
                    got = await read_from(client, target, chain, ino, 0, 0, size)
                except ChainfsError as e:
                    assert e.code == Code.NOT_COMMITTED, e
                    not_committed_seen += 1
                    continue
                assert len(got) == size
                assert got.count(got[0]) == size, "mixed bytes from two versions"
                assert floor <= got[0] <= max(ceiling, started), (floor, got[0], ceiling)

        await asyncio.gather(writer(), reader(), reader())
        assert acked == 39
    finally:
        await client.close()
        await mgmt.close()


async def test_retried_write_applies_once(cluster: StorageCluster) -> None:
    client, mgmt = await cluster.client()
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        routing = await client.routing.refresh()
        head = routing.head(chain)
        assert head is not None
        a = update_req(routing, chain, ino, b"AAAA", request_id=11)
        b = update_req(routing, chain, ino, b"BBBB", request_id=12)
        r1 = await send_update(client, routing, head.target_id, a, b"AAAA")
        assert r1.committed_version == 1
        r1b = await send_update(client, routing, head.target_id, a, b"AAAA")  # retry
        assert r1b.committed_version == 1
        await send_update(client, routing, head.target_id, b, b"BBBB")
        r1c = await send_update(client, routing, head.target_id, a, b"AAAA")  # late retry
        assert r1c.committed_version == 1
        assert bytes(await client.read(chain, ino, 0, 0, 10)) == b"BBBB"
        rows = await replicas(client, chain, ino, 0)
        assert {r["committed_version"] for r in rows} == {2}
        # An append retried: still applied once.
        c = update_req(routing, chain, ino, b"CC", offset=4, request_id=13)
        for _ in range(3):
            await send_update(client, routing, head.target_id, c, b"CC")
        assert bytes(await client.read(chain, ino, 0, 0, 10)) == b"BBBBCC"
        rows = await replicas(client, chain, ino, 0)
        assert {r["committed_version"] for r in rows} == {3}
    finally:
        await client.close()
        await mgmt.close()


async def test_corrupted_replica_is_reported_and_avoided(cluster: StorageCluster) -> None:
    client, mgmt = await cluster.client()
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        data = os.urandom(200_000)
        await client.write(chain, ino, 0, 0, data, CHUNK)
        rows = await replicas(client, chain, ino, 0)
        victim = rows[1]["target_id"]
        tdir = cluster.target_dirs()[victim]
        # Locate the file by the engine's naming, then flip one byte in place.
        gen = rows[1]["committed_version"]
        path = Path(ChunkEngine.file_path_in(tdir, ino, 0, gen))
        with open(path, "r+b") as f:  # noqa: ASYNC230 - a test flipping one byte
            f.seek(12345)
            byte = f.read(1)
            f.seek(12345)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ChainfsError) as e:
            await read_from(client, victim, chain, ino, 0, 0, 100)
        assert e.value.code == Code.CHECKSUM_MISMATCH
        for _ in range(12):  # random replica choice hits the victim now and then
            assert bytes(await client.read(chain, ino, 0, 0, CHUNK)) == data
        got = await client.read_batch([ReadReq(chain, ino, 0, k * 1000, 1000) for k in range(50)])
        assert b"".join(bytes(g) for g in got) == data[:50_000]
    finally:
        await client.close()
        await mgmt.close()


async def test_stale_chain_version_and_wrong_head_rejected(cluster: StorageCluster) -> None:
    client, mgmt = await cluster.client()
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        routing = await client.routing.refresh()
        head = routing.head(chain)
        assert head is not None
        stale = update_req(
            routing, chain, ino, b"x", chain_version=routing.chains[chain].chain_version - 1
        )
        with pytest.raises(ChainfsError) as e:
            await send_update(client, routing, head.target_id, stale, b"x")
        assert e.value.code == Code.STALE_CHAIN_VERSION
        middle = routing.chains[chain].targets[1]
        not_head = update_req(routing, chain, ino, b"x", target_id=middle)
        with pytest.raises(ChainfsError) as e:
            await send_update(client, routing, middle, not_head, b"x")
        assert e.value.code == Code.STALE_CHAIN_VERSION
        for r in await replicas(client, chain, ino, 0):
            assert not r["present"]
    finally:
        await client.close()
        await mgmt.close()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("offset_outside", Code.EINVAL),
        ("bad_chunk_size", Code.EINVAL),
        ("unknown_chain", Code.UNKNOWN_CHAIN),
        ("unknown_target", Code.UNKNOWN_TARGET),
        ("short_payload", Code.BAD_FRAME),
        ("bad_checksum", Code.CHECKSUM_MISMATCH),
        ("garbage_header", Code.BAD_FRAME),
    ],
)
async def test_bad_update_gets_precise_error_and_changes_nothing(
    cluster: StorageCluster, case: str, code: Code
) -> None:
    client, mgmt = await cluster.client()
    try:
        chain = cluster.chains[0]
        ino = new_inode()
        routing = await client.routing.refresh()
        head = routing.head(chain)
        assert head is not None
        data = b"y" * 100
        req = update_req(routing, chain, ino, data)
        payload = data
        if case == "offset_outside":
            req.offset = CHUNK - 50
        elif case == "bad_chunk_size":
            req.chunk_size = 1000
        elif case == "unknown_chain":
            req.chain_id = 99_999
        elif case == "unknown_target":
            req.target_id = 99_999
        elif case == "short_payload":
            payload = data[:50]
        elif case == "bad_checksum":
            req.crc32c ^= 1
        node = routing.node_of_target(head.target_id)
        header = b"\xff\xff\xff garbage" if case == "garbage_header" else req.SerializeToString()
        with pytest.raises(ChainfsError) as e:
            await client.dp.request(
                node.data_address, sp.UPDATE, header, payload=[memoryview(payload)]
            )
        assert e.value.code == code, e.value
        for r in await replicas(client, chain, ino, 0):
            assert not r["present"], r
        # The node still serves.
        await client.write(chain, ino, 0, 0, b"ok", CHUNK)
        assert bytes(await client.read(chain, ino, 0, 0, 2)) == b"ok"
    finally:
        await client.close()
        await mgmt.close()


async def test_random_frames_do_not_hurt_the_server(cluster: StorageCluster) -> None:
    """Garbage bytes and truncated frames at the data port: connections close, node serves."""
    client, mgmt = await cluster.client()
    try:
        routing = await client.routing.refresh()
        node = routing.node_of_target(routing.head(cluster.chains[0]).target_id)  # type: ignore[union-attr]
        host, port = node.data_address.rsplit(":", 1)
        rng = random.Random(3)
        for k in range(30):
            s = socket.create_connection((host, int(port)), timeout=5)
            try:
                if k % 3 == 0:
                    s.sendall(rng.randbytes(rng.randrange(1, 200)))
                elif k % 3 == 1:
                    s.sendall(b"CFDP" + struct.pack("<BBHQ", 1, 0, 1, k) + rng.randbytes(40))
                else:
                    s.sendall(rng.randbytes(40) + rng.randbytes(100))
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                while s.recv(4096):
                    pass
            except OSError:
                pass
            finally:
                s.close()
        ino = new_inode()
        await client.write(cluster.chains[0], ino, 0, 0, b"still here", CHUNK)
        assert bytes(await client.read(cluster.chains[0], ino, 0, 0, 20)) == b"still here"
        cluster.check_alive()
    finally:
        await client.close()
        await mgmt.close()


def test_admin_query_chunk_and_dump_chunkmeta(cluster: StorageCluster) -> None:
    async def write() -> int:
        client, mgmt = await cluster.client()
        try:
            ino = new_inode()
            await client.write(cluster.chains[0], ino, 3, 0, b"hello", CHUNK)
            return ino
        finally:
            await client.close()
            await mgmt.close()

    ino = asyncio.run(write())
    runner = CliRunner()
    res = runner.invoke(
        cli, ["admin", "query-chunk", str(ino), "3", "--json", "--address", cluster.address]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 3
    for r in rows:
        assert r["state"] == "serving"
        assert r["committed_version"] == 1 and r["pending_version"] == 0
        assert r["length"] == 5 and r["crc32c"] == crc32c(b"hello")
    res = runner.invoke(
        cli,
        [
            "admin",
            "dump-chunkmeta",
            str(rows[0]["target_id"]),
            "--json",
            "--address",
            cluster.address,
        ],
    )
    assert res.exit_code == 0, res.output
    metas = json.loads(res.output)
    assert any(m["inode"] == ino and m["index"] == 3 for m in metas)
    res = runner.invoke(
        cli, ["admin", "query-chunk", "999999999", "0", "--address", cluster.address]
    )
    assert res.exit_code != 0 and "CHUNK_NOT_FOUND" in res.output


def test_enospc_above_usage_threshold(tmp_path: Path) -> None:
    """The tail refuses the new chunk; the head aborts its pending version."""
    with StorageCluster(
        tmp_path, nodes=2, replicas=2, storage_overrides={1: {"disk_usage_limit_ratio": 1e-6}}
    ) as c:

        async def go() -> None:
            client, mgmt = await c.client(attempts=2)
            try:
                chain = c.chains[0]
                with pytest.raises(ChainfsError) as e:
                    await client.write(chain, 5, 0, 0, b"data", CHUNK)
                assert e.value.code == Code.ENOSPC and e.value.errno == 28
                for r in await replicas(client, chain, 5, 0):
                    assert not r["present"], r
            finally:
                await client.close()
                await mgmt.close()

        asyncio.run(go())


def test_restart_keeps_node_and_target_ids_and_data(tmp_path: Path) -> None:
    with StorageCluster(tmp_path, nodes=1, replicas=1) as c:
        node = c.storage[0]
        before = dict(node.info)

        async def write() -> None:
            client, mgmt = await c.client()
            try:
                await client.write(c.chains[0], 77, 0, 0, b"persisted", CHUNK)
            finally:
                await client.close()
                await mgmt.close()

        asyncio.run(write())
        node.stop()
        node.start()
        assert node.info["node_id"] == before["node_id"], node.tail_log()
        assert node.info["target_ids"] == before["target_ids"], node.tail_log()
        (tid,) = node.info["target_ids"]
        eng = ChunkEngine.file_path_in(c.target_dirs()[tid], 77, 0, 1)
        assert Path(eng).read_bytes() == b"persisted"
