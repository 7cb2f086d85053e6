"""KV cache on a real cluster (mgmtd, meta, 3 storage nodes as processes; one per module).

What a user relies on: a value read is whole and is one that was written,
also while other processes overwrite and remove it; eviction keeps the cache
under its watermark in LRU order and drops expired entries; batch reads land
byte-identical in caller buffers; bad input gets a clear error and leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import multiprocessing
import os
import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import chainfs
from chainfs.client.kvcache import KVCache
from chainfs.client.kvcache.format import FIXED_HEADER_BYTES, Key
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import poll, stored_chunks

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
CHUNK = 4 * MiB  # meta's default chunk size: values around it span chunks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("kvcluster")) as c:
        yield c


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> Any:
    return cluster.client()


_dirs = iter(range(1 << 30))


@pytest.fixture
def cache_dir() -> str:
    return f"/kv{next(_dirs)}"


def _leftovers(fs: Any, d: str) -> tuple[list[str], list[str]]:
    """(entry files, temp files) under a cache directory."""
    entries = [
        f"{shard}/{name}"
        for shard in fs.listdir(f"{d}/data")
        for name in fs.listdir(f"{d}/data/{shard}")
    ]
    return entries, fs.listdir(f"{d}/tmp")


# -- stamped values: every byte follows from the first 32, so a reader can tell
# a whole value from a partial, zeroed or mixed one ---------------------------------

_STAMP = struct.Struct("<4sIIQQ")  # magic, key index, writer, sequence, size


def make_value(key_index: int, writer: int, seq: int, size: int) -> bytes:
    stamp = _STAMP.pack(b"KVT1", key_index, writer, seq, size)
    if size < _STAMP.size:
        return stamp[:size]
    pattern = hashlib.sha256(stamp).digest() * 64  # 2 KiB
    body = (pattern * (size // len(pattern) + 1))[: size - _STAMP.size]
    return stamp + body


def check_value(key_index: int, value: bytes | bytearray | memoryview) -> str | None:
    """None if ``value`` is exactly a value written for ``key_index``, else what is wrong."""
    v = bytes(value)
    if len(v) < _STAMP.size:
        return f"key {key_index}: {len(v)}-byte value too short for a stamp"
    magic, k, writer, seq, size = _STAMP.unpack_from(v)
    if magic != b"KVT1" or k != key_index:
        return f"key {key_index}: foreign or garbled stamp {v[:32]!r}"
    if size != len(v) or make_value(k, writer, seq, size) != v:
        return f"key {key_index}: value ({writer}, {seq}) of {len(v)} bytes is not whole"
    return None


_SIZES = (4096, 300 * 1024, CHUNK - FIXED_HEADER_BYTES - 4, CHUNK + 123_457)


def _writer(address: str, d: str, writer: int, n_keys: int, seconds: float) -> dict[str, int]:
    rng = random.Random(writer)
    counts = {"put": 0, "replace": 0, "remove": 0, "kept": 0}
    with chainfs.connect(address) as fs:
        kv = fs.kvcache(d, shards=8, background_gc=False)
        stop = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < stop:
            k = rng.randrange(n_keys)
            op = rng.random()
            seq += 1
            value = make_value(k, writer, seq, rng.choice(_SIZES))
            if op < 0.5:
                kv.put(f"key{k}", value, overwrite=True)
                counts["replace"] += 1
            elif op < 0.75:
                counts["put" if kv.put(f"key{k}", value) else "kept"] += 1
            else:
                counts["remove"] += int(kv.remove(f"key{k}"))
        kv.close()
    return counts


def _reader(address: str, d: str, reader: int, n_keys: int, seconds: float) -> dict[str, Any]:
    rng = random.Random(100 + reader)
    hits = misses = 0
    bad: list[str] = []
    bufs = [bytearray(max(_SIZES)) for _ in range(n_keys)]
    with chainfs.connect(address) as fs:
        kv = fs.kvcache(d, shards=8, background_gc=False)
        keys = [f"key{k}" for k in range(n_keys)]
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            mode = rng.randrange(3)
            if mode == 0:
                got = kv.batch_get(keys)
                results = [(k, v) for k, v in enumerate(got)]
            elif mode == 1:
                lens = kv.batch_get_into(keys, bufs)
                results = [(k, None if n < 0 else bufs[k][:n]) for k, n in enumerate(lens)]
            else:
                k = rng.randrange(n_keys)
                results = [(k, kv.get(keys[k]))]
            for k, v in results:
                if v is None:
                    misses += 1
                    continue
                hits += 1
                problem = check_value(k, v)
                if problem is not None:
                    bad.append(problem)
        kv.close()
    return {"hits": hits, "misses": misses, "bad": bad[:10], "n_bad": len(bad)}


@pytest.mark.timeout(240)
def test_atomic_visibility_across_processes(cluster: LocalCluster, cache_dir: str) -> None:
    """2 writer and 2 reader processes hammer 6 keys (replace, put, remove): every
    value read is whole and is one that a writer wrote, never partial or mixed."""
    n_keys, seconds = 6, 6.0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        writers = [
            pool.apply_async(_writer, (cluster.address, cache_dir, w, n_keys, seconds))
            for w in (1, 2)
        ]
        readers = [
            pool.apply_async(_reader, (cluster.address, cache_dir, r, n_keys, seconds))
            for r in (1, 2)
        ]
        w_out = [w.get(timeout=150) for w in writers]
        r_out = [r.get(timeout=150) for r in readers]
    for r in r_out:
        assert r["n_bad"] == 0, r["bad"]
    assert sum(r["hits"] for r in r_out) > 0
    assert sum(w["replace"] + w["put"] for w in w_out) > 0
    assert sum(w["remove"] for w in w_out) > 0


def test_concurrent_puts_of_one_key_one_wins(
    fs: Any, cluster: LocalCluster, cache_dir: str
) -> None:
    other = cluster.client()
    kv1, kv2 = fs.kvcache(cache_dir, shards=8), other.kvcache(cache_dir)
    a, b = make_value(0, 1, 1, 2 * CHUNK), make_value(0, 2, 1, 2 * CHUNK)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fa = ex.submit(kv1.put, "k", a)
        fb = ex.submit(kv2.put, "k", b)
        won = (fa.result(), fb.result())
    assert sorted(won) == [False, True]
    expected = a if won[0] else b
    assert kv1.get("k") == expected and kv2.get("k") == expected
    kv1.close()
    kv2.close()  # their temp files made ahead for later puts go too
    assert _leftovers(fs, cache_dir)[1] == []


# -- reads ------------------------------------------------------------------------------


def test_values_of_every_size_round_trip(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir)
    hdr = FIXED_HEADER_BYTES + len("size-x")
    sizes = [0, 1, 4096, CHUNK - hdr - 1, CHUNK - hdr, CHUNK - hdr + 1, 3 * CHUNK + 5, 64 * MiB]
    for i, size in enumerate(sizes):
        key = f"size-{i}"
        value = make_value(i, 0, 0, size) if size >= 32 else bytes([i]) * size
        assert kv.put(key, value)
        assert kv.get(key) == value, size
        buf = bytearray(size + 10)
        assert kv.get_into(key, buf) == size
        assert buf[:size] == value and buf[size:] == bytes(10)
    assert kv.stats().entries == len(sizes)


def test_batch_get_into_caller_buffers_is_byte_identical(fs: Any, cache_dir: str) -> None:
    import numpy as np

    kv = fs.kvcache(cache_dir, shards=16)
    rng = random.Random(7)
    n = 48
    keys = [f"block-{i}" for i in range(n)]
    sizes = [rng.choice([4096, 65536, 1 * MiB, CHUNK + 1]) for _ in keys]
    values = [make_value(i, 0, 0, s) for i, s in enumerate(sizes)]
    present = [i % 5 != 3 for i in range(n)]  # every fifth-ish key is a miss
    assert all(kv.batch_put([k for k, p in zip(keys, present, strict=True) if p],
                            [v for v, p in zip(values, present, strict=True) if p]))  # fmt: skip
    # One pinned-pool-like buffer, sliced per block (as engines hand out KV slots).
    slot = CHUNK + 4096
    pool = np.full(n * slot, 0xAB, dtype=np.uint8)
    views = [memoryview(pool)[i * slot : (i + 1) * slot] for i in range(n)]
    lens = kv.batch_get_into(keys, views)
    for i in range(n):
        if not present[i]:
            assert lens[i] == -1
            continue
        assert lens[i] == sizes[i]
        assert pool[i * slot : i * slot + sizes[i]].tobytes() == values[i]
        assert (pool[i * slot + sizes[i] : (i + 1) * slot] == 0xAB).all()  # nothing past the value
    got = kv.batch_get(keys)
    assert got == [v if p else None for v, p in zip(values, present, strict=True)]
    ex = kv.batch_exists(keys)
    assert list(ex) == present and ex.leading_hits == 3


def test_removal_during_reads_is_whole_or_miss(
    fs: Any, cluster: LocalCluster, cache_dir: str
) -> None:
    """One client reads a 3-chunk value in a loop while another removes and re-puts
    it (meta's GC drops the chunks of each removed copy at once)."""
    import threading

    kv = fs.kvcache(cache_dir, shards=4)
    other = cluster.client().kvcache(cache_dir)
    size = 3 * CHUNK - 77
    stop = threading.Event()
    wrote = 0

    def churn() -> None:
        nonlocal wrote
        seq = 0
        while not stop.is_set():
            seq += 1
            other.put("big", make_value(0, 9, seq, size), overwrite=True)
            wrote += 1
            if seq % 2:
                other.remove("big")

    t = threading.Thread(target=churn)
    t.start()
    results = {"hit": 0, "miss": 0}
    buf = bytearray(size)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            n = kv.get_into("big", buf)
            if n < 0:
                results["miss"] += 1
                continue
            results["hit"] += 1
            assert check_value(0, buf[:n]) is None
    finally:
        stop.set()
        t.join()
    assert wrote > 0 and results["hit"] > 0, results


async def _until_chunks_gone(afs: Any, infos: list[Any], timeout_s: float = 30.0) -> None:
    """Wait until storage holds no chunk of these files (meta's GC removed them)."""
    deadline = time.monotonic() + timeout_s
    for info in infos:
        for chain in set(info.layout.chains):
            while await stored_chunks(afs, chain, info.ino):
                if time.monotonic() > deadline:
                    raise AssertionError(f"chunks of inode {info.ino} still there")
                await asyncio.sleep(0.05)


def test_removed_or_replaced_while_a_read_is_in_flight(
    fs: Any, cluster: LocalCluster, cache_dir: str
) -> None:
    """A reader has looked entries up; before its chunk reads go out, another client
    removes or replaces them and meta's GC drops their chunks. The reader gets a
    clean miss or the new whole value, never the zeros of the vanished chunks."""
    kv = fs.kvcache(cache_dir, shards=4)
    other = cluster.client().kvcache(cache_dir)
    size = 2 * CHUNK + 5
    store = kv.aio._store
    real_read = store.kv_read_many
    meddle: list[Callable[[], Any]] = []

    async def held_read(reads: Any) -> list[int]:
        if meddle and any(len(view) > 4096 for _, _, view in reads):
            await asyncio.to_thread(meddle.pop())
            await _until_chunks_gone(fs.aio, [reads[0][0]])  # "k" is always the first key
        return await real_read(reads)

    store.kv_read_many = held_read
    v1, v2, v3 = (make_value(0, 1, seq, size) for seq in (1, 2, 3))

    kv.put("k", v1)
    meddle.append(lambda: other.remove("k"))
    assert kv.get("k") is None

    kv.put("k", v1)
    meddle.append(lambda: other.put("k", v2, overwrite=True))
    assert kv.get("k") == v2

    buf = bytearray(size)
    meddle.append(lambda: other.remove("k"))
    assert kv.get_into("k", buf) == -1

    kv.put("k", v1)
    kv.put("j", v3)
    meddle.append(lambda: other.remove("k"))
    assert kv.batch_get(["k", "j"]) == [None, v3]
    assert kv.stats().read_retries >= 4


# -- eviction -------------------------------------------------------------------------------


def test_ttl_expires_and_background_removes(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, ttl=1.0, shards=4, gc_interval_s=0.1)
    assert kv.put("short-lived", b"x" * 1000)
    assert kv.get("short-lived") == b"x" * 1000
    poll(lambda: kv.get("short-lived") is None, "the entry to expire")
    assert not kv.exists("short-lived")
    poll(lambda: _leftovers(fs, cache_dir)[0] == [], "the expired file to be removed")
    assert kv.stats().expirations >= 1
    # A new put of the key is a new entry with a new lifetime.
    assert kv.put("short-lived", b"again")
    assert kv.get("short-lived") == b"again"


def test_capacity_watermark_evicts_least_recently_used(fs: Any, cache_dir: str) -> None:
    value_bytes = 256 * 1024
    entry = FIXED_HEADER_BYTES + len("k00") + value_bytes
    kv = fs.kvcache(
        cache_dir,
        capacity_bytes=6 * MiB,
        high_watermark=0.75,  # 4.5 MiB: 18 entries fit, 20 do not
        low_watermark=0.6,  # 3.6 MiB: evict down to 14 entries
        shards=4,
        gc_interval_s=0.1,
        gc_max_removals_per_round=2,  # several rounds: bounded work
        atime_granularity_s=0,
    )
    keys = [f"k{i:02d}" for i in range(20)]
    for k in keys[:10]:
        kv.put(k, make_value(int(k[1:]), 0, 0, value_bytes))
    assert all(v is not None for v in kv.batch_get(keys[:3]))  # k00..k02: recently used
    kv.flush_access_times()
    for k in keys[10:]:
        kv.put(k, make_value(int(k[1:]), 0, 0, value_bytes))
    poll(lambda: kv.stats().bytes <= 0.6 * 6 * MiB, "eviction down to the low watermark")
    s = kv.stats()
    assert s.entries == 14 and s.bytes == 14 * entry
    assert s.evictions == 6
    present = {k for k, e in zip(keys, kv.batch_exists(keys), strict=True) if e}
    assert present == set(keys[:3]) | set(keys[9:])  # k03..k08: least recently used


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir, shards=4, max_key_bytes=64, max_value_bytes=2 * MiB)
    with pytest.raises(OSError) as e:
        kv.put("k" * 65, b"v")
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        kv.put("big", bytes(2 * MiB + 1))
    assert e.value.errno == errno.EFBIG
    with pytest.raises(OSError) as e:
        kv.get("k" * 65)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(TypeError):
        kv.put("k", object())
    with pytest.raises(OSError) as e:
        kv.batch_get_into(["a", "b"], [bytearray(1)])
    assert e.value.errno == errno.EINVAL
    assert kv.get("missing") is None
    assert not kv.exists("missing")
    assert kv.get_into("missing", bytearray(4)) == -1
    assert kv.remove("missing") is False
    kv.put("ten", b"0123456789")
    with pytest.raises(OSError) as e:
        kv.get_into("ten", bytearray(9))
    assert e.value.errno == errno.ERANGE
    kv.close()
    entries, temps = _leftovers(fs, cache_dir)
    assert len(entries) == 1 and temps == []  # only "ten"


