"""Meta on a store that reads ahead (PostgreSQL's kind): the keys an operation's
path likely reads are fetched at begin, guessed from the entries earlier walks
found. A stale guess (a directory renamed or replaced since) must never change
an answer."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError
from chainfs.kv.base import PrefetchRange, Snapshot
from chainfs.kv.etcd import EtcdStore
from chainfs.kv.memory import MemoryStore
from chainfs.kv.postgres import PostgresStore, _PgSnapshot
from chainfs.local.postgres import PostgresServer, find_bindir
from chainfs.meta_service import schema
from chainfs.meta_service.server import MetaServer, StaticCluster
from chainfs.testing.etcd import EtcdCluster
from tests.conftest import etcd_rpc_counts, require, require_binary
from tests.unit.meta.conftest import (
    CHAINS,
    ROOT,
    DirectMetaClient,
    FakeChunkStore,
    make_config,
    served,
)


class ReadAheadStore(MemoryStore):
    """memory:// that reads transact's prefetch keys at begin, and counts the
    reads that still went to the snapshot afterwards (round trips on a remote store)."""

    prefetches = True

    def __init__(self) -> None:
        super().__init__()
        self.later_reads = 0

    async def _begin_reading(
        self, keys: list[bytes], ranges: list[PrefetchRange] | None = None
    ) -> Snapshot:
        snap = await self._begin()
        snap.ahead = {k: await snap.get(k) for k in keys}
        get = snap.get

        async def counted(key: bytes) -> bytes | None:
            self.later_reads += 1
            return await get(key)

        snap.get = counted  # type: ignore[method-assign]
        return snap


@pytest.fixture
async def meta() -> tuple[DirectMetaClient, ReadAheadStore]:
    kv = ReadAheadStore()
    async with served(kv) as (_, client):
        yield client, kv


async def test_warm_paths_are_read_at_begin(meta: tuple[DirectMetaClient, ReadAheadStore]) -> None:
    m, kv = meta
    await m.mkdir("/a/b", 0o755, parents=True)
    await m.create("/a/b/f0", 0o644, exclusive=True, write=False)
    kv.later_reads = 0
    for i in range(1, 4):
        made = await m.create(f"/a/b/f{i}", 0o644, exclusive=True, write=False)
        assert (await m.stat(f"/a/b/f{i}")).ino == made.inode.ino
    assert kv.later_reads == 0  # every key each create and stat read came at begin


async def test_stale_guesses_never_change_an_answer(
    meta: tuple[DirectMetaClient, ReadAheadStore],
) -> None:
    m, _ = meta
    await m.mkdir("/d/sub", 0o755, parents=True)
    old = await m.create("/d/sub/f", 0o644, exclusive=True, write=False)
    assert (await m.stat("/d/sub/f")).ino == old.inode.ino
    # /d now names another directory; the guesses still lead to the old one.
    await m.rename("/d", "/moved")
    await m.mkdir("/d/sub", 0o755, parents=True)
    with pytest.raises(ChainfsError) as e:
        await m.stat("/d/sub/f")
    assert e.value.errno == errno.ENOENT
    new = await m.create("/d/sub/f", 0o644, exclusive=True, write=False)
    assert new.inode.ino != old.inode.ino
    assert (await m.stat("/d/sub/f")).ino == new.inode.ino
    assert (await m.stat("/moved/sub/f")).ino == old.inode.ino
    await m.unlink("/d/sub/f")
    with pytest.raises(ChainfsError) as e:
        await m.stat("/d/sub/f")
    assert e.value.errno == errno.ENOENT


# Background rounds (GC, session pruning, ...) would read the store while we count.
_QUIET = {
    name: 600_000
    for name in (
        "gc_interval_ms",
        "session_prune_interval_ms",
        "session_count_interval_ms",
        "trash_purge_interval_ms",
        "idempotency_clean_interval_ms",
        "user_refresh_interval_ms",
        "cluster_config_poll_ms",
    )
}


async def test_warm_paths_on_etcd_cost_one_read_each(tmp_path: Path) -> None:
    """On real etcd: a warm create, stat or rename reads everything it needs in
    the one read-only Txn at begin; etcd itself counts no Range call."""
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        kv = EtcdStore.from_url(etcd.url("meta"))
        assert kv.prefetches
        async with served(kv, **_QUIET) as (_, m):
            await m.mkdir("/a/b", 0o755, parents=True)
            await m.create("/a/b/f0", 0o644, exclusive=True, write=False)
            await m.stat("/a/b/f0")
            reads, calls = kv.stats["reads"], etcd_rpc_counts(etcd.members[0].client_url)
            n = 4
            for i in range(1, n + 1):
                made = await m.create(f"/a/b/f{i}", 0o644, exclusive=True, write=False)
                assert (await m.stat(f"/a/b/f{i}")).ino == made.inode.ino
            now = etcd_rpc_counts(etcd.members[0].client_url)
            assert kv.stats["reads"] - reads == 2 * n
            assert now["Range"] == calls["Range"]
            assert now["Txn"] - calls["Txn"] == 3 * n  # a read ahead each, a commit per create
            reads, calls = kv.stats["reads"], now
            for i in range(1, n + 1):
                await m.rename(f"/a/b/f{i}", f"/a/b/g{i}")
            now = etcd_rpc_counts(etcd.members[0].client_url)
            assert kv.stats["reads"] - reads == n  # both paths in the one read ahead
            assert now["Range"] == calls["Range"]
            assert now["Txn"] - calls["Txn"] == 2 * n
            names = [e.name for e in (await m.readdir("/a/b")).entries]
            assert names == [b"f0", *(b"g%d" % i for i in range(1, n + 1))]


async def test_warm_path_ops_on_etcd_read_once(tmp_path: Path) -> None:
    """On real etcd: each warm operation below reads what it needs in the one
    read-only Txn at begin (etcd answers no Range), and removals and xattr
    operations also the keys of the inode their path names, and the ranges
    they scan of it (a directory's entries, an inode's sessions, xattrs)."""
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        kv = EtcdStore.from_url(etcd.url("meta"))
        # Ids in large batches: no reservation of new ones while we count.
        async with served(kv, alloc_batch=1024, **_QUIET) as (_, m):
            url = etcd.members[0].client_url
            await m.mkdir("/a/b", 0o755, parents=True)
            for name in ("f", "g", "h", "u0", "u1", "u2", "u3"):
                await m.create(f"/a/b/{name}", 0o644, exclusive=True, write=False)
            await m.setxattr("/a/b/f", b"user.x", b"1")
            await m.symlink("/a/b/f", "/a/b/s")
            ops = {  # name: (op of round i, etcd Range calls it still makes)
                "chmod": (lambda i: m.chmod("/a/b/f", 0o600 | i % 2), 0),
                "set_layout": (lambda i: m.set_layout("/a/b", chunk_size=1 << 20), 0),
                "fallocate": (lambda i: m.fallocate("/a/b/f", 0, 0, 10 + i), 0),
                "getxattr": (lambda i: m.getxattr("/a/b/f", b"user.x"), 0),
                "setxattr": (lambda i: m.setxattr("/a/b/f", b"user.x", b"%d" % i), 0),
                "listxattr": (lambda i: m.listxattr("/a/b/f"), 0),
                "readlink": (lambda i: m.readlink("/a/b/s"), 0),
                "readdir": (lambda i: m.readdir("/a/b"), 0),
                "batch_stat": (lambda i: m.batch_stat(["/a/b/f", "/a/b/g", "/a/b/h"]), 0),
                "link": (lambda i: m.link("/a/b/g", f"/a/b/l{i}"), 0),
                "unlink a link": (lambda i: m.unlink(f"/a/b/l{i}"), 0),
                "symlink": (lambda i: m.symlink("/x", f"/a/b/s{i}"), 0),
                "unlink a symlink": (lambda i: m.unlink(f"/a/b/s{i}"), 0),
                "unlink a file": (lambda i: m.unlink(f"/a/b/u{i}"), 0),
                "mknod": (lambda i: m.mknod(f"/a/b/n{i}", 0o600), 0),
                "mkdir": (lambda i: m.mkdir(f"/a/b/d{i}", 0o755), 0),
                "rmdir": (lambda i: m.rmdir(f"/a/b/d{i}"), 0),
            }
            n = 3
            for name, (op, ranges) in ops.items():
                await op(n)  # warms the hints of the paths it walks
                reads, calls = kv.stats["reads"], etcd_rpc_counts(url)
                for i in range(n):
                    await op(i)
                now = etcd_rpc_counts(url)
                got = ((kv.stats["reads"] - reads) / n, (now["Range"] - calls["Range"]) / n)
                assert got == (1 + ranges, ranges), name  # the read ahead, then range scans
            assert (await m.getxattr("/a/b/f", b"user.x")) == b"%d" % (n - 1)
            names = [e.name for e in (await m.readdir("/a/b")).entries]
            assert names == [b"f", b"g", b"h", *(b"n%d" % i for i in range(n + 1)), b"s"]


async def test_readdir_with_attributes_on_etcd_reads_them_together(tmp_path: Path) -> None:
    """On real etcd: a readdir page with attributes reads the entries' inodes
    (and the entry-change times of the directories among them) in one Txn,
    not one Range each; each entry's attributes are what a stat gives."""
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        kv = EtcdStore.from_url(etcd.url("meta"))
        async with served(kv, alloc_batch=1024, **_QUIET) as (_, m):
            url = etcd.members[0].client_url
            await m.mkdir("/d", 0o755)
            for i in range(30):
                await m.create(f"/d/f{i:02d}", 0o600 + i % 8, exclusive=True, write=False)
            for i in range(10):
                await m.mkdir(f"/d/s{i}", 0o700)
                await m.create(f"/d/s{i}/x", 0o644, exclusive=True, write=False)  # its times move
            await m.readdir("/d", with_attrs=True)  # warms the hints of /d
            calls = etcd_rpc_counts(url)
            page = await m.readdir("/d", with_attrs=True)
            now = etcd_rpc_counts(url)
            assert (now["Range"] - calls["Range"], now["Txn"] - calls["Txn"]) == (0, 2)
            assert len(page.entries) == 40
            for e in page.entries:
                want = await m.stat(f"/d/{e.name.decode()}")
                assert e.inode == want, e.name


