"""The KV cache's location cache on a real cluster (mgmtd, meta, 3 storage nodes).

What a user relies on: a repeated get costs no metadata call; this handle's own
puts and removes are seen at once; another client's remove or overwrite is seen
within ``location_cache_ms``, and until then a get returns the old value whole
(never a part, zeros or a mix); a location whose entry is gone falls back to
meta; capabilities are renewed at meta however long a location is trusted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.common.metrics import REGISTRY
from chainfs.local import LocalCluster
from chainfs.meta_service.caps import REUSE_STEPS
from chainfs.meta_service.config import MetaConfig
from tests.integration.client_fixtures import poll, stored_chunks

pytestmark = pytest.mark.timeout(180)

LONG_MS = 600_000.0  # a location trusted for the whole test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("kvloc")) as c:
        yield c


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> Any:
    return cluster.client()


@pytest.fixture(scope="module")
def other_fs(cluster: LocalCluster) -> Any:
    """Another client (its own connection, capabilities and caches)."""
    return cluster.client()


_dirs = iter(range(1 << 30))


@pytest.fixture
def cache_dir() -> str:
    return f"/kvloc{next(_dirs)}"


class _CountingSync:
    """A SyncDataClient whose requests (BatchStats from batch_stat_now) are counted
    as they are sent."""

    def __init__(self, sync: Any, methods: list[str]) -> None:
        self._sync, self._methods = sync, methods

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self._methods.append("BatchStat")
        return self._sync.request(*args, **kwargs)


class MetaCalls:
    """Counts the calls a client's MetaClient sends (by method name), from its
    loop and from callers' threads (``batch_stat_now``)."""

    def __init__(self, fs: Any) -> None:
        self.methods: list[str] = []
        meta = fs.aio.io.meta
        real, real_now = meta.call, meta.batch_stat_now

        async def counted(method: str, request: Any) -> Any:
            self.methods.append(method)
            return await real(method, request)

        def counted_now(sync: Any, *args: Any, **kwargs: Any) -> Any:
            return real_now(_CountingSync(sync, self.methods), *args, **kwargs)

        meta.call, meta.batch_stat_now = counted, counted_now
        self._undo = lambda: (delattr(meta, "call"), delattr(meta, "batch_stat_now"))

    def take(self) -> list[str]:
        out, self.methods = self.methods, []
        return out

    def close(self) -> None:
        self._undo()


@pytest.fixture
def meta_calls(fs: Any) -> Iterator[MetaCalls]:
    calls = MetaCalls(fs)
    yield calls
    calls.close()


def _value(tag: int, size: int = 4096) -> bytes:
    return bytes([tag % 251]) * (size - 8) + tag.to_bytes(8, "little")


def test_repeated_gets_make_no_metadata_call(
    fs: Any, meta_calls: MetaCalls, cache_dir: str
) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"k{i}" for i in range(20)]
    kv.batch_put(keys, [_value(i) for i in range(20)])
    assert kv.batch_get(keys) == [_value(i) for i in range(20)]
    assert "BatchStat" in meta_calls.take()  # the first get of each key looks it up
    for _ in range(3):
        for i, k in enumerate(keys):
            assert kv.get(k) == _value(i)
        assert kv.batch_get(keys[::-1]) == [_value(i) for i in range(20)][::-1]
        buf = bytearray(4096)
        assert kv.get_into("k3", buf) == 4096 and bytes(buf) == _value(3)
    assert meta_calls.take() == []
    # A miss is not remembered: it asks meta every time.
    assert kv.get("absent") is None
    meta_calls.take()
    assert kv.get("absent") is None
    assert meta_calls.take() == ["BatchStat"]
    kv.close()


def test_exists_uses_the_location_cache_and_sees_own_removes(
    fs: Any, meta_calls: MetaCalls, cache_dir: str
) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"e{i}" for i in range(10)]
    kv.batch_put(keys, [_value(i) for i in range(10)])
    assert kv.batch_exists(keys).leading_hits == 10
    meta_calls.take()
    for _ in range(3):
        assert all(kv.exists(k) for k in keys)
        assert kv.batch_exists(keys[::-1]).leading_hits == 10
    assert meta_calls.take() == []  # header reads from storage only
    assert kv.remove("e3")
    assert not kv.exists("e3")  # this handle's remove: seen at once
    assert kv.batch_exists(keys).leading_hits == 3
    kv.close()


