"""One conformance suite for every KV backend (memory, rocksdb, etcd).

Concurrency is made deterministic by committing a second transaction from
inside the first one's function, between its reads and its commit.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import KVStore, RetryPolicy, Transaction, prefix_end
from chainfs.kv.base import MAX_CACHED_READS
from tests.unit.kv.conftest import FAST_RETRY

pytestmark = pytest.mark.timeout(60)


async def put_all(store: KVStore, items: dict[bytes, bytes]) -> None:
    async def fn(tx: Transaction) -> None:
        for k, v in items.items():
            tx.set(k, v)

    await store.transact(fn)


async def scan(store: KVStore, begin: bytes = b"", end: bytes = b"\xff", **kw: Any) -> list:
    return await store.transact(lambda tx: tx.get_range(begin, end, **kw), read_only=True)


async def test_get_set_clear(store: KVStore) -> None:
    assert await store.get(b"a") is None
    await store.set(b"a", b"1")
    assert await store.get(b"a") == b"1"
    await store.set(b"a", b"2")
    assert await store.get(b"a") == b"2"

    async def clear(tx: Transaction) -> None:
        tx.clear(b"a")

    await store.transact(clear)
    assert await store.get(b"a") is None
    await store.transact(clear)  # clearing an absent key is fine
    await store.set(b"", b"empty key")
    await store.set(b"bin\x00\xff", b"")
    assert await store.get(b"") == b"empty key"
    assert await store.get(b"bin\x00\xff") == b""


async def test_get_range_bounds_limit_reverse(store: KVStore) -> None:
    keys = [b"k%02d" % i for i in range(20)]
    await put_all(store, {k: k.upper() for k in keys} | {b"j": b"x", b"l": b"y"})
    assert [k for k, _ in await scan(store, b"k", b"l")] == keys
    assert await scan(store, b"k05", b"k08") == [(k, k.upper()) for k in keys[5:8]]
    assert [k for k, _ in await scan(store, b"k", b"l", limit=3)] == keys[:3]
    assert [k for k, _ in await scan(store, b"k", b"l", reverse=True)] == keys[::-1]
    assert [k for k, _ in await scan(store, b"k", b"l", limit=4, reverse=True)] == keys[:-5:-1]
    assert [k for k, _ in await scan(store, b"k05", b"k10", limit=2, reverse=True)] == [
        b"k09",
        b"k08",
    ]
    assert await scan(store, b"k10", b"k10") == []
    assert await scan(store, b"k10", b"k05") == []
    assert [k for k, _ in await scan(store, b"k", prefix_end(b"k"))] == keys
    assert len(await scan(store, b"", b"\xff")) == 22


async def test_read_your_writes(store: KVStore) -> None:
    await put_all(store, {b"a": b"1", b"b": b"2", b"c": b"3", b"d": b"4", b"e": b"5"})

    async def fn(tx: Transaction) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tx.set(b"a", b"new")
        tx.clear(b"b")
        tx.set(b"bb", b"inserted")
        out["a"] = await tx.get(b"a")
        out["b"] = await tx.get(b"b")
        out["range"] = await tx.get_range(b"a", b"z")
        tx.clear_range(b"c", b"e")
        out["c"] = await tx.get(b"c")
        tx.set(b"d", b"again")  # a write after clear_range wins
        out["after_clear"] = await tx.get_range(b"a", b"z")
        out["limited"] = await tx.get_range(b"a", b"z", limit=2, reverse=True)
        return out

    out = await store.transact(fn)
    assert out["a"] == b"new"
    assert out["b"] is None
    assert out["range"] == [
        (b"a", b"new"),
        (b"bb", b"inserted"),
        (b"c", b"3"),
        (b"d", b"4"),
        (b"e", b"5"),
    ]
    assert out["c"] is None
    assert out["after_clear"] == [
        (b"a", b"new"),
        (b"bb", b"inserted"),
        (b"d", b"again"),
        (b"e", b"5"),
    ]
    assert out["limited"] == [(b"e", b"5"), (b"d", b"again")]
    # ...and the commit stored exactly what the transaction saw.
    assert await scan(store, b"a", b"z") == out["after_clear"]


async def test_limited_range_past_a_large_clear(store: KVStore) -> None:
    await put_all(store, {b"k%04d" % i: b"v" for i in range(1500)})

    async def fn(tx: Transaction) -> tuple[list, list]:
        tx.clear_range(b"k0000", b"k1400")
        forward = await tx.get_range(b"k", b"l", limit=5)
        tx.clear_range(b"k1402", b"k1500")
        backward = await tx.get_range(b"k", b"l", limit=5, reverse=True)
        return [k for k, _ in forward], [k for k, _ in backward]

    forward, backward = await store.transact(fn)
    assert forward == [b"k%04d" % i for i in range(1400, 1405)]
    assert backward == [b"k1401", b"k1400"]


async def test_snapshot_isolation(store: KVStore) -> None:
    await put_all(store, {b"a": b"old", b"r1": b"x"})

    async def fn(tx: Transaction) -> tuple[Any, ...]:
        first = await tx.get(b"a")
        await put_all(store, {b"a": b"new", b"r2": b"y"})  # commits meanwhile
        return first, await tx.get(b"a"), await tx.get_range(b"r", b"s")

    assert await store.transact(fn, read_only=True) == (b"old", b"old", [(b"r1", b"x")])
    assert await store.get(b"a") == b"new"


def counting(fn: Callable[[Transaction], Awaitable[Any]]) -> tuple[list[int], Callable]:
    calls = [0]

    async def wrapped(tx: Transaction) -> Any:
        calls[0] += 1
        return await fn(tx)

    return calls, wrapped


async def test_write_skew_is_prevented(store: KVStore) -> None:
    # Invariant: at least one of the two doctors stays on call.
    await put_all(store, {b"alice": b"on", b"bob": b"on"})

    async def go_off(me: bytes, other: bytes, race: bool) -> bool:
        async def fn(tx: Transaction) -> bool:
            mine, theirs = await tx.get(me), await tx.get(other)
            if race and calls[0] == 1:
                await store.transact(other_goes_off)  # the racing transaction commits first
            if mine == b"on" and theirs == b"on":
                tx.set(me, b"off")
                return True
            return False

        calls, wrapped = counting(fn)
        result = await store.transact(wrapped)
        return result and calls[0] == 2

    async def other_goes_off(tx: Transaction) -> None:
        if await tx.get(b"alice") == b"on" and await tx.get(b"bob") == b"on":
            tx.set(b"bob", b"off")

    # Alice's first attempt conflicts; her retry sees Bob off and stays on.
    assert await go_off(b"alice", b"bob", race=True) is False
    assert (await store.get(b"alice"), await store.get(b"bob")) == (b"on", b"off")


async def test_conflict_on_read_key_and_none_on_unrelated(store: KVStore) -> None:
    await put_all(store, {b"x": b"0", b"y": b"0"})

    async def bump(tx: Transaction, key: bytes) -> None:
        tx.set(key, str(int(await tx.get(key) or b"0") + 1).encode())

    async def fn(tx: Transaction) -> None:
        v = await tx.get(b"x")
        if calls[0] == 1:
            await store.transact(lambda t: bump(t, b"x"))
            await store.transact(lambda t: bump(t, b"unrelated"))
        tx.set(b"x", str(int(v or b"0") + 10).encode())

    calls, wrapped = counting(fn)
    await store.transact(wrapped)
    assert calls[0] == 2  # the lost update was detected and retried
    assert await store.get(b"x") == b"11"

    async def fn2(tx: Transaction) -> None:
        await tx.get(b"y")
        if calls2[0] == 1:
            await store.transact(lambda t: bump(t, b"x"))  # not read here
        tx.set(b"y", b"1")

    calls2, wrapped2 = counting(fn2)
    await store.transact(wrapped2)
    assert calls2[0] == 1


async def test_absent_key_read_conflicts_with_its_creation(store: KVStore) -> None:
    async def create_if_absent(tx: Transaction) -> None:
        if await tx.get(b"lock") is None:
            if calls[0] == 1:
                await put_all(store, {b"lock": b"other"})
            tx.set(b"lock", b"me")

    calls, wrapped = counting(create_if_absent)
    await store.transact(wrapped)
    assert calls[0] == 2
    assert await store.get(b"lock") == b"other"


@pytest.mark.parametrize("change", ["insert", "update", "clear", "clear_range"])
async def test_range_read_conflicts(store: KVStore, change: str) -> None:
    await put_all(store, {b"d/1": b"a", b"d/3": b"b", b"other": b"z"})

    async def racer(tx: Transaction) -> None:
        if change == "insert":
            tx.set(b"d/2", b"new")
        elif change == "update":
            tx.set(b"d/3", b"changed")
        elif change == "clear":
            tx.clear(b"d/1")
        else:
            tx.clear_range(b"d/0", b"d/2")

    async def count_dir(tx: Transaction) -> None:
        entries = await tx.get_range(b"d/", prefix_end(b"d/"))
        if calls[0] == 1:
            await store.transact(racer)
        tx.set(b"count", str(len(entries)).encode())

    calls, wrapped = counting(count_dir)
    await store.transact(wrapped)
    assert calls[0] == 2
    expected = len(await scan(store, b"d/", prefix_end(b"d/")))
    assert await store.get(b"count") == str(expected).encode()


async def test_limited_scan_conflicts_only_on_what_it_covered(store: KVStore) -> None:
    await put_all(store, {b"q/%d" % i: b"v" for i in range(6)})

    async def fn(tx: Transaction) -> None:
        await tx.get_range(b"q/", b"q0", limit=2)  # covers q/0 .. q/1
        if calls[0] == 1:
            await put_all(store, {b"q/5": b"changed"})
        tx.set(b"head", b"seen")

    calls, wrapped = counting(fn)
    await store.transact(wrapped)
    assert calls[0] == 1


async def test_snapshot_reads_do_not_conflict(store: KVStore) -> None:
    async def fn(tx: Transaction) -> None:
        await tx.get(b"hint", snapshot=True)
        await tx.get_range(b"h", b"i", snapshot=True)
        if calls[0] == 1:
            await put_all(store, {b"hint": b"changed"})
        tx.set(b"out", b"1")

    calls, wrapped = counting(fn)
    await store.transact(wrapped)
    assert calls[0] == 1


async def test_add_read_conflict_key(store: KVStore) -> None:
    async def fn(tx: Transaction) -> None:
        tx.add_read_conflict_key(b"guard")
        if calls[0] == 1:
            await put_all(store, {b"guard": b"moved"})
        tx.set(b"out", b"1")

    calls, wrapped = counting(fn)
    await store.transact(wrapped)
    assert calls[0] == 2


async def test_read_only_transactions(store: KVStore) -> None:
    await store.set(b"a", b"1")

    async def writes(tx: Transaction) -> None:
        tx.set(b"a", b"2")

    with pytest.raises(ChainfsError) as e:
        await store.transact(writes, read_only=True)
    assert e.value.errno == errno.EROFS
    assert await store.get(b"a") == b"1"

    async def reads(tx: Transaction) -> Any:
        first = await tx.get(b"a")
        await put_all(store, {b"a": b"changed"})
        return first

    # A read-only transaction never conflicts: it is serialized at its snapshot.
    calls, wrapped = counting(reads)
    assert await store.transact(wrapped, read_only=True) == b"1"
    assert calls[0] == 1


async def test_retry_exhaustion_raises_txn_conflict(new_url: Callable[[], str]) -> None:
    store = kv.open(new_url(), RetryPolicy(max_attempts=3, backoff_initial_ms=0.1))
    try:
        await store.set(b"hot", b"0")

        async def always_loses(tx: Transaction) -> None:
            v = await tx.get(b"hot")
            await store.set(b"hot", b"bumped %d" % calls[0])  # someone always wins the race
            tx.set(b"hot", (v or b"") + b"!")

        calls, wrapped = counting(always_loses)
        with pytest.raises(ChainfsError) as e:
            await store.transact(wrapped)
        assert e.value.code == Code.TXN_CONFLICT
        assert calls[0] == 3
        assert await store.get(b"hot") == b"bumped 3"
    finally:
        await store.close()


async def test_fn_exception_commits_nothing(store: KVStore) -> None:
    async def fails(tx: Transaction) -> None:
        tx.set(b"a", b"1")
        raise ValueError("user error")

    with pytest.raises(ValueError, match="user error"):
        await store.transact(fails)
    assert await store.get(b"a") is None


async def test_large_values_and_many_keys(store: KVStore) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    await store.set(b"big", big)
    assert await store.get(b"big") == big
    many = {b"m/%05d" % i: b"%d" % i * 10 for i in range(1000)}
    await put_all(store, many)
    got = await scan(store, b"m/", b"m0")
    assert dict(got) == many

    async def clear_all(tx: Transaction) -> None:
        tx.clear_range(b"m/", b"m0")

    await store.transact(clear_all)
    assert await scan(store, b"m/", b"m0") == []
    assert await store.get(b"big") == big


@pytest.mark.parametrize(
    "bad",
    [
        lambda tx: tx.get("str-key"),
        lambda tx: tx.get(1),
        lambda tx: tx.get_range("a", b"b"),
        lambda tx: tx.get_range(b"a", None),
        lambda tx: tx.get_range(b"a", b"b", limit=-1),
        lambda tx: _sync(tx.set, "k", b"v"),
        lambda tx: _sync(tx.set, b"k", "v"),
        lambda tx: _sync(tx.set, b"k", None),
        lambda tx: _sync(tx.clear, bytearray(b"k")),
        lambda tx: _sync(tx.clear_range, b"a", "b"),
    ],
)
async def test_bad_input_is_einval(store: KVStore, bad: Callable) -> None:
    with pytest.raises(ChainfsError) as e:
        await store.transact(bad)
    assert e.value.errno == errno.EINVAL
    assert await scan(store) == []


async def _sync(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def test_unknown_url_scheme() -> None:
    with pytest.raises(ChainfsError) as e:
        kv.open("redis://x")
    assert e.value.errno == errno.EINVAL


def test_prefix_end() -> None:
    assert prefix_end(b"abc") == b"abd"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\xff" * 64


async def test_prefetch_reads_the_snapshot_and_only_what_fn_reads_conflicts(
    store: KVStore,
) -> None:
    await put_all(store, {b"p/a": b"1", b"p/b": b"2", b"p/unread": b"3"})
    keys = [b"p/a", b"p/b", b"p/missing", b"p/unread"]

    async def fn(tx: Transaction) -> tuple[Any, ...]:
        missing = await tx.get(b"p/missing")  # the snapshot is taken by now
        if calls[0] == 1:
            # Commits after the snapshot: the prefetched values must not show it;
            # p/a is read below (a conflict), p/unread never is (none).
            await put_all(store, {b"p/a": b"changed", b"p/unread": b"changed"})
        tx.set(b"p/b", b"mine")
        got = (await tx.get(b"p/a"), await tx.get(b"p/b"), missing)
        tx.set(b"p/out", got[0] or b"")
        return got

    calls, wrapped = counting(fn)
    assert await store.transact(wrapped, prefetch=keys) == (b"changed", b"mine", None)
    assert calls[0] == 2  # the first attempt read p/a as of its snapshot ("1") and conflicted
    assert await store.get(b"p/out") == b"changed"

    async def blind(tx: Transaction) -> None:
        await tx.get(b"p/missing")
        if calls[0] == 1:
            await put_all(store, {b"p/unread": b"again"})
        tx.set(b"p/out2", b"x")

    calls, wrapped = counting(blind)
    await store.transact(wrapped, prefetch=[b"p/unread"])
    assert calls[0] == 1  # prefetched but never read: not in the read set

    with pytest.raises(ChainfsError) as e:
        await store.transact(blind, prefetch=[b"k%d" % i for i in range(kv.MAX_PREFETCH_KEYS + 1)])
    assert e.value.code == Code.EINVAL


async def test_a_key_read_again_costs_no_second_read_and_still_conflicts(
    store: KVStore,
) -> None:
    # Another client of the same data where the backend has them (etcd, postgresql).
    remote = store.url.startswith(("etcd", "postgresql"))
    other = kv.open(store.url, FAST_RETRY) if remote else store
    try:
        await put_all(store, {b"c/a": b"1"})
        seen: list[tuple[bytes | None, ...]] = []
        snapshot_reads: list[int] = []

        async def fn(tx: Transaction) -> None:
            snap_get = tx._snap.get
            n = [0]

            async def counted(key: bytes) -> bytes | None:
                n[0] += 1
                return await snap_get(key)

            tx._snap.get = counted  # type: ignore[method-assign]
            first = (await tx.get(b"c/a"), await tx.get(b"c/absent"))
            if not seen:  # commits after our snapshot, to both keys
                await put_all(other, {b"c/a": b"2", b"c/absent": b"now"})
            again = (await tx.get(b"c/a"), await tx.get(b"c/absent", snapshot=True))
            assert again == first  # one snapshot: the same values, whatever committed since
            seen.append(first)
            snapshot_reads.append(n[0])
            tx.set(b"c/out", first[0] or b"")

        await store.transact(fn)
        # The first attempt's read of c/a is still validated (and c/absent's too).
        assert seen == [(b"1", None), (b"2", b"now")]
        assert snapshot_reads == [2, 2]  # each key went to the snapshot once per attempt
        assert await store.get(b"c/out") == b"2"
    finally:
        if other is not store:
            await other.close()


async def test_cached_reads_are_bounded() -> None:
    store = kv.open("memory://")

    async def fn(tx: Transaction) -> int:
        for i in range(MAX_CACHED_READS + 10):
            await tx.get(b"b/%d" % i)
        return len(tx._cached_reads)

    assert await store.transact(fn, read_only=True) == MAX_CACHED_READS


async def test_get_many_reads_as_get_does_and_conflicts_alike(store: KVStore) -> None:
    remote = store.url.startswith(("etcd", "postgresql"))
    other = kv.open(store.url, FAST_RETRY) if remote else store
    try:
        await put_all(store, {b"m/a": b"1", b"m/b": b"2", b"m/c": b"3", b"m/x": b"9"})
        answers: list[list[bytes | None]] = []

        async def fn(tx: Transaction) -> None:
            tx.set(b"m/b", b"mine")
            tx.clear(b"m/c")
            tx.clear_range(b"m/x", b"m/y")
            # Read twice, keys repeated: our writes and clears win, absent is None.
            got = await tx.get_many([b"m/a", b"m/b", b"m/c", b"m/absent", b"m/x", b"m/a"])
            if not answers:  # commits after our snapshot, to a key read only by get_many
                await put_all(other, {b"m/a": b"changed"})
            assert await tx.get_many([b"m/a"]) == [got[0]]  # the snapshot's value again
            answers.append(got)
            tx.set(b"m/out", got[0] or b"")

        await store.transact(fn)
        assert answers == [
            [b"1", b"mine", None, None, None, b"1"],
            [b"changed", b"mine", None, None, None, b"changed"],  # the read conflicted
        ]
        assert await store.get(b"m/out") == b"changed"
        assert await store.transact(lambda tx: tx.get_many([]), read_only=True) == []
        with pytest.raises(ChainfsError) as e:
            await store.transact(lambda tx: tx.get_many(["m/a"]), read_only=True)  # type: ignore[list-item]
        assert e.value.code == Code.EINVAL
    finally:
        if other is not store:
            await other.close()


async def test_get_many_of_more_keys_than_one_etcd_txn_holds(etcd_cluster: Any) -> None:
    """Past max_txn_ops keys, get_many splits into several Txns, all at the
    snapshot's one revision."""
    url = etcd_cluster.url("many")
    store, writer = kv.open(url + "?max_txn_ops=8", FAST_RETRY), kv.open(url, FAST_RETRY)
    try:
        keys = [b"g/%03d" % i for i in range(30)]
        await put_all(writer, {k: k for k in keys[::2]})

        async def fn(tx: Transaction) -> list[bytes | None]:
            await tx.get(b"g/first")  # fixes the snapshot
            await put_all(writer, {k: b"later" for k in keys})
            return await tx.get_many(keys)

        got = await store.transact(fn, read_only=True)
        assert got == [k if i % 2 == 0 else None for i, k in enumerate(keys)]
    finally:
        await store.close()
        await writer.close()


