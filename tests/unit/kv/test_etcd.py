"""etcd backend specifics against a real etcd member: key prefixes, compaction,
unreachable clusters, oversized transactions, and exactly-once commits when a
commit's response is lost."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from typing import Any

import pytest
from aetcd import rpc

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.kv.base import TxnTooOld
from chainfs.kv.etcd import EtcdStore, _EtcdSnapshot, _Retryable
from chainfs.testing.etcd import EtcdCluster
from tests.conftest import etcd_rpc_counts
from tests.unit.kv.test_conformance import put_all

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


@pytest.mark.parametrize("prefetch", [None, [b"n"]])
async def test_store_compacts_history_and_open_transactions_stay_correct(
    etcd_cluster: EtcdCluster, prefetch: list[bytes] | None
) -> None:
    # With prefetch, the snapshot's revision is fixed by the read ahead at begin.
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

        assert await writer.transact(local_fn, prefetch=prefetch) == b"0"
        assert local_calls[0] == 1
        assert await other.transact(remote_fn, prefetch=prefetch) == b"0+local"
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


# -- reading ahead ---------------------------------------------------------------
def _calls(cluster: EtcdCluster) -> Counter[str]:
    return etcd_rpc_counts(cluster.members[0].client_url)


async def test_prefetch_is_one_txn_at_the_snapshot_revision(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster))
    other = EtcdStore.from_url(store.url)
    try:
        values = {b"i/%d" % i: b"v%d" % i for i in range(8)} | {b"empty": b""}
        await put_all(store, values)
        keys = [*values, b"absent", b"i/0"]  # a repeat is read once
        point = {k: await store.get(k) for k in keys}
        assert store.prefetches
        assert await other.get(b"later") is None  # other's one-time begin read is done

        async def fn(tx: Transaction) -> tuple[dict[bytes, bytes | None], bytes | None, Any]:
            snap = tx._snap
            assert isinstance(snap, _EtcdSnapshot) and snap.revision is not None
            assert dict(snap.ahead) == point  # read before fn ran
            before = (store.stats["reads"], _calls(etcd_cluster))
            await other.set(b"later", b"after the snapshot")
            got = {k: await tx.get(k) for k in keys}
            after = (store.stats["reads"], _calls(etcd_cluster))
            later = await tx.get(b"later")  # at the prefetch's revision: not there yet
            return got, later, (before, after)

        reads, calls = store.stats["reads"], _calls(etcd_cluster)
        got, later, (before, after) = await store.transact(fn, read_only=True, prefetch=keys)
        assert got == point
        assert later is None and await store.get(b"later") == b"after the snapshot"
        # One read at begin, counted by etcd itself: a Txn, no Range.
        assert before[0] - reads == 1
        assert before[1]["Txn"] - calls["Txn"] == 1
        assert before[1]["Range"] == calls["Range"]
        # The prefetched keys then cost nothing (other's set is one Txn, no Range).
        assert after[0] == before[0]
        assert after[1]["Range"] == before[1]["Range"]
        assert after[1]["Txn"] - before[1]["Txn"] == 1
    finally:
        await store.close()
        await other.close()


@pytest.mark.parametrize(
    ("change", "conflicts"),
    [
        ({b"unread": b"1", b"absent-unread": b"1"}, False),  # prefetched, never read by fn
        ({b"read": b"1"}, True),
        ({b"absent-read": b"1"}, True),  # read as absent, created since
    ],
)
async def test_only_prefetched_keys_fn_reads_conflict(
    etcd_cluster: EtcdCluster, change: dict[bytes, bytes], conflicts: bool
) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster))
    other = EtcdStore.from_url(store.url)
    try:
        await put_all(store, {b"read": b"0", b"unread": b"0"})
        seen: list[tuple[bytes | None, bytes | None]] = []

        async def fn(tx: Transaction) -> None:
            got = (await tx.get(b"read"), await tx.get(b"absent-read"))
            seen.append(got)
            if len(seen) == 1:
                await put_all(other, change)  # another process commits after our snapshot
            tx.set(b"out", b"%s/%s" % (got[0] or b"-", got[1] or b"-"))

        keys = [b"read", b"unread", b"absent-read", b"absent-unread"]
        await store.transact(fn, prefetch=keys)
        assert store.stats["conflicts"] == int(conflicts)
        if conflicts:  # the retry read the new value
            assert seen == [(b"0", None), (change.get(b"read", b"0"), change.get(b"absent-read"))]
        else:
            assert seen == [(b"0", None)]
        assert await store.get(b"out") == b"%s/%s" % (
            change.get(b"read", b"0"),
            change.get(b"absent-read", b"-"),
        )
    finally:
        await store.close()
        await other.close()


async def test_prefetch_past_max_txn_ops_stays_at_one_revision(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster, "?max_txn_ops=4"))
    other = EtcdStore.from_url(store.url)
    real_read = store._read
    try:
        keys = [b"k%02d" % i for i in range(10)]
        await put_all(other, {k: b"old" for k in keys})

        async def read_then_race(req: Any, method: str = "Range") -> Any:
            resp = await real_read(req, method)
            if method == "Txn":  # a read ahead (commits do not come through _read)
                await put_all(other, {k: b"new" for k in keys})  # between the Txns
            return resp

        store._read = read_then_race  # type: ignore[method-assign]

        async def fn(tx: Transaction) -> list[bytes | None]:
            return [await tx.get(k) for k in keys]

        reads = store.stats["reads"]
        assert await store.transact(fn, read_only=True, prefetch=keys) == [b"old"] * 10
        assert store.stats["reads"] - reads == 3  # 4 + 4 + 2 keys
    finally:
        store._read = real_read  # type: ignore[method-assign]
        await store.close()
        await other.close()


async def test_prefetch_of_a_closed_store_is_ebadf(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster))
    await store.close()
    with pytest.raises(ChainfsError) as e:
        await store.transact(lambda tx: tx.get(b"k"), prefetch=[b"k"])
    assert e.value.code == Code.EBADF
    assert not list(store._open_snapshots)


async def test_prefetch_compacted_between_its_txns_is_retried(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster, "?max_txn_ops=2"))
    other = EtcdStore.from_url(store.url)
    real_read = store._read
    compacted = [0]
    try:
        keys = [b"a", b"b", b"c"]
        await put_all(other, {k: b"old" for k in keys})

        async def read_then_compact(req: Any, method: str = "Range") -> Any:
            resp = await real_read(req, method)
            if method == "Txn" and compacted[0] == 0:
                # Another process moves on and compacts past our revision, mid read ahead.
                compacted[0] = 1
                await put_all(other, {b"a": b"new"})
                stub = await other._stub(other._current)
                await stub.Compact(
                    rpc.CompactionRequest(revision=other._known_revision, physical=True)
                )
            return resp

        store._read = read_then_compact  # type: ignore[method-assign]

        async def fn(tx: Transaction) -> list[bytes | None]:
            return [await tx.get(k) for k in keys]

        got = await store.transact(fn, read_only=True, prefetch=keys)
        assert got == [b"new", b"old", b"old"]  # the second attempt, at a fresh revision
        assert store.stats["conflicts"] == 1
        assert not list(store._open_snapshots)
    finally:
        store._read = real_read  # type: ignore[method-assign]
        await store.close()
        await other.close()


async def test_a_key_read_again_is_one_range_call(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore.from_url(_url(etcd_cluster))
    try:
        await put_all(store, {b"k": b"v"})

        async def fn(tx: Transaction) -> Counter[str]:
            await tx.get(b"k")  # fixes the revision: one Range
            before = _calls(etcd_cluster)
            for _ in range(3):
                assert await tx.get(b"k") == b"v"
                assert await tx.get(b"absent") is None
            after = _calls(etcd_cluster)
            tx.set(b"out", b"x")
            return after - before

        assert await store.transact(fn) == Counter({"Range": 1})  # b"absent", once
        # The commit compared both keys as read (one etcd Txn, no conflict).
        assert store.stats["conflicts"] == 0 and await store.get(b"out") == b"x"
    finally:
        await store.close()