def test_own_puts_and_removes_are_seen_at_once(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    kv.put("k", _value(1))
    assert kv.get("k") == _value(1)
    assert kv.put("k", _value(2), overwrite=True)
    assert kv.get("k") == _value(2)
    assert kv.remove("k")
    assert kv.get("k") is None
    assert kv.put("k", _value(3))
    assert kv.get("k") == _value(3)
    assert kv.batch_remove(["k"]) == [True]
    assert kv.batch_get(["k"]) == [None]
    kv.close()


def test_another_clients_remove_is_a_miss_after_location_cache_ms(
    fs: Any, other_fs: Any, cache_dir: str
) -> None:
    age_ms = 300.0
    kv = fs.kvcache(cache_dir, location_cache_ms=age_ms)
    other = other_fs.kvcache(cache_dir)
    kv.batch_put(["a", "b"], [_value(1), _value(2)])
    assert kv.batch_get(["a", "b"]) == [_value(1), _value(2)]
    assert other.remove("a")
    removed_at = time.monotonic()
    # Until location_cache_ms has passed: the old value whole, or already a miss.
    assert kv.get("a") in (_value(1), None)
    time.sleep(max(0.0, age_ms / 1000 - (time.monotonic() - removed_at)) + 0.05)
    assert kv.get("a") is None
    assert kv.batch_get(["a", "b"]) == [None, _value(2)]
    kv.close()
    other.close()


def test_another_clients_overwrite_is_seen_after_location_cache_ms(
    fs: Any, other_fs: Any, cache_dir: str
) -> None:
    age_ms = 300.0
    kv = fs.kvcache(cache_dir, location_cache_ms=age_ms)
    other = other_fs.kvcache(cache_dir)
    kv.put("k", _value(1))
    assert kv.get("k") == _value(1)
    # Gets keep going (the background renewal runs): the overwrite is still seen in time.
    assert other.put("k", _value(2), overwrite=True)
    changed_at = time.monotonic()
    while time.monotonic() - changed_at < age_ms / 1000 + 0.05:
        assert kv.get("k") in (_value(1), _value(2))
        time.sleep(0.01)
    assert kv.get("k") == _value(2)
    kv.close()
    other.close()


def test_a_location_whose_entry_and_chunks_are_gone_falls_back(
    fs: Any, other_fs: Any, meta_calls: MetaCalls, cache_dir: str
) -> None:
    """The location is trusted for long, but its file was removed (or replaced) by
    another client and meta's GC dropped the chunks: the read finds zeros, fails
    the check and asks meta, which answers a miss (or the new value)."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    other = other_fs.kvcache(cache_dir)
    big = 3 * 4096 * 1024 + 11  # spans chunks: the later ones land in the caller's buffer
    kv.batch_put(["gone", "replaced", "kept"], [_value(1, big), _value(2), _value(3)])
    assert kv.batch_get(["gone", "replaced", "kept"]) == [_value(1, big), _value(2), _value(3)]
    infos = kv._loop.run(kv.aio._entries.locate([kv.aio._key(k) for k in ("gone", "replaced")]))
    assert other.remove("gone")
    assert other.put("replaced", _value(4), overwrite=True)

    async def chunks_gone() -> None:
        deadline = time.monotonic() + 30
        for loc in infos:
            for chain in set(loc.info.layout.chains):
                while await stored_chunks(fs.aio, chain, loc.info.ino):
                    assert time.monotonic() < deadline, "chunks still there"
                    await asyncio.sleep(0.05)

    kv._loop.run(chunks_gone())
    meta_calls.take()
    retries = kv.stats().read_retries
    assert kv.batch_get(["gone", "replaced", "kept"]) == [None, _value(4), _value(3)]
    assert "BatchStat" in meta_calls.take()
    buf = bytearray(big)
    assert kv.get_into("gone", buf) == -1
    assert kv.get("replaced") == _value(4)
    assert kv.stats().read_retries >= retries + 2  # the two stale locations
    kv.close()
    other.close()


def test_capabilities_are_renewed_however_long_a_location_is_trusted(
    cluster: LocalCluster, cache_dir: str
) -> None:
    """This client renews a capability at most half a second after meta signed it
    (meta rounds an expiry up by less than a step, so a capability lives less
    than ttl + step), so a get then must fetch one from meta again, while the
    location itself is still trusted."""
    ttl_ms = MetaConfig().capability_ttl_ms
    renew_before_ms = ttl_ms + ttl_ms // REUSE_STEPS - 500
    fs = cluster.client(config=ClientConfig(capability_renew_before_ms=renew_before_ms))
    calls = MetaCalls(fs)
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    kv.put("k", _value(7))
    assert kv.get("k") == _value(7)
    time.sleep(0.7)
    calls.take()
    assert kv.get("k") == _value(7)
    assert "BatchStat" in calls.take()  # the capability, fetched by inode
    calls.close()
    kv.close()


def test_location_cache_settings_are_bounded(fs: Any, cache_dir: str) -> None:
    for bad in ({"location_cache_ms": -1.0}, {"location_cache_entries": -1}):
        with pytest.raises(ValueError):
            fs.kvcache(cache_dir, **bad)
    kv = fs.kvcache(cache_dir, location_cache_entries=2, location_cache_ms=LONG_MS)
    keys = [f"k{i}" for i in range(5)]
    kv.batch_put(keys, [_value(i) for i in range(5)])
    assert kv.batch_get(keys) == [_value(i) for i in range(5)]
    assert len(kv.aio._entries.locations) == 2  # the most recently used
    off = fs.kvcache(cache_dir, location_cache_ms=0)
    assert off.get("k1") == _value(1) and len(off.aio._entries.locations) == 0
    kv.close()
    off.close()


def test_a_batch_get_is_one_storage_frame_per_node(
    fs: Any, meta_calls: MetaCalls, cache_dir: str
) -> None:
    """64 cached keys spread over every chain: one batched read per storage node,
    and no metadata call, from the calling thread (a sync handle) and on the
    loop (the async API) alike."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"b{i}" for i in range(64)]
    kv.batch_put(keys, [_value(i) for i in range(64)])
    assert kv.batch_get(keys) == [_value(i) for i in range(64)]
    storage = fs.aio.io.storage
    real = storage._read_node
    nodes: list[int] = []

    async def counted(routing: Any, reqs: Any, items: Any, *rest: Any) -> None:
        nodes.append(routing.targets[items[0][1]].node_id)
        await real(routing, reqs, items, *rest)

    sync = kv.aio._sync_gets._reader.sync
    real_many = sync.request_many
    addresses: list[str] = []

    def counted_many(requests: Any) -> Any:
        addresses.extend(r.address for r in requests)
        return real_many(requests)

    storage._read_node = counted
    sync.request_many = counted_many
    try:
        meta_calls.take()
        assert kv.batch_get(keys) == [_value(i) for i in range(64)]  # the calling thread
        assert not nodes
        assert kv._loop.run(kv.aio.batch_get(keys)) == [_value(i) for i in range(64)]
    finally:
        del storage._read_node
        del sync.request_many
    assert meta_calls.take() == []
    assert len(nodes) == len(set(nodes)) and len(set(nodes)) > 1, nodes
    assert len(addresses) == len(set(addresses)) == len(set(nodes)), (addresses, nodes)
    kv.close()


def test_own_overwrite_is_seen_at_once_while_other_threads_read(fs: Any, cache_dir: str) -> None:
    """Gets from other threads keep looking keys up (and caching them) while this
    handle overwrites one: after each put returns, a get gives what it put."""
    import threading

    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"r{i}" for i in range(8)]
    kv.batch_put(["w", *keys], [_value(0), *(_value(100 + i) for i in range(8))])
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        seen = 0
        while not stop.is_set():
            got = kv.batch_get(["w", *keys])
            if got[1:] != [_value(100 + i) for i in range(8)]:
                errors.append("a steady key read wrong")
            tag = int.from_bytes(got[0][-8:], "little") if got[0] is not None else -1
            if tag < seen:
                errors.append(f"w went back from {seen} to {tag}")
            seen = max(seen, tag)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for seq in range(1, 30):
            assert kv.put("w", _value(seq), overwrite=True)
            assert kv.get("w") == _value(seq)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert errors == []
    kv.close()