async def test_a_wide_batch_stat_on_etcd_reads_its_paths_together(tmp_path: Path) -> None:
    """On real etcd: a batch stat of more paths than one read at begin holds
    reads the rest of what the hints name in one more Txn, not a Range each;
    every answer is a stat's, a stale or absent name included."""
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        kv = EtcdStore.from_url(etcd.url("meta"))
        async with served(kv, alloc_batch=1024, **_QUIET) as (_, m):
            url = etcd.members[0].client_url
            for d in range(4):
                await m.mkdir(f"/a/d{d}", 0o755, parents=True)
            paths = [f"/a/d{i % 4}/f{i}" for i in range(200)]  # ~400 keys
            for p in paths:
                await m.create(p, 0o644, exclusive=True, write=False)
            await m.batch_stat(paths)  # warms the hints
            await m.unlink(paths[7])  # a name the hints still know: now absent
            calls = etcd_rpc_counts(url)
            got = await m.batch_stat([*paths, "/a/d1/none"])
            now = etcd_rpc_counts(url)
            assert (now["Range"] - calls["Range"], now["Txn"] - calls["Txn"]) == (0, 2)
            for p, res in zip([*paths, "/a/d1/none"], got, strict=True):
                if p in (paths[7], "/a/d1/none"):
                    assert isinstance(res, ChainfsError) and res.errno == errno.ENOENT, p
                else:
                    assert res == await m.stat(p), p