async def test_prefetched_ranges_answer_as_scans_do_and_conflict_alike(store: KVStore) -> None:
    remote = store.url.startswith(("etcd", "postgresql"))
    other = kv.open(store.url, FAST_RETRY) if remote else store
    try:
        await put_all(store, {b"r/a": b"1", b"r/b": b"2", b"r/c": b"3", b"u/a": b"1"})
        ranges = [(b"r/", b"r0", 2), (b"u/", b"u0", 5), (b"e/", b"e0", 1)]
        seen: list[tuple[Any, ...]] = []

        async def gone(tx: Transaction) -> None:
            tx.clear(b"r/c")  # a deletion leaves no newer revision in the range
            tx.set(b"u/b", b"new")

        async def fn(tx: Transaction) -> None:
            first = await tx.get_range(b"r/", b"r0", limit=1)
            if not seen:  # after our snapshot: inside what we scan, and in a range never scanned
                await other.transact(gone)
            got = (
                first,
                await tx.get_range(b"r/", b"r0", limit=2),
                await tx.get_range(b"r/", b"r0", limit=3),  # more than was read ahead
                await tx.get_range(b"r/", b"r0"),
                await tx.get_range(b"e/", b"e0"),
                await tx.get_range(b"r/", b"r0", reverse=True, limit=1),
            )
            seen.append(got)
            tx.set(b"out", b"x")

        await store.transact(fn, prefetch_ranges=ranges)
        abc = [(b"r/a", b"1"), (b"r/b", b"2"), (b"r/c", b"3")]
        assert seen[0] == (abc[:1], abc[:2], abc, abc, [], abc[2:])
        assert seen[1] == (abc[:1], abc[:2], abc[:2], abc[:2], [], abc[1:2])
        assert len(seen) == 2  # r/c was scanned: a conflict; u/ was never scanned

        calls = [0]

        async def unscanned(tx: Transaction) -> None:
            calls[0] += 1
            await tx.get(b"r/b")
            if calls[0] == 1:
                await put_all(other, {b"u/c": b"new"})
            tx.set(b"out", b"y")

        await store.transact(unscanned, prefetch_ranges=ranges)
        assert calls[0] == 1

        for bad in ([(b"r/", b"r0", 0)], [(b"r0", b"r/", 1)], [(b"a", b"b", 1)] * 9):
            with pytest.raises(ChainfsError) as e:
                await store.transact(unscanned, prefetch_ranges=bad)
            assert e.value.code == Code.EINVAL
    finally:
        if other is not store:
            await other.close()


async def test_a_key_deleted_after_a_prefetched_scan_saw_it_conflicts(store: KVStore) -> None:
    remote = store.url.startswith(("etcd", "postgresql"))
    other = kv.open(store.url, FAST_RETRY) if remote else store
    try:
        await put_all(store, {b"s/a": b"1", b"s/b": b"2"})
        seen: list[list[tuple[bytes, bytes]]] = []

        async def clear_a(tx: Transaction) -> None:
            tx.clear(b"s/a")

        async def fn(tx: Transaction) -> None:
            rows = await tx.get_range(b"s/", b"s0", limit=1)  # from the read at begin
            if not seen:
                await other.transact(clear_a)  # leaves nothing newer behind
            seen.append(rows)
            tx.set(b"out", rows[0][0] if rows else b"")

        await store.transact(fn, prefetch_ranges=[(b"s/", b"s0", 1)])
        assert seen == [[(b"s/a", b"1")], [(b"s/b", b"2")]]
        assert await store.get(b"out") == b"s/b"
    finally:
        if other is not store:
            await other.close()
