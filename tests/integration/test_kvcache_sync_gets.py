"""Sync gets read from the calling thread (no event-loop hop) on a real cluster.

What a user relies on: a get served that way returns exactly the bytes put;
another client's overwrite is seen within ``location_cache_ms`` and until then
the old value whole (docs/consistency.md); ``get_into`` served that way fills
the caller's buffer with the same bytes, and a value longer than the buffer is
ERANGE with the buffer untouched, as on the loop path; this handle's own overwrite is seen
at once; a storage node killed while locations are cached costs nothing but
the fallback (the right bytes still come back); many threads may get at once;
a fork()ed child gets right bytes over its own connections; 0 connections turns
the path off; bad settings are refused with the setting's name.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chainfs.client.kvcache import backend as kv_backend
from chainfs.client.kvcache.format import Key
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import WIRE_METHODS
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import module_cluster

pytestmark = pytest.mark.timeout(240)

LONG_MS = 600_000.0  # a location trusted for the whole test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "kvsync")


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> Any:
    return cluster.client()


@pytest.fixture(scope="module")
def other_fs(cluster: LocalCluster) -> Any:
    return cluster.client()


@pytest.fixture(autouse=True)
def _dirs_known_for_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard directories' inodes trusted for the whole test: these tests count
    which thread served a get, and on a slow host 5 s (the product's bound) can
    pass between opening a cache and its first get, sending lookups to the loop."""
    monkeypatch.setattr(kv_backend, "_DIR_INO_TTL_S", LONG_MS / 1000)


_dirs = iter(range(1 << 30))


@pytest.fixture
def cache_dir() -> str:
    return f"/kvsync{next(_dirs)}"


def _value(tag: int, size: int = 4096) -> bytes:
    return random.Random(tag).randbytes(size - 8) + tag.to_bytes(8, "little")


def _served(kv: Any) -> tuple[int, int]:
    c = kv.aio._sync_gets.counts()
    return c.served, c.fallbacks


def test_bytes_read_from_the_calling_thread_equal_bytes_put(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, sync_read_max_bytes=64 * 1024)
    sizes = {"empty": 0, "one": 1, "4k": 4096, "64k": 64 * 1024, "big": 64 * 1024 + 1}
    values = {k: _value(i, n) if n >= 8 else b"x" * n for i, (k, n) in enumerate(sizes.items())}
    kv.batch_put(list(values), list(values.values()))
    for k, v in values.items():  # the first get of each looks the key up first
        assert kv.get(k) == v
    served, _ = _served(kv)
    for _ in range(3):
        for k, v in values.items():
            assert kv.get(k) == v
    served2, _ = _served(kv)
    assert served2 - served == 3 * 4  # all but the value over sync_read_max_bytes
    assert kv.get("absent") is None
    stats = kv.stats()
    assert stats.sync_served == served2 and stats.hits >= 4 * len(values)
    kv.close()