async def test_many_session_ends_on_etcd_read_their_inodes_together(tmp_path: Path) -> None:
    """On real etcd: one EndSessions of many sessions reads their inodes in
    one Txn; a file unlinked while open still goes with its last session."""
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        kv = EtcdStore.from_url(etcd.url("meta"))
        async with served(kv, alloc_batch=1024, **_QUIET) as (_, m):
            url = etcd.members[0].client_url
            opens = [await m.create(f"/f{i}", 0o644, exclusive=True) for i in range(20)]
            await m.unlink("/f3")  # open, never written: removed when its session ends
            calls = etcd_rpc_counts(url)
            await m.end_sessions([(o.inode.ino, o.session_id) for o in opens])
            now = etcd_rpc_counts(url)
            # The inodes in one Txn, then the commit; /f3, dropped, still reads its
            # sessions (none left), its xattrs (none) and its inode counter shard.
            assert (now["Range"] - calls["Range"], now["Txn"] - calls["Txn"]) == (3, 2)
            assert await kv.get(schema.inode_key(opens[3].inode.ino)) is None
            assert await kv.get(schema.inode_key(opens[4].inode.ino)) is not None
            names = [e.name for e in (await m.readdir("/")).entries]
            assert names == [b"f%d" % i for i in sorted(set(range(20)) - {3}, key=str)]