def test_keys_stats_and_collisions(fs: Any, cache_dir: str) -> None:
    # Names of one digest byte in one shard: find keys that share a name.
    by_name: dict[str, list[str]] = {}
    for i in range(2000):
        k = f"c{i}"
        by_name.setdefault(Key.of(k, 64).name(1, 0), []).append(k)
    colliding = next(ks for ks in by_name.values() if len(ks) >= 3)[:3]
    kv = fs.kvcache(cache_dir, shards=1, name_hash_bytes=1, max_probes=4)
    values = [f"value of {k}".encode() for k in colliding]
    assert kv.batch_put(colliding, values) == [True, True, True]
    assert kv.batch_get(colliding) == values
    assert sorted(_leftovers(fs, cache_dir)[0]) == [f"00/{n}" for n in sorted(
        [Key.of(colliding[0], 64).name(1, p) for p in range(3)])]  # fmt: skip
    assert sorted(kv.keys("c")) == sorted(colliding)
    assert kv.keys("zzz") == []
    # Removing the middle of the chain keeps its end reachable (moved into the gap).
    assert kv.remove(colliding[1]) and kv.get(colliding[1]) is None
    assert kv.batch_get([colliding[0], colliding[2]]) == [values[0], values[2]]
    s = kv.stats()
    assert s.entries == 2 and s.bytes == sum(
        FIXED_HEADER_BYTES + len(k) + len(v) for k, v in zip(colliding, values, strict=True)
    ) - (FIXED_HEADER_BYTES + len(colliding[1]) + len(values[1]))