def test_a_key_read_once_is_renewed_once_and_one_in_use_while_it_is(
    fs: Any, cache_dir: str
) -> None:
    """A key only its lookup's get has read is stat'ed again once, then left to
    age out (a reader loading blocks once costs meta one renewal each, not one
    every two thirds of an age for four ages); a key gets keep taking from the
    cache is renewed while they do. stats() and the client's metrics count both."""

    def meta_stats(why: str) -> float:
        got = REGISTRY.get_sample_value("chainfs_client_kvcache_meta_stats_total", {"why": why})
        return got or 0.0

    before = {why: meta_stats(why) for why in ("lookup", "renewal")}
    writer = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    writer.put("once", _value(1))
    writer.put("often", _value(2))
    age_s = 0.3
    kv = fs.kvcache(cache_dir, location_cache_ms=age_s * 1000)
    entries, renewer = kv.aio._entries, kv.aio._renewer
    assert kv.get("once") == _value(1)
    assert entries.looked_up == 1
    poll(lambda: renewer.renewed >= 1, "the one renewal of a key read once")
    time.sleep(5 * age_s)  # long enough for four more renewals under the old rule
    assert renewer.renewed == 1
    assert kv.get("often") == _value(2)

    def get_often() -> bool:
        assert kv.get("often") == _value(2)
        return renewer.renewed >= 4

    poll(get_often, "renewals of a key in use")
    s = kv.stats()
    assert s.renewals >= 4 and s.lookups >= 2 and s.hits >= 3
    # The process's metrics count them too (other handles may add to them).
    assert meta_stats("renewal") - before["renewal"] >= s.renewals
    assert meta_stats("lookup") - before["lookup"] >= s.lookups
    writer.close()
    kv.close()