async def test_warm_removals_and_listings_on_postgresql_query_once_per_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On real PostgreSQL: what these warm operations read of their path and
    of the inode it names comes in the statement that takes the snapshot;
    what is left are their range scans, one query each, and a page with
    attributes reads all its inodes in one more. (Scans are not read ahead
    on PostgreSQL: measured, it did not pay; docs/performance.md.)"""
    require("postgresql", find_bindir() is not None, "deploy/bootstrap.sh installs it")
    queries = [0]
    plain = _PgSnapshot._query

    async def counted(self: _PgSnapshot, sql: str, *args: object) -> list[object]:
        queries[0] += 1
        return await plain(self, sql, *args)

    monkeypatch.setattr(_PgSnapshot, "_query", counted)
    with PostgresServer(tmp_path / "pg") as pg:
        pg.create_database("meta")
        kv = PostgresStore.from_url(pg.url("meta"))
        async with served(kv, alloc_batch=1024, **_QUIET) as (_, m):
            await m.mkdir("/a/b", 0o755, parents=True)
            for name in ("f", "u0", "u1", "u2", "u3"):
                await m.create(f"/a/b/{name}", 0o644, exclusive=True, write=False)
            await m.setxattr("/a/b/f", b"user.x", b"1")
            ops = {  # name: (op of round i, queries between begin and commit)
                "listxattr": (lambda i: m.listxattr("/a/b/f"), 1),
                "readdir": (lambda i: m.readdir("/a/b"), 1),
                "readdir with attributes": (lambda i: m.readdir("/a/b", with_attrs=True), 2),
                "unlink a file": (lambda i: m.unlink(f"/a/b/u{i}"), 2),  # sessions, xattrs
                "mkdir": (lambda i: m.mkdir(f"/a/b/d{i}", 0o755), 0),
                "rmdir": (lambda i: m.rmdir(f"/a/b/d{i}"), 1),  # is it empty
            }
            n = 3
            for name, (op, extra) in ops.items():
                await op(n)  # warms the hints of the paths it walks
                queries[0] = 0
                for i in range(n):
                    await op(i)
                assert queries[0] / n == extra, name
            assert await m.listxattr("/a/b/f") == ["user.x"]
            names = [e.name for e in (await m.readdir("/a/b")).entries]
            assert names == [b"f"]


async def test_scans_read_ahead_on_etcd_still_conflict_across_metas(tmp_path: Path) -> None:
    """Two metas on one etcd. Meta a's rmdir (its emptiness scan read ahead)
    and unlink (its session scan read ahead) take their snapshot, then meta
    b creates an entry in that directory and opens that file, then a
    commits: a's commits must conflict and re-run, so the directory is not
    removed with an entry in it and the file is not dropped while open."""
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        stores = [EtcdStore.from_url(etcd.url("meta")) for _ in range(2)]
        servers = [
            MetaServer(
                make_config(alloc_batch=1024, **_QUIET),
                kv=kv,
                storage=FakeChunkStore(),
                cluster=StaticCluster(CHAINS),
            )
            for kv in stores
        ]
        for s in servers:
            await s.start()
        a, b = (DirectMetaClient(s.ns, user=ROOT, timeout_s=30.0) for s in servers if s.ns)
        b_done = asyncio.Event()
        plain_commit = stores[0]._commit

        async def commit_after_b(snapshot: Snapshot, tx: Any) -> None:
            await b_done.wait()  # b commits between a's read and a's commit
            await plain_commit(snapshot, tx)

        async def then_b(op: Awaitable[Any]) -> Any:
            await asyncio.sleep(0.05)  # after a's reads at begin
            try:
                return await op
            finally:
                b_done.set()

        async def race(mine: Awaitable[Any], theirs: Awaitable[Any]) -> list[Any]:
            b_done.clear()
            stores[0]._commit = commit_after_b  # type: ignore[method-assign]
            try:
                return await asyncio.gather(mine, then_b(theirs), return_exceptions=True)
            finally:
                stores[0]._commit = plain_commit  # type: ignore[method-assign]

        try:
            for i in range(3):
                await a.mkdir(f"/d{i}", 0o755)
                await a.create(f"/f{i}", 0o644, exclusive=True, write=False)
                await a.stat(f"/d{i}")  # a's hints reach both: its scans are read ahead
                await a.stat(f"/f{i}")
                rmdir, made = await race(
                    a.rmdir(f"/d{i}"), b.create(f"/d{i}/x", 0o644, exclusive=True, write=False)
                )
                assert not isinstance(made, BaseException), made
                assert isinstance(rmdir, ChainfsError) and rmdir.errno == errno.ENOTEMPTY, rmdir
                assert [e.name for e in (await b.readdir(f"/d{i}")).entries] == [b"x"]

                unlinked, opened = await race(a.unlink(f"/f{i}"), b.open(f"/f{i}", session=True))
                assert unlinked is None and not isinstance(opened, BaseException)
                (found,) = await b.batch_stat([opened.inode.ino])
                assert not isinstance(found, ChainfsError), found  # open: kept
                await b.end_sessions([(opened.inode.ino, opened.session_id)])
                (found,) = await b.batch_stat([opened.inode.ino])
                assert isinstance(found, ChainfsError) and found.errno == errno.ENOENT
        finally:
            for c in (a, b):
                await c.aclose()
            for s in servers:
                await s.stop()
            for kv in stores:
                await kv.close()
