"""File length, write sessions, GC of removed files, idempotent retries, and the
gRPC wire (errors, failover between two servers over one store)."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_client import MetaClient
from chainfs.meta_service import schema
from chainfs.meta_service.background import GarbageCollector, IdempotencyCleaner, SessionPruner
from chainfs.meta_service.server import MetaServer, StaticCluster
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import CHAINS, ROOT, MetaEnv, make_config, start_env, stop_env

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def inode_exists(env: MetaEnv, ino: int) -> bool:
    return await env.kv.get(schema.inode_key(ino)) is not None


# -- length ------------------------------------------------------------------------
async def test_length_hints_are_monotonic_and_close_asks_storage(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f")
    ino, lay = r.inode.ino, r.inode.layout
    assert (await m.sync(ino, r.session_id, 5 * MiB, exact=False)).size == 5 * MiB
    assert (await m.sync(ino, r.session_id, 1 * MiB, exact=False)).size == 5 * MiB
    # Another writer has the file open and wrote past this one: its bytes are
    # in storage before its close reports them.
    other = await m.open("/f", write=True)
    env.storage.write(list(lay.chains), lay.chunk_size, ino, 9 * MiB + 17)
    env.storage.calls.clear()
    i = await m.close(ino, r.session_id, 6 * MiB, wrote=True)
    assert i is not None and i.size == 9 * MiB + 17
    assert {c[1] for c in env.storage.calls if c[0] == "query"} == set(lay.chains)
    # The last writer's close takes its own length: nobody else can have written
    # past it (closed writers reported theirs), so storage is not asked.
    env.storage.calls.clear()
    i = await m.close(ino, other.session_id, 9 * MiB + 17, wrote=True)
    assert i is not None and i.size == 9 * MiB + 17
    assert env.storage.calls == []
    # A close that wrote nothing does not ask storage.
    r2 = await m.open("/f", write=True)
    env.storage.calls.clear()
    assert (await m.close(ino, r2.session_id, 0, wrote=False)).size == 9 * MiB + 17  # type: ignore[union-attr]
    assert env.storage.calls == []
    # fsync asks storage too.
    r3 = await m.open("/f", write=True)
    env.storage.write(list(lay.chains), lay.chunk_size, ino, 12 * MiB)
    assert (await m.sync(ino, r3.session_id, 0, exact=True)).size == 12 * MiB
    await m.close(ino, r3.session_id)


async def test_open_truncate_drops_chunks(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f")
    lay = r.inode.layout
    env.storage.write(list(lay.chains), lay.chunk_size, r.inode.ino, 20 * MiB)
    await m.close(r.inode.ino, r.session_id, 20 * MiB, wrote=True)
    r2 = await m.open("/f", write=True, truncate=True)
    assert r2.inode.size == 0 and env.storage.of(r2.inode.ino) == {}
    await m.close(r2.inode.ino, r2.session_id)


async def test_a_lone_writer_close_does_not_ask_storage_but_a_reader_does_not_count(
    env: MetaEnv,
) -> None:
    """Readers have sessions too, but cannot write past the writer's length."""
    m = env.direct
    r = await m.create("/g")
    ino = r.inode.ino
    reader = await m.open("/g", write=False, session=True)
    assert reader.session_id  # a read session: a record under the inode, read_only
    env.storage.calls.clear()
    i = await m.close(ino, r.session_id, 3 * MiB, wrote=True)
    assert i is not None and i.size == 3 * MiB
    assert env.storage.calls == []
    await m.close(ino, reader.session_id)