def test_get_into_from_the_calling_thread_fills_the_buffer(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    values = {"a": _value(11), "b": _value(12, 100), "empty": b""}
    kv.batch_put(list(values), list(values.values()))
    for k, v in values.items():  # the first get of each looks the key up first
        assert kv.get(k) == v
    served, _ = _served(kv)
    for k, v in values.items():
        buf = bytearray(b"\xee" * 5000)
        assert kv.get_into(k, buf) == len(v)
        assert bytes(buf[: len(v)]) == v and bytes(buf[len(v) :]) == b"\xee" * (5000 - len(v))
        view = memoryview(bytearray(len(v)))  # exactly the value's size
        assert kv.get_into(k, view) == len(v) and view.tobytes() == v
    assert _served(kv)[0] == served + 2 * len(values)
    assert kv.get_into("absent", bytearray(16)) == -1


def test_get_into_a_short_buffer_is_erange_and_writes_nothing(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    kv.put("k", _value(21))
    assert kv.get("k") == _value(21)  # its location is cached now
    short = bytearray(b"\x5a" * 4095)
    with pytest.raises(OSError) as e:
        kv.get_into("k", short)
    assert e.value.errno == errno.ERANGE
    assert short == bytearray(b"\x5a" * 4095)
    with pytest.raises(TypeError):
        kv.get_into("k", bytes(4096))  # read-only: refused before any read
    buf = bytearray(4096)
    assert kv.get_into("k", buf) == 4096 and bytes(buf) == _value(21)


def test_batch_get_from_the_calling_thread_equals_bytes_put(fs: Any, cache_dir: str) -> None:
    """The keys of a batch, cached or looked up first from the calling thread
    (in one batch), are read from the calling thread, together; an absent key
    is a miss there; a value too big for this path goes through the loop;
    every value is the one put, in key order."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, sync_read_max_bytes=64 * 1024)
    sizes = [0, 1, 100, 4096, 64 * 1024, 64 * 1024 + 1] + [4096] * 60
    keys = [f"m{i}" for i in range(len(sizes))]
    values = [_value(i, n) if n >= 8 else b"y" * n for i, n in enumerate(sizes)]
    kv.batch_put(keys, values)
    for _ in range(3):  # the first round looks every key up from the calling thread
        assert kv.batch_get([*keys, "absent"]) == [*values, None]
    # All but the value over sync_read_max_bytes, three times; the absent key
    # is neither (a miss each time: misses are not remembered).
    assert _served(kv) == (3 * (len(keys) - 1), 3)
    late = [f"late{i}" for i in range(5)]
    kv.batch_put(late, [_value(100 + i) for i in range(5)])
    mixed = [late[0], keys[3], late[1], keys[0], keys[5], late[2]]
    want = [_value(100), values[3], _value(101), values[0], values[5], _value(102)]
    assert kv.batch_get(mixed) == want
    assert kv.batch_get(mixed) == want
    assert kv.batch_get([]) == []
    # Any sized iterable of keys, as on the loop path (some served here, some not).
    assert kv.batch_get(dict.fromkeys([keys[3], late[4], keys[0]]).keys()) == [
        values[3], _value(104), values[0]
    ]  # fmt: skip
    stats = kv.stats()
    assert stats.sync_served == _served(kv)[0] and stats.misses == 3
    kv.close()


def test_batch_get_into_from_the_calling_thread(fs: Any, cache_dir: str) -> None:
    """Cached keys land in the caller's buffers from the calling thread; a value
    longer than its buffer is ERANGE with that buffer untouched and the others
    filled, as on the loop path."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"i{i}" for i in range(20)]
    kv.batch_put(keys, [_value(i) for i in range(20)])
    assert kv.batch_get(keys) == [_value(i) for i in range(20)]  # locations cached
    served, _ = _served(kv)
    bufs = [bytearray(5000) for _ in keys]
    assert kv.batch_get_into(keys, bufs) == [4096] * 20
    assert all(bytes(b[:4096]) == _value(i) for i, b in enumerate(bufs))
    assert _served(kv)[0] == served + 20
    bufs = [bytearray(4096) for _ in keys]
    bufs[7] = bytearray(b"\x5a" * 4095)
    with pytest.raises(OSError) as e:
        kv.batch_get_into(keys, bufs)
    assert e.value.errno == errno.ERANGE
    assert bufs[7] == bytearray(b"\x5a" * 4095)
    assert all(bytes(b) == _value(i) for i, b in enumerate(bufs) if i != 7)
    assert kv.batch_get_into([keys[0], "absent"], [bytearray(4096), bytearray(8)]) == [4096, -1]
    with pytest.raises(ChainfsError) as e2:
        kv.batch_get_into(keys, bufs[:3])  # refused before any read
    assert e2.value.code == Code.EINVAL
    kv.close()


def test_a_slow_batch_stops_sending_groups_after_sync_timeout_ms(
    fs: Any, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch bigger than one read group, whose first group's reply never
    comes in time (storage faked as slow: it answers nothing, after the
    timeout): no later group is sent from the calling thread; the loop path
    reads the whole batch, right."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, sync_timeout_ms=200.0)
    keys = [f"s{i}" for i in range(600)]  # three read groups of at most 256
    kv.batch_put(keys, [_value(i, 64) for i in range(600)])
    assert kv.batch_get(keys) == [_value(i, 64) for i in range(600)]  # locations cached
    storage = fs.aio.io.storage
    groups: list[int] = []

    def slow(sync: Any, reqs: Any) -> list[None]:
        groups.append(len(reqs))
        time.sleep(0.25)  # past sync_timeout_ms, as a node that does not answer
        return [None] * len(reqs)

    monkeypatch.setattr(storage, "read_now_many", slow)
    served, fallbacks = _served(kv)
    assert kv.batch_get(keys) == [_value(i, 64) for i in range(600)]
    assert groups == [256]  # the first group only
    assert _served(kv) == (served, fallbacks + 600)
    monkeypatch.undo()
    served, fallbacks = _served(kv)
    assert kv.batch_get(keys) == [_value(i, 64) for i in range(600)]
    # The calling thread reads again: the first group at least (the later ones
    # only while the batch is within sync_timeout_ms, which a loaded machine
    # may pass); every key once, by one path or the other.
    now_served, now_fallbacks = _served(kv)
    more_served, more_fallbacks = now_served - served, now_fallbacks - fallbacks
    assert more_served >= 256 and more_served + more_fallbacks == 600
    kv.close()


def test_another_clients_overwrite_is_seen_after_location_cache_ms(
    fs: Any, other_fs: Any, cache_dir: str
) -> None:
    age_ms = 300.0
    kv = fs.kvcache(cache_dir, location_cache_ms=age_ms)
    other = other_fs.kvcache(cache_dir)
    kv.batch_put(["k", "gone"], [_value(1), _value(5)])
    assert kv.get("k") == _value(1) and kv.get("gone") == _value(5)
    served, _ = _served(kv)
    assert kv.get("k") == _value(1)
    assert _served(kv)[0] == served + 1
    assert other.put("k", _value(2), overwrite=True)
    assert other.remove("gone")
    changed_at = time.monotonic()
    while time.monotonic() - changed_at < age_ms / 1000 + 0.05:
        assert kv.get("k") in (_value(1), _value(2))  # whole: never a mix, never zeros
        assert kv.get("gone") in (_value(5), None)
        time.sleep(0.005)
    assert kv.get("k") == _value(2)
    assert kv.get("gone") is None
    kv.close()
    other.close()


def test_own_overwrite_from_another_thread_is_seen_at_once(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    kv.put("w", _value(0))
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            got = kv.get("w")
            if got is None or got != _value(int.from_bytes(got[-8:], "little")):
                errors.append("a torn or missing value")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for tag in range(1, 30):
            assert kv.put("w", _value(tag), overwrite=True)
            assert kv.get("w") == _value(tag)  # after the put returns: its value
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert _served(kv)[0] > 0
    kv.close()


def test_many_threads_get_right_bytes_within_the_connection_bound(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, sync_connections_per_node=2)
    keys = [f"t{i}" for i in range(64)]
    kv.batch_put(keys, [_value(i) for i in range(64)])
    assert kv.batch_get(keys) == [_value(i) for i in range(64)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            i = rng.randrange(len(keys))
            if kv.get(keys[i]) != _value(i):
                errors.append(f"{keys[i]} read wrong")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    sync = kv.aio._sync_gets._reader.sync
    routing = fs.aio.io.routing.current
    for node in routing.nodes.values():
        for address in (node.data_address, f"unix:{node.unix_socket}"):
            assert sync.connection_count(address) <= 2
    assert _served(kv)[0] > 0
    kv.close()
    assert all(n == 0 for n in sync._open.values())  # closed with the handle


def test_forked_child_gets_right_bytes_over_its_own_connections(fs: Any, cache_dir: str) -> None:
    """The parent's handle is closed in the child (as every inherited handle is:
    its sockets and tasks are the parent's); a handle the child opens serves
    gets from the child's thread over the child's own connections."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"f{i}" for i in range(16)]
    kv.batch_put(keys, [_value(i) for i in range(16)])
    assert [kv.get(k) for k in keys] == [_value(i) for i in range(16)]
    assert [kv.get(k) for k in keys] == [_value(i) for i in range(16)]  # served here
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                kv.get(keys[0])
                code = 4  # the inherited handle served a get
            except ValueError:
                own = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
                ok = all(own.get(k) == _value(i) for _ in range(3) for i, k in enumerate(keys))
                code = 0 if ok else 2
                code = code or (0 if _served(own)[0] >= 32 else 3)  # the child served some
                own.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    served, _ = _served(kv)
    assert [kv.get(k) for k in keys] == [_value(i) for i in range(16)]
    assert _served(kv)[0] == served + 16  # the parent's connections still work
    kv.close()


def test_zero_connections_turns_it_off(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, sync_connections_per_node=0)
    kv.put("k", _value(3))
    for _ in range(3):
        assert kv.get("k") == _value(3)
    assert kv.aio._sync_gets is None
    assert kv.stats().sync_served == 0
    kv.close()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("sync_connections_per_node", -1),
        ("sync_connections_per_node", 65),
        ("sync_read_max_bytes", 0),
        ("sync_timeout_ms", 0.0),
    ],
)
def test_bad_settings_are_refused_by_name(
    fs: Any, cache_dir: str, setting: str, value: float
) -> None:
    with pytest.raises(ValueError, match=setting):
        fs.kvcache(cache_dir, **{setting: value})


def test_storage_node_killed_while_locations_are_cached(
    cluster: LocalCluster, fs: Any, cache_dir: str
) -> None:
    """kill -9 of a storage node holding replicas of every cached entry: each get
    still returns the right bytes (the loop path fails over to another replica)."""
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    keys = [f"k{i}" for i in range(48)]
    kv.batch_put(keys, [_value(i) for i in range(48)])
    assert [kv.get(k) for k in keys] == [_value(i) for i in range(48)]
    cluster.kill_storage(0)
    try:
        for _ in range(3):
            assert [kv.get(k) for k in keys] == [_value(i) for i in range(48)]
            assert kv.batch_get(keys) == [_value(i) for i in range(48)]
    finally:
        cluster.restart_storage(0)
    kv.close()


def test_a_first_get_looks_the_name_up_then_reads_from_the_calling_thread(
    fs: Any, cache_dir: str
) -> None:
    """A new handle's first get of a key asks meta for the key's first name (on
    the loop), then reads and checks the entry from the calling thread. Where
    that name holds another key's entry (a collision: one-byte names here), the
    check says so and the loop path finds the key at its later probe; an absent
    key is a miss. Every value read equals the value put."""
    layout = {"shards": 1, "name_hash_bytes": 1}
    keys = [f"c{i}" for i in range(40)]
    names = {Key.of(k, 1024).name(1, 0) for k in keys}
    assert len(names) < len(keys)  # some keys share a name: they sit at later probes
    writer = fs.kvcache(cache_dir, **layout)
    writer.batch_put(keys, [_value(i) for i in range(len(keys))])
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, **layout)
    for i, k in enumerate(keys):
        assert kv.get(k) == _value(i)
    # One key per name was at that name's first probe: read here. The others
    # were another key's there: the loop path found them.
    assert _served(kv) == (len(names), len(keys) - len(names))
    for i, k in enumerate(keys):  # all cached where they really are now
        assert kv.get(k) == _value(i)
    assert _served(kv) == (len(names) + len(keys), len(keys) - len(names))
    assert kv.get("absent") is None and kv.get_into("absent", bytearray(8)) == -1
    assert _served(kv) == (len(names) + len(keys), len(keys) - len(names))
    s = kv.stats()
    assert s.misses == 2 and s.hits == 2 * len(keys)
    fresh = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, **layout)
    buf = bytearray(4096)
    assert fresh.get_into(keys[0], buf) == 4096 and bytes(buf) == _value(0)
    # Recording access times (an LRU cache) keeps first gets on the loop path.
    lru = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, record_access_times=True, **layout)
    assert lru.get(keys[1]) == _value(1)
    assert _served(lru) == (0, 1)
    for c in (writer, kv, fresh, lru):
        c.close()


def _loop_primes(kv: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The keys a sync get primes on the loop thread from now on (recorded)."""
    on_loop: list[Any] = []
    real = kv.aio._prime

    async def prime(key: Any) -> Any:
        on_loop.append(key)
        return await real(key)

    monkeypatch.setattr(kv.aio, "_prime", prime)
    return on_loop


def _count_batch_stats(fs: Any, kv: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """BatchStats as they are sent: from the loop, and from callers' threads."""
    sent: list[str] = []
    meta = fs.aio.io.meta
    real_call = meta.call

    async def call(method: str, request: Any) -> Any:
        if method == "BatchStat":
            sent.append("loop")
        return await real_call(method, request)

    monkeypatch.setattr(meta, "call", call)
    sync = kv.aio._sync_gets._reader.sync
    real_request = sync.request

    def request(address: str, msg_type: int, *args: Any, **kwargs: Any) -> Any:
        if msg_type == WIRE_METHODS["BatchStat"].msg_type:
            sent.append("thread")
        return real_request(address, msg_type, *args, **kwargs)

    monkeypatch.setattr(sync, "request", request)
    return sent


def _refuse_thread_lookups(kv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta refuses every lookup sent from a caller's thread of this handle."""
    sync = kv.aio._sync_gets._reader.sync
    real_request = sync.request

    def refuse_meta(address: str, msg_type: int, *args: Any, **kwargs: Any) -> Any:
        if msg_type == WIRE_METHODS["BatchStat"].msg_type:
            raise ChainfsError(Code.UNAVAILABLE, "refused by the test")
        return real_request(address, msg_type, *args, **kwargs)

    monkeypatch.setattr(sync, "request", refuse_meta)


def test_a_first_get_asks_meta_from_the_calling_thread(
    fs: Any, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new handle knows its cache's directories from opening it, so a first
    get asks meta for the key's name from the calling thread too: no hop to the
    loop thread for a hit or a miss, and the stats count both. When that one
    attempt gets no clean answer (meta's replies refused here), the get asks on
    the loop and still returns the bytes put."""
    keys = [f"t{i}" for i in range(24)]
    writer = fs.kvcache(cache_dir)
    writer.batch_put(keys, [_value(i) for i in range(len(keys))])
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    on_loop = _loop_primes(kv, monkeypatch)
    for i, k in enumerate(keys[:12]):
        assert kv.get(k) == _value(i)
    assert kv.get("absent") is None
    assert on_loop == []
    c = kv.aio._sync_gets.counts()
    assert (c.misses, c.served, c.fallbacks) == (1, 12, 0)
    s = kv.stats()
    assert (s.lookups, s.misses, s.hits) == (13, 1, 12)

    _refuse_thread_lookups(kv, monkeypatch)
    for i, k in enumerate(keys[12:], 12):
        assert kv.get(k) == _value(i)
    assert len(on_loop) == 12
    assert kv.stats().lookups == 13 + 12  # the failed attempts count nothing
    for c_ in (writer, kv):
        c_.close()


def test_a_thread_lookup_finding_another_keys_entry_goes_on_to_the_probes(
    fs: Any, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long key's first name holds a short key's empty entry (one-byte names
    collide): too short to be the long key's, which the calling thread's lookup
    settles. The get goes straight on to the loop path's probes (no second
    lookup of that name on the loop) and is a miss: 3 BatchStats in all, as
    before lookups were made from the calling thread."""
    layout = {"shards": 1, "name_hash_bytes": 1}
    want = Key.of("s", 1024).name(1, 0)
    long_key = next(
        k for k in (f"{'L' * 200}{i}" for i in range(100_000)) if Key.of(k, 1024).name(1, 0) == want
    )
    writer = fs.kvcache(cache_dir, **layout)
    writer.put("s", b"")
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, **layout)
    on_loop = _loop_primes(kv, monkeypatch)
    sent = _count_batch_stats(fs, kv, monkeypatch)
    assert kv.get(long_key) is None
    assert on_loop == []
    assert sent == ["thread", "loop", "loop"]
    assert kv.get("s") == b""
    writer.close()
    kv.close()


def test_first_gets_after_meta_restarts(
    cluster: LocalCluster, fs: Any, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of meta and a restart while a handle holds a socket to it: the
    calling thread's lookup on the dead socket fails, the get goes on through
    the loop (which waits for meta), and every value read equals the value put;
    later first gets ask from the calling thread again."""
    keys = [f"r{i}" for i in range(30)]
    writer = fs.kvcache(cache_dir)
    writer.batch_put(keys, [_value(i) for i in range(len(keys))])
    writer.close()
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    assert kv.get(keys[0]) == _value(0)  # a socket to meta is pooled now
    cluster.kill_meta(0)
    cluster.restart_meta(0)
    on_loop = _loop_primes(kv, monkeypatch)
    for i, k in enumerate(keys[1:], 1):
        assert kv.get(k) == _value(i)
    assert 1 <= len(on_loop) < len(keys) - 1
    kv.close()


def test_a_first_batch_is_looked_up_once_from_the_calling_thread(
    fs: Any, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new handle's batch of keys it has not seen costs one BatchStat, sent
    from the calling thread, and is read from there, even when the batch holds
    more keys than the location cache (they are read from the lookup's answer);
    a key with no entry is a miss. When meta refuses the calling thread's lookup
    the whole batch goes through the loop, with the same answers."""
    keys = [f"b{i}" for i in range(8)]
    writer = fs.kvcache(cache_dir)
    writer.batch_put(keys, [_value(i) for i in range(len(keys))])
    want = [_value(i) for i in range(len(keys))]
    kv = fs.kvcache(cache_dir, location_cache_ms=LONG_MS, location_cache_entries=4)
    sent = _count_batch_stats(fs, kv, monkeypatch)
    assert kv.batch_get([*keys, "absent"]) == [*want, None]
    assert sent == ["thread"]
    c = kv.aio._sync_gets.counts()
    assert (c.served, c.fallbacks, c.misses) == (8, 0, 1)
    s = kv.stats()
    assert (s.lookups, s.hits, s.misses) == (9, 8, 1)

    refused = fs.kvcache(cache_dir, location_cache_ms=LONG_MS)
    _refuse_thread_lookups(refused, monkeypatch)
    bufs = [bytearray(4096) for _ in range(len(keys) + 1)]
    assert refused.batch_get_into([*keys, "absent"], bufs) == [4096] * len(keys) + [-1]
    assert [bytes(b) for b in bufs[:-1]] == want
    c = refused.aio._sync_gets.counts()
    assert (c.served, c.fallbacks, c.misses) == (0, len(keys) + 1, 0)
    for h in (writer, kv, refused):
        h.close()
