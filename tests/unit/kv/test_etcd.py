"""etcd backend specifics against a real etcd member: key prefixes, compaction,
unreachable clusters, oversized transactions, and exactly-once commits when a
commit's response is lost."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from typing import Any

import pytest
from aetcd import rpc

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.kv.base import TxnTooOld
from chainfs.kv.etcd import EtcdStore, _EtcdSnapshot, _Retryable
from chainfs.testing.etcd import EtcdCluster

pytestmark = pytest.mark.timeout(60)
_prefixes = itertools.count()


def _url(cluster: EtcdCluster, query: str = "") -> str:
    return cluster.url(f"e{next(_prefixes)}") + query


async def _raw_keys(store: EtcdStore) -> list[bytes]:
    """Every key in the etcd cluster, whatever its prefix."""
    resp = await store._read(rpc.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True))
    return [bytes(x.key) for x in resp.kvs]


async def test_stores_with_other_prefixes_do_not_see_each_other(
    etcd_cluster: EtcdCluster,
) -> None:
    a = kv.open(_url(etcd_cluster))
    b = kv.open(_url(etcd_cluster))
    assert isinstance(a, EtcdStore) and isinstance(b, EtcdStore)
    try:
        await a.set(b"k", b"from a")
        assert await b.get(b"k") is None
        await b.set(b"k", b"from b")
        assert await a.get(b"k") == b"from a"
        assert isinstance(a, EtcdStore)
        raw = await _raw_keys(a)
        assert a.prefix.encode() + b"/d/k" in raw and b.prefix.encode() + b"/d/k" in raw
    finally:
        await a.close()
        await b.close()
    # Closing removed the commit markers: only user data stays under the prefixes.
    observer = EtcdStore.from_url(_url(etcd_cluster))
    try:
        leftover = await _raw_keys(observer)
    finally:
        await observer.close()
    assert not [
        k for k in leftover if k.startswith((a.prefix.encode(), b.prefix.encode())) and b"/t/" in k
    ]


async def test_compacted_snapshot_is_retried(etcd_cluster: EtcdCluster) -> None:
    store = kv.open(_url(etcd_cluster))
    assert isinstance(store, EtcdStore)
    try:
        await store.set(b"a", b"1")
        calls = [0]

        async def fn(tx: Transaction) -> Any:
            calls[0] += 1
            first = await tx.get(b"a")
            if calls[0] == 1:
                await store.set(b"a", b"2")
                stub = await store._stub(store._current)
                await stub.Compact(
                    rpc.CompactionRequest(revision=store._known_revision, physical=True)
                )
            return first, await tx.get(b"b")  # at a revision that is gone now

        assert await store.transact(fn, read_only=True) == (b"2", None)
        assert calls[0] == 2
    finally:
        await store.close()


async def test_unreachable_cluster_is_a_bounded_unavailable_error() -> None:
    url = "etcd://127.0.0.1:1,127.0.0.1:2/x?op_timeout_ms=600&request_timeout_ms=200"
    store = kv.open(url)
    try:
        # A hang fails here (a bound, not a timing: op_timeout_ms is 0.6 s).
        async with asyncio.timeout(30):
            with pytest.raises(ChainfsError) as e:
                await store.get(b"k")
        assert e.value.code == Code.UNAVAILABLE
        assert "127.0.0.1:1,127.0.0.1:2" in e.value.message
    finally:
        await store.close()


async def test_too_many_ops_is_e2big(etcd_cluster: EtcdCluster) -> None:
    store = kv.open(_url(etcd_cluster, "?max_txn_ops=20"))

    async def fn(tx: Transaction) -> None:
        for i in range(30):
            tx.set(b"k%d" % i, b"v")

    with pytest.raises(ChainfsError) as e:
        await store.transact(fn)
    assert e.value.code == Code.E2BIG
    assert await store.transact(lambda tx: tx.get_range(b"", b"\xff"), read_only=True) == []
    await store.close()


@pytest.mark.parametrize("applied", [True, False])
async def test_lost_commit_response_applies_exactly_once(
    etcd_cluster: EtcdCluster, applied: bool
) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster))
    real_attempt = store._attempt
    lost = [0]

    async def flaky(method: str, req: Any, deadline: float) -> Any:
        # The first commit Txn either reaches etcd and loses its answer, or never arrives.
        if method == "Txn" and lost[0] == 0 and len(req.success) > 1:
            lost[0] += 1
            if applied:
                await real_attempt(method, req, deadline)
            raise _Retryable("UNAVAILABLE: simulated connection reset")
        return await real_attempt(method, req, deadline)

    try:
        await store.set(b"n", b"0")
        store._attempt = flaky  # type: ignore[method-assign]

        async def incr(tx: Transaction) -> None:
            tx.set(b"n", b"%d" % (int(await tx.get(b"n") or b"0") + 1))

        await store.transact(incr)
        assert lost[0] == 1
        assert store.stats["fences"] == 1
        assert await store.get(b"n") == b"1"
        await store.transact(incr)
        assert await store.get(b"n") == b"2"
    finally:
        store._attempt = real_attempt  # type: ignore[method-assign]
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "etcd:///prefix",
        "etcd://127.0.0.1:2379",
        "etcd://127.0.0.1:2379/",
        "etcd://127.0.0.1/prefix",
        "etcd://127.0.0.1:99999/prefix",
        "etcd://127.0.0.1:2379/p?op_timeout_ms=10&request_timeout_ms=100",
        "etcd://127.0.0.1:2379/p?bogus=1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ChainfsError) as e:
        kv.open(url)
    assert e.value.code in (Code.EINVAL, Code.CONFIG_ERROR)


async def _clear(tx: Transaction, key: bytes) -> None:
    tx.clear(key)


async def _read_at(store: EtcdStore, revision: int) -> bool:
    """True if etcd still has ``revision`` (a read there is not refused as compacted)."""
    try:
        await store._read(rpc.RangeRequest(key=store._data, revision=revision, limit=1))
    except TxnTooOld:
        return False
    return True


async def test_store_compacts_history_and_open_transactions_stay_correct(
    etcd_cluster: EtcdCluster,
) -> None:
    # `writer` compacts every 100 ms; `other` (another process, say) never does.
    url = _url(etcd_cluster)
    writer = EtcdStore.from_url(url + "?compact_interval_ms=100")
    other = EtcdStore.from_url(url + "?compact_interval_ms=0")
    try:
        await writer.set(b"n", b"0")
        first_revision = writer._known_revision
        local_calls, remote_calls = [0], [0]
        writes = itertools.count(1)

        async def churn_until(done: Any) -> None:
            # Creates and deletes, as a namespace's files come and go, until `done()`.
            async with asyncio.timeout(30):
                while not done():
                    i = next(writes)
                    await writer.set(b"f%d" % i, b"x")
                    await writer.transact(functools.partial(_clear, key=b"f%d" % i))
                    await asyncio.sleep(0.01)

        async def local_fn(tx: Transaction) -> bytes | None:
            # Open in the compacting store: its snapshot is never compacted under it.
            local_calls[0] += 1
            n = await tx.get(b"n")
            snap = tx._snap
            assert isinstance(snap, _EtcdSnapshot) and snap.revision is not None
            # Compaction reaches the snapshot, then a few more intervals pass.
            await churn_until(lambda: writer.compacted_revision >= snap.revision)
            later = time.monotonic() + 0.5
            await churn_until(lambda: time.monotonic() > later)
            assert writer._compact_mark > snap.revision  # unprotected, it would go past
            assert writer.compacted_revision == snap.revision
            assert await tx.get(b"f1") is None
            tx.set(b"n", (n or b"") + b"+local")
            return n

        async def remote_fn(tx: Transaction) -> bytes | None:
            # Open in another store: compacted under it, so retried, on a fresh snapshot.
            remote_calls[0] += 1
            n = await tx.get(b"n")
            snap = tx._snap
            assert isinstance(snap, _EtcdSnapshot) and snap.revision is not None
            if remote_calls[0] == 1:
                await churn_until(lambda: writer.compacted_revision > snap.revision)
            await tx.get_range(b"f", b"g", 0, False)  # at a compacted revision on try 1
            tx.set(b"n", (n or b"") + b"+remote")
            return n

        assert await writer.transact(local_fn) == b"0"
        assert local_calls[0] == 1
        assert await other.transact(remote_fn) == b"0+local"
        assert remote_calls[0] == 2
        assert await writer.get(b"n") == b"0+local+remote"
        # History is bounded: the first revision is gone, the data is all there.
        assert writer.compacted_revision > first_revision
        assert not await _read_at(other, first_revision)
        pairs = await other.transact(lambda tx: tx.get_range(b"", b"\xff"), read_only=True)
        assert pairs == [(b"n", b"0+local+remote")]
    finally:
        await writer.close()
        await other.close()


async def test_compactions_by_several_stores_are_harmless(etcd_cluster: EtcdCluster) -> None:
    url = _url(etcd_cluster, "?compact_interval_ms=100")
    a, b = EtcdStore.from_url(url), EtcdStore.from_url(url)
    try:
        async with asyncio.timeout(30):
            i = 0
            while min(a.stats["compactions"], b.stats["compactions"]) < 3:
                i += 1
                await (a if i % 2 else b).set(b"k%d" % (i % 5), b"%d" % i)
                await asyncio.sleep(0.01)
        assert await a.get(b"k%d" % (i % 5)) == b"%d" % i
        assert await b.get(b"k%d" % (i % 5)) == b"%d" % i
    finally:
        await a.close()
        await b.close()


def test_compact_interval_out_of_bounds_is_a_clear_error() -> None:
    with pytest.raises(ChainfsError) as e:
        EtcdStore.from_url("etcd://127.0.0.1:2379/x?compact_interval_ms=5")
    assert "compact_interval_ms must be 0 (off) or in [100, 3600000]" in e.value.message