# -- removal and GC -----------------------------------------------------------------
async def test_unlinking_the_last_name_removes_chunks_then_the_inode(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f")
    ino, lay = r.inode.ino, r.inode.layout
    env.storage.write(list(lay.chains), lay.chunk_size, ino, 30 * MiB)
    await m.close(ino, r.session_id, 30 * MiB, wrote=True)
    await m.setxattr("/f", "user.k", b"v")
    await m.link("/f", "/g")
    await m.unlink("/f")
    await asyncio.sleep(0.1)
    assert len(env.storage.of(ino)) == 8  # still named /g: nothing collected
    await m.unlink("/g")
    await until(lambda: _not(inode_exists(env, ino)))
    assert env.storage.of(ino) == {}
    gc = env.server.task(GarbageCollector)
    assert isinstance(gc, GarbageCollector) and gc.removed_chunks == 8
    assert await env.kv.get(schema.xattr_key(ino, b"user.k")) is None


async def _not(aw: Awaitable[bool]) -> bool:
    return not await aw


async def _gc_entries(env: MetaEnv) -> list[tuple[bytes, bytes]]:
    return await env.kv.transact(
        lambda tx: tx.get_range(*schema.range_of(schema.GCQU)), read_only=True
    )


async def test_a_never_written_file_is_removed_at_once_without_gc(env: MetaEnv) -> None:
    m = env.direct
    f = (await m.create("/f", write=False)).inode
    await m.setxattr("/f", "user.k", b"v")
    r = await m.create("/g")  # opened for write, closed without writing
    await m.close(r.inode.ino, r.session_id)
    await m.unlink("/f")
    await m.unlink("/g")
    # Gone in the unlink's own transaction: no GC entry, no storage call.
    assert not await inode_exists(env, f.ino) and not await inode_exists(env, r.inode.ino)
    assert await env.kv.get(schema.xattr_key(f.ino, b"user.k")) is None
    assert await _gc_entries(env) == [] and env.storage.calls == []
    # Unlinked while open for write, closed without writing: gone at the close.
    o = await m.create("/h")
    await m.unlink("/h")
    assert (await m.stat(o.inode.ino)).nlink == 0
    await m.close(o.inode.ino, o.session_id)
    assert not await inode_exists(env, o.inode.ino) and await _gc_entries(env) == []


async def test_end_sessions_ends_many_in_one_call(env: MetaEnv) -> None:
    m = env.direct
    opens = [await m.create(f"/f{i}") for i in range(5)]
    rd = await m.open("/f0", session=True)
    await m.unlink("/f1")  # open, never written: removed when its session ends
    ended = [(o.inode.ino, o.session_id) for o in opens] + [(rd.inode.ino, rd.session_id)]
    before = env.kv.stats["commits"]
    await env.client.end_sessions(ended)  # over the wire, one transaction
    assert env.kv.stats["commits"] == before + 1
    assert not await env.kv.transact(
        lambda tx: tx.get_range(*schema.range_of(schema.INOS)), read_only=True
    )
    assert not await inode_exists(env, opens[1].inode.ino)
    assert (await m.stat("/f0")).size == 0
    await env.client.end_sessions(ended)  # again: nothing more happens
    with pytest.raises(ChainfsError) as ei:
        await env.client.end_sessions([(opens[0].inode.ino, b"x" * 16)] * 1025)
    assert ei.value.errno == errno.E2BIG


async def test_a_reported_length_sends_the_file_through_gc(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f")
    ino, lay = r.inode.ino, r.inode.layout
    env.storage.write(list(lay.chains), lay.chunk_size, ino, 3 * MiB)
    await m.sync(ino, r.session_id, 3 * MiB, exact=False)  # then closed with nothing new
    await m.close(ino, r.session_id)
    await m.unlink("/f")
    await until(lambda: _not(inode_exists(env, ino)))
    assert env.storage.of(ino) == {}  # GC dropped the chunks


async def test_a_close_that_reports_nothing_records_no_answer(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f")
    ns = env.ns
    req = m.request_info()
    close = pb.CloseReq(req=req, ino=r.inode.ino, session_id=r.session_id)
    assert (await ns.close(close)).inode.ino == r.inode.ino
    assert not await _has_idem(env, req.client_id, req.request_id)
    assert (await ns.close(close)).inode.ino == r.inode.ino  # a retry: the same outcome
    assert not await env.kv.transact(
        lambda tx: tx.get_range(*schema.range_of(schema.INOS)), read_only=True
    )


async def test_a_file_open_for_write_is_collected_after_its_session_ends(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f")
    ino, lay = r.inode.ino, r.inode.layout
    await m.unlink("/f")
    env.storage.write(list(lay.chains), lay.chunk_size, ino, 2 * MiB)  # still writing
    await asyncio.sleep(0.2)  # GC rounds run every 20 ms
    assert await inode_exists(env, ino) and env.storage.of(ino)
    assert (await m.stat(ino)).nlink == 0  # fstat of the open file still works
    r2 = await m.open(ino, write=True)  # another writer by inode number: still allowed
    await m.close(ino, r.session_id, 2 * MiB, wrote=True)
    await asyncio.sleep(0.1)
    assert await inode_exists(env, ino)  # r2 still writes
    await m.close(ino, r2.session_id)
    await until(lambda: _not(inode_exists(env, ino)))
    assert env.storage.of(ino) == {}


async def test_no_new_writer_once_a_removed_file_is_queued_for_gc() -> None:
    env = await start_env(gc_delay_ms=60_000)  # stays queued for the test
    try:
        m = env.direct
        r = await m.create("/f")  # written: its chunks go through GC
        f = r.inode
        env.storage.write(list(f.layout.chains), f.layout.chunk_size, f.ino, MiB)
        await m.close(f.ino, r.session_id, MiB, wrote=True)
        await m.unlink("/f")
        assert (await m.stat(f.ino)).nlink == 0
        with pytest.raises(ChainfsError) as ei:
            await m.open(f.ino, write=True)
        assert ei.value.errno == errno.ENOENT
        assert (await m.open(f.ino)).inode.ino == f.ino  # reading an open fd's file is fine
    finally:
        await stop_env(env)


async def test_a_file_open_for_read_outlives_unlink_and_rename_until_close(env: MetaEnv) -> None:
    m = env.direct
    for how in ("unlink", "rename"):
        r = await m.create("/f")
        ino, lay = r.inode.ino, r.inode.layout
        env.storage.write(list(lay.chains), lay.chunk_size, ino, 6 * MiB)
        await m.close(ino, r.session_id, 6 * MiB, wrote=True)
        rd = await m.open("/f", session=True)  # read-only, with a read session
        assert rd.session_id and rd.inode.ino == ino
        if how == "unlink":
            await m.unlink("/f")
        else:
            await m.create("/g", write=False)
            await m.rename("/g", "/f")  # replaces the open file's only name
        await asyncio.sleep(0.2)  # GC rounds run every 20 ms
        assert await inode_exists(env, ino) and len(env.storage.of(ino)) == 2
        env.storage.calls.clear()
        closed = await m.close(ino, rd.session_id)
        assert closed is not None and closed.size == 6 * MiB  # a reader's close keeps the length
        assert not [c for c in env.storage.calls if c[0] == "query"]
        await until(lambda: _not(inode_exists(env, ino)))  # noqa: B023
        assert env.storage.of(ino) == {}


async def test_a_read_session_ending_does_not_change_the_length(env: MetaEnv) -> None:
    m = env.direct
    w = await m.create("/f")
    rd = await m.open("/f", session=True)
    await m.close(w.inode.ino, w.session_id, 5 * MiB, wrote=True)  # written after the read open
    assert (await m.close(rd.inode.ino, rd.session_id)).size == 5 * MiB  # type: ignore[union-attr]
    assert (await m.stat("/f")).size == 5 * MiB


async def test_no_read_session_on_a_removed_file_queued_for_gc() -> None:
    env = await start_env(gc_delay_ms=60_000)  # stays queued for the test
    try:
        m = env.direct
        f = (await m.create("/f", write=False)).inode
        await m.unlink("/f")
        with pytest.raises(ChainfsError) as ei:
            await m.open(f.ino, session=True)
        assert ei.value.errno == errno.ENOENT
    finally:
        await stop_env(env)


async def test_read_sessions_of_a_vanished_client_are_pruned_then_gc_runs() -> None:
    env = await start_env(session_timeout_ms=200)
    try:
        m = env.direct
        r = await m.create("/f")
        ino, lay = r.inode.ino, r.inode.layout
        env.storage.write(list(lay.chains), lay.chunk_size, ino, 1 * MiB)
        await m.close(ino, r.session_id, 1 * MiB, wrote=True)
        # Straight to the namespace: no client keeps this read session alive.
        req = pb.OpenReq(req=m.request_info(), at=pb.PathAt(path=b"/f"), read=True, session=True)
        rd = await env.ns.open(req)
        assert rd.session_id
        await m.unlink("/f")
        assert await inode_exists(env, ino)
        env.storage.calls.clear()
        await until(lambda: _not(inode_exists(env, ino)))  # lease over: pruned, then collected
        assert env.storage.of(ino) == {}
        assert not [c for c in env.storage.calls if c[0] == "query"]  # no length asked
    finally:
        await stop_env(env)


async def test_sessions_of_a_vanished_client_are_pruned() -> None:
    env = await start_env(session_timeout_ms=200)
    try:
        m = env.direct

        async def open_untracked(path: bytes) -> pb.OpenRsp:
            # Straight to the namespace: no client keeps this session alive.
            at = pb.PathAt(path=path)
            req = pb.OpenReq(req=m.request_info(), at=at, write=True, create=True, mode=0o644)
            return await env.ns.open(req)

        r = await open_untracked(b"/f")
        ino, lay = r.inode.ino, r.inode.layout
        env.storage.write(list(lay.chains), lay.chunk_size, ino, 3 * MiB + 5)
        await open_untracked(b"/g")  # a second file of the same client, removed while open
        g = await m.stat("/g")
        await m.unlink("/g")

        async def pruned() -> bool:
            rows = await env.kv.transact(
                lambda tx: tx.get_range(*schema.range_of(schema.INOS)), read_only=True
            )
            return not rows

        await until(pruned)
        assert (await m.stat("/f")).size == 3 * MiB + 5  # length taken from storage
        await until(lambda: _not(inode_exists(env, g.ino)))  # collected once its session ended
        pruner = env.server.task(SessionPruner)
        assert isinstance(pruner, SessionPruner) and pruner.pruned_sessions == 2
        await until(lambda: _not(_has_client_record(env, m.client_id)))
    finally:
        await stop_env(env)


async def test_a_silent_writers_unreported_chunks_are_collected() -> None:
    env = await start_env(session_timeout_ms=200)
    try:
        m = env.direct
        at = pb.PathAt(path=b"/f")
        req = pb.OpenReq(req=m.request_info(), at=at, write=True, create=True, mode=0o644)
        r = await env.ns.open(req)  # no client keeps this session alive
        ino, lay = r.inode.ino, r.inode.layout
        env.storage.write(list(lay.chains), lay.chunk_size, ino, 5 * MiB)  # never reported

        async def pruned() -> bool:
            return await env.kv.get(schema.session_key(ino, r.session_id)) is None

        await until(pruned)
        await m.unlink("/f")
        await until(lambda: _not(inode_exists(env, ino)))
        assert env.storage.of(ino) == {}
    finally:
        await stop_env(env)


async def _has_client_record(env: MetaEnv, client_id: bytes) -> bool:
    return await env.kv.get(schema.client_key(client_id)) is not None


async def test_keepalive_keeps_sessions() -> None:
    env = await start_env(session_timeout_ms=300)
    try:
        m = env.direct
        r = await m.create("/f")
        await asyncio.sleep(1.0)  # > 3 timeouts; the client sends keep-alives every 100 ms
        assert await env.kv.get(schema.session_key(r.inode.ino, r.session_id)) is not None
        await m.close(r.inode.ino, r.session_id)
    finally:
        await stop_env(env)


# -- idempotency ---------------------------------------------------------------------
async def test_a_retried_request_gets_the_first_answer(env: MetaEnv) -> None:
    ns = env.ns
    req = env.direct.request_info()
    first = await ns.mkdir(pb.MkdirReq(req=req, at=pb.PathAt(path=b"/d"), mode=0o755))
    again = await ns.mkdir(pb.MkdirReq(req=req, at=pb.PathAt(path=b"/d"), mode=0o755))
    first.ClearField("parent")  # directory attributes are not kept for retries
    assert again == first  # not EEXIST: the first answer
    with pytest.raises(ChainfsError) as ei:
        await ns.mkdir(
            pb.MkdirReq(req=env.direct.request_info(), at=pb.PathAt(path=b"/d"), mode=0o755)
        )
    assert ei.value.errno == errno.EEXIST
    # unlink retried after it succeeded: success again, not ENOENT; nothing else changes.
    await env.direct.create("/f", write=False)
    ureq = env.direct.request_info()
    await ns.unlink(pb.UnlinkReq(req=ureq, at=pb.PathAt(path=b"/f")))
    await env.direct.create("/f", write=False)  # a new /f meanwhile
    await ns.unlink(pb.UnlinkReq(req=ureq, at=pb.PathAt(path=b"/f")))
    assert (await env.direct.stat("/f")).type == pb.FILE
    # A create retried returns the same inode and session.
    oreq = env.direct.request_info()
    o1 = await ns.open(pb.OpenReq(req=oreq, at=pb.PathAt(path=b"/n"), write=True, create=True))
    o2 = await ns.open(pb.OpenReq(req=oreq, at=pb.PathAt(path=b"/n"), write=True, create=True))
    o1.ClearField("parent")
    assert o1 == o2


async def test_idempotency_records_expire() -> None:
    env = await start_env(idempotency_ttl_ms=50)
    try:
        req = env.direct.request_info()
        mk = pb.MkdirReq(req=req, at=pb.PathAt(path=b"/d"), mode=0o755)
        await env.ns.mkdir(mk)
        await until(lambda: _not(_has_idem(env, req.client_id, req.request_id)))
        with pytest.raises(ChainfsError) as ei:
            await env.ns.mkdir(mk)  # too late to be a retry: runs again
        assert ei.value.errno == errno.EEXIST
        cleaner = env.server.task(IdempotencyCleaner)
        assert isinstance(cleaner, IdempotencyCleaner) and cleaner.expired >= 1
    finally:
        await stop_env(env)


async def _has_idem(env: MetaEnv, client: bytes, request_id: int) -> bool:
    return await env.kv.get(schema.idem_key(client, request_id)) is not None


# -- the wire ------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "frame"])
async def test_errors_cross_the_wire_with_their_errno(env: MetaEnv, transport: str) -> None:
    addr = env.server.rpc_address if transport == "grpc" else f"frame://{env.server.data_address}"
    m = MetaClient(addr, user=ROOT)
    env.extra.append(m)
    await m.mkdir("/d")
    with pytest.raises(ChainfsError) as ei:
        await m.mkdir("/d")
    assert ei.value.errno == errno.EEXIST and isinstance(ei.value, OSError)
    with pytest.raises(ChainfsError) as ei:
        await m.stat("/nope/x")
    assert ei.value.errno == errno.ENOENT
    r = await m.create("/d/f")
    assert (await m.close(r.inode.ino, r.session_id, 10)).size == 10  # type: ignore[union-attr]
    assert await m.listdir("/d") == ["f"]


async def test_client_fails_over_between_meta_servers_on_one_store(env: MetaEnv) -> None:
    second = MetaServer(
        make_config(), kv=env.kv, storage=env.storage, cluster=StaticCluster(CHAINS)
    )
    await second.start()
    dead = "127.0.0.1:1"  # nothing listens there
    addrs = [dead, f"frame://{env.server.data_address}", second.rpc_address, "frame://127.0.0.1:1"]
    m = MetaClient(addrs, user=ROOT, timeout_s=10)
    try:
        await m.mkdir("/x")
        for i in range(20):
            await m.create(f"/x/f{i}", write=False)
        await env.server.stop()  # the first live server goes away mid-use
        for i in range(20, 40):
            await m.create(f"/x/f{i}", write=False)
        assert len(await m.listdir("/x")) == 40
    finally:
        await m.aclose()
        await second.stop()


async def test_meta_serves_on_a_unix_socket_whose_directory_it_makes(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "meta.sock"  # the directory does not exist yet
    env = await start_env(unix_socket=str(sock))
    try:
        assert sock.is_socket() and (sock.parent.stat().st_mode & 0o777) == 0o700
        assert (sock.stat().st_mode & 0o777) == 0o600
        c = MetaClient(f"frame://unix:{sock}", user=ROOT, timeout_s=10.0)
        try:
            assert (await c.stat("/")).ino == (await env.direct.stat("/")).ino
        finally:
            await c.aclose()
    finally:
        await stop_env(env)
    assert not sock.exists()  # removed at stop