async def test_async_twin(cluster: LocalCluster, cache_dir: str) -> None:
    afs = await chainfs.aio.connect(cluster.address)
    try:
        kv = await afs.kvcache(cache_dir, shards=8)
        assert await kv.put(b"\x00bin", b"value")
        assert await kv.get(b"\x00bin") == b"value"
        assert (await kv.batch_exists([b"\x00bin", "no"])).leading_hits == 1
        buf = bytearray(5)
        assert await kv.batch_get_into([b"\x00bin"], [buf]) == [5] and buf == b"value"
        assert await kv.keys() == [b"\x00bin"]
        assert await kv.batch_remove([b"\x00bin", "no"]) == [True, False]
    finally:
        await afs.close()
    assert kv.closed  # closed with its file system


# -- puts: the value's bytes, then one metadata commit ------------------------------------------


def test_puts_write_into_temp_files_made_ahead_and_close_removes_them(
    fs: Any, cache_dir: str
) -> None:
    kv = fs.kvcache(cache_dir, shards=4, put_prepared_files=3)
    values = {f"p{i}": make_value(i, 0, 0, MiB + i) for i in range(6)}
    for k, v in values.items():
        assert kv.put(k, v)
    assert not kv.put("p0", make_value(0, 1, 0, 100))  # present: kept
    assert kv.put("p1", make_value(1, 1, 0, 200), overwrite=True)
    values["p1"] = make_value(1, 1, 0, 200)
    assert kv.batch_get(list(values)) == list(values.values())
    assert len(_leftovers(fs, cache_dir)[0]) == 6
    tmp = f"{cache_dir}/tmp"
    poll(lambda: len(fs.listdir(tmp)) == 3, "3 temp files made ahead")
    assert [fs.stat(f"{tmp}/{n}").st_size for n in fs.listdir(tmp)] == [0, 0, 0]
    kv.close()
    assert _leftovers(fs, cache_dir)[1] == []
    off = fs.kvcache(cache_dir, put_prepared_files=0)
    assert off.put("q", b"v") and off.get("q") == b"v"
    assert _leftovers(fs, cache_dir)[1] == []  # none made ahead
    off.close()


def _put_then_die(address: str, directory: str) -> None:
    """A writer that stores one value and is then killed (its temp files made ahead stay)."""
    fs = chainfs.connect(address)
    kv = fs.kvcache(directory, put_prepared_files=4)
    kv.put("from-the-dead", b"v" * 1000)
    while len(fs.listdir(f"{directory}/tmp")) < 4:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_writers_temp_files_are_cleaned(cluster: LocalCluster, cache_dir: str) -> None:
    proc = multiprocessing.get_context("spawn").Process(
        target=_put_then_die, args=(cluster.address, cache_dir)
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    fs = cluster.client()
    assert len(fs.listdir(f"{cache_dir}/tmp")) == 4
    kv = fs.kvcache(cache_dir, tmp_max_age_s=0.5, background_gc=False)
    assert kv.get("from-the-dead") == b"v" * 1000
    time.sleep(0.6)
    assert kv.gc(full=True).tmp_removed == 4
    assert fs.listdir(f"{cache_dir}/tmp") == []
    kv.close()


@pytest.mark.timeout(180)
def test_acknowledged_puts_survive_kill_9_of_meta(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as c:
        fs = c.client()
        kv = fs.kvcache("/kv", shards=4)
        values = {f"d{i}": make_value(i, 0, 0, 300_000 + i) for i in range(12)}
        for k, v in values.items():
            assert kv.put(k, v)
        c.kill_meta(0)  # right after the last put was acknowledged
        c.restart_meta(0)
        reader = c.client().kvcache("/kv")
        assert reader.batch_get(list(values)) == list(values.values())
        assert kv.put("after", b"a" * 5000)  # the writer goes on through the new meta
        assert reader.get("after") == b"a" * 5000
        kv.close()
        assert _leftovers(fs, "/kv")[1] == []


# -- a full disk -------------------------------------------------------------------------------


class _FullDiskCluster(LocalCluster):
    """One storage node whose targets refuse every new chunk (ENOSPC)."""

    def _storage_config(self, i: int) -> Any:
        c = super()._storage_config(i)
        c.disk_usage_limit_ratio = 1e-9
        return c


@pytest.mark.timeout(120)
def test_full_disk_is_a_clear_error_with_nothing_visible(tmp_path: Path) -> None:
    with _FullDiskCluster(tmp_path, storage_nodes=1, targets_per_node=1, replicas=1) as c:
        fs = c.client()
        kv = fs.kvcache("/kv", shards=2)
        with pytest.raises(OSError) as e:
            kv.put("k", bytes(100_000))
        assert e.value.errno == errno.ENOSPC, e.value
        with pytest.raises(OSError) as e:
            kv.batch_put(["a", "b"], [b"1", b"2"])
        assert e.value.errno == errno.ENOSPC
        assert kv.get("k") is None and kv.batch_get(["a", "b"]) == [None, None]
        with pytest.raises(OSError) as e:
            kv.put("empty", b"")  # the header alone needs a chunk too
        assert e.value.errno == errno.ENOSPC
        assert kv.get("empty") is None
        kv.close()
        assert _leftovers(fs, "/kv") == ([], [])


def test_sync_handle_is_kvcache(fs: Any, cache_dir: str) -> None:
    kv = fs.kvcache(cache_dir)
    assert isinstance(kv, KVCache)
    with kv:
        kv.put("x", b"y")
    assert kv.closed
    with pytest.raises(ValueError):
        kv.get("x")
