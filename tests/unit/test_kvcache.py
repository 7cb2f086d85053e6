"""KV cache logic against an in-memory file namespace (the cache's only neighbour).

The in-memory backend behaves like the client: renames are atomic, a removed
file's data disappears (as meta's GC removes chunks) and a read of missing
data comes back zero-filled, as the client's chunk path returns holes. Hooks
remove or replace an entry in the middle of a read. The same cache code runs
against real processes in tests/integration/test_kvcache.py.
"""

from __future__ import annotations

import asyncio
import errno
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

from chainfs.client.kvcache import (
    AsyncKVCache,
    EntryInfo,
    KVCacheConfig,
    make_config,
)
from chainfs.client.kvcache.backend import NewFile
from chainfs.client.kvcache.format import (
    FIXED_HEADER_BYTES,
    Check,
    Key,
    check_entry,
    decode_header,
    encode_header,
    peek_key_len,
)
from chainfs.client.kvcache.reads import POOL_MIN_BYTES
from chainfs.client.layout import Layout
from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code

_LAYOUT = Layout(chunk_size=64 * 1024, chains=(1,))


@dataclass
class _File:
    ino: int
    mtime_ns: int
    atime_ns: int


class MemBackend:
    """Directories and immutable files in memory; data kept per inode."""

    def __init__(self) -> None:
        self.dirs: set[str] = {"/"}
        self.names: dict[str, _File] = {}
        self.data: dict[int, bytes] = {}
        self.xattrs: dict[tuple[str, str], bytes] = {}
        self._ino = 100
        # Called with the file's path and inode before a read copies its data.
        self.before_read: Callable[[int], Awaitable[None]] | None = None
        self.fail_write: OSError | None = None
        self.open_files: set[int] = set()  # inodes of files open for writing
        self.creates = 0
        self.published: list[str] = []  # temp files published, in order
        self.usable_s = math.inf  # how long a new file's write rights last
        self.stat_calls = 0
        self.read_calls = 0

    def _parent_exists(self, path: str) -> bool:
        return (path.rsplit("/", 1)[0] or "/") in self.dirs

    async def kv_makedirs(self, paths: Sequence[str]) -> None:
        for p in paths:
            parts = p.strip("/").split("/")
            for i in range(1, len(parts) + 1):
                self.dirs.add("/" + "/".join(parts[:i]))

    async def kv_stat_many(self, paths: Sequence[str]) -> list[EntryInfo | None]:
        self.stat_calls += 1
        await asyncio.sleep(0)  # a round trip to meta lets other tasks run meanwhile
        out: list[EntryInfo | None] = []
        for p in paths:
            f = self.names.get(p)
            if f is None:
                out.append(None)
            else:
                out.append(EntryInfo(f.ino, len(self.data[f.ino]), _LAYOUT, f.mtime_ns, f.atime_ns))
        return out

    async def kv_read_many(self, reads: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        self.read_calls += 1
        out = []
        for info, offset, view in reads:
            if self.before_read is not None:
                await self.before_read(info.ino)
            data = self.data.get(info.ino, b"")
            piece = data[offset : offset + len(view)]
            view[: len(piece)] = piece
            view[len(piece) :] = bytes(len(view) - len(piece))  # holes read as zeros
            out.append(len(view))
        return out

    def kv_sync_reader(self, connections_per_node: int, timeout_ms: float) -> None:
        return None  # the cache's own logic is what these tests check: gets take the loop

    async def kv_open_new(self, path: str) -> NewFile:
        if not self._parent_exists(path):
            raise ChainfsError(Code.ENOENT, "no parent", path)
        if path in self.names:
            raise ChainfsError(Code.EEXIST, "exists", path)
        self._ino += 1
        now = time.time_ns()
        self.names[path] = _File(self._ino, now, now)
        self.data[self._ino] = b""
        self.open_files.add(self._ino)
        self.creates += 1
        return NewFile(path, self._ino, time.monotonic() + self.usable_s)

    async def kv_write_new(self, f: NewFile, parts: Sequence[memoryview]) -> None:
        assert not f.closed
        value = b"".join(bytes(p) for p in parts)
        if self.fail_write is not None:
            self.data[f.handle] = value[:10]  # partly written
            raise self.fail_write
        self.data[f.handle] = value

    async def kv_publish(self, f: NewFile, length: int, dst: str, replace: bool) -> None:
        assert not f.closed and len(self.data.get(f.handle, b"")) == length
        f.closed = True
        self.published.append(f.path)
        self.open_files.discard(f.handle)
        if self.names.get(f.path, _File(0, 0, 0)).ino != f.handle:
            raise ChainfsError(Code.ENOENT, "no source", f.path)
        self.names[f.path].mtime_ns = time.time_ns()
        await self.kv_rename(f.path, dst, replace)

    async def kv_discard(self, f: NewFile, wrote: bool) -> None:
        if self.names.get(f.path, _File(0, 0, 0)).ino == f.handle:
            self._drop(f.path)
        f.closed = True
        self.open_files.discard(f.handle)

    def add_file(self, path: str, value: bytes) -> None:
        """A closed file made by someone else (a dead writer's temp file)."""
        self._ino += 1
        now = time.time_ns()
        self.names[path] = _File(self._ino, now, now)
        self.data[self._ino] = value

    async def kv_rename(self, src: str, dst: str, replace: bool) -> None:
        if src not in self.names:
            raise ChainfsError(Code.ENOENT, "no source", src)
        if not self._parent_exists(dst):
            raise ChainfsError(Code.ENOENT, "no parent", dst)
        if dst in self.names:
            if not replace:
                raise ChainfsError(Code.EEXIST, "exists", dst)
            self._drop(dst)
        self.names[dst] = self.names.pop(src)

    def _drop(self, path: str) -> None:
        f = self.names.pop(path)
        self.data.pop(f.ino, None)  # the chunks go with the last link

    async def kv_unlink(self, path: str) -> bool:
        if path not in self.names:
            return False
        self._drop(path)
        return True

    async def kv_list(self, path: str) -> AsyncIterator[list[tuple[str, EntryInfo | None]]]:
        prefix = path.rstrip("/") + "/"
        page: list[tuple[str, EntryInfo | None]] = []
        for p in sorted(self.names):
            if p.startswith(prefix) and "/" not in p[len(prefix) :]:
                f = self.names[p]
                info = EntryInfo(f.ino, len(self.data[f.ino]), _LAYOUT, f.mtime_ns, f.atime_ns)
                page.append((p[len(prefix) :], info))
                if len(page) == 3:  # small pages: paging is exercised
                    yield page
                    page = []
        if page:
            yield page

    async def kv_xattr_create(self, path: str, name: str, value: bytes) -> bool:
        assert path in self.dirs
        if (path, name) in self.xattrs:
            return False
        self.xattrs[(path, name)] = value
        return True

    async def kv_xattr_get(self, path: str, name: str) -> bytes | None:
        return self.xattrs.get((path, name))

    async def kv_set_atime(self, path: str, atime_ns: int) -> None:
        f = self.names.get(path)
        if f is not None:
            f.atime_ns = atime_ns

    # test helpers
    def entry_paths(self, cache_dir: str) -> list[str]:
        return sorted(p for p in self.names if p.startswith(cache_dir + "/data/"))

    def tmp_paths(self, cache_dir: str, prepared: bool = False) -> list[str]:
        """Files in tmp/ (``prepared``: with those created ahead for puts: open, empty)."""
        return sorted(
            p
            for p, f in self.names.items()
            if p.startswith(cache_dir + "/tmp/")
            and (prepared or f.ino not in self.open_files or self.data[f.ino])
        )

    def age(self, path: str, seconds: float) -> None:
        f = self.names[path]
        f.mtime_ns -= int(seconds * 1e9)
        f.atime_ns -= int(seconds * 1e9)


async def _open(backend: MemBackend, **overrides: object) -> AsyncKVCache:
    overrides.setdefault("shards", 4)
    overrides.setdefault("background_gc", False)
    return await AsyncKVCache.open(backend, "/kv", make_config(**overrides))  # type: ignore[arg-type]


# -- format -------------------------------------------------------------------


def test_header_round_trip_and_corruption() -> None:
    value = b"v" * 100
    head = encode_header(b"key", True, len(value), crc32c(value))
    assert len(head) == FIXED_HEADER_BYTES + 3
    h = decode_header(head)
    assert h is not None and h.key == b"key" and h.is_str and h.value_len == 100
    assert h.original_key() == "key"
    assert peek_key_len(head) == 3
    hv, vv = memoryview(head), memoryview(value)
    assert check_entry(b"key", hv, vv) is Check.OK
    assert check_entry(b"kez", hv, vv) is Check.OTHER_KEY
    assert check_entry(b"keys", memoryview(head + b"\0"), vv) is Check.OTHER_KEY
    assert check_entry(b"key", hv, vv[:-1]) is Check.CHANGED
    assert check_entry(b"key", hv, memoryview(bytes(100))) is Check.CHANGED
    assert check_entry(b"key", memoryview(bytes(len(head))), vv) is Check.CHANGED
    for i in range(len(head)):
        bad = bytearray(head)
        bad[i] ^= 0x40
        assert decode_header(bad) is None, i
        assert check_entry(b"key", memoryview(bad), vv) is not Check.OK, i
    assert decode_header(head[:-1]) is None
    assert decode_header(bytes(len(head))) is None


def test_keys_str_bytes_equivalent_and_bounded() -> None:
    assert Key.of("abc", 10).digest == Key.of(b"abc", 10).digest
    assert Key.of("abc", 10).original() == "abc"
    assert Key.of(bytearray(b"abc"), 10).original() == b"abc"
    with pytest.raises(ChainfsError) as e:
        Key.of("x" * 11, 10)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(ChainfsError) as e:
        Key.of(b"", 10)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        Key.of(12, 10)  # type: ignore[arg-type]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        make_config(max_value_bytes=65 * 1024 * 1024)
    with pytest.raises(ValueError):
        make_config(capacity_bytes=100, low_watermark=0.9, high_watermark=0.5)
    with pytest.raises(TypeError):
        make_config(no_such_option=1)
    c = make_config(ttl=5, capacity_bytes=1000, config=KVCacheConfig(shards=8))
    assert (c.ttl_s, c.capacity_bytes, c.shards) == (5.0, 1000, 8)


@pytest.mark.parametrize(
    "name,bad,edge",
    [
        ("ttl_s", 0.0, 0.001),
        ("capacity_bytes", 0, 1),
        ("high_watermark", 1.01, 1.0),
        ("low_watermark", 0.0, 0.01),
        ("max_key_bytes", 0, 65535),
        ("max_key_bytes", 65536, 1),
        ("max_value_bytes", -1, 0),
        ("max_value_bytes", 64 * 1024 * 1024 + 1, 64 * 1024 * 1024),
        ("shards", 65537, 65536),
        ("name_hash_bytes", 33, 32),
        ("max_probes", 0, 64),
        ("max_batch_keys", 0, 1),
        ("coalesce_inflight", 0, 1),
        ("scratch_pool_bytes", -1, 0),
        ("max_read_retries", -1, 0),
        ("atime_granularity_s", -0.5, 0.0),
        ("gc_interval_s", 0.0, 0.001),
        ("gc_candidates_per_shard", 0, 1),
        ("tmp_max_age_s", -1.0, 0.5),
        ("put_prepared_files", -1, 0),
        ("put_prepared_files", 65, 64),
    ],
)
def test_config_bounds(name: str, bad: float, edge: float) -> None:
    with pytest.raises(ValueError, match=name):
        make_config(**{name: bad})
    assert getattr(make_config(**{name: edge}), name) == edge
    make_config(ttl=None, capacity_bytes=None)  # None: no expiry, unbounded


# -- put / get ------------------------------------------------------------------


async def test_put_get_exists_remove() -> None:
    b = MemBackend()
    kv = await _open(b)
    assert await kv.get("a") is None
    assert not await kv.exists("a")
    assert await kv.get_into("a", bytearray(10)) == -1
    assert await kv.put("a", b"hello")
    assert await kv.get("a") == b"hello"
    assert await kv.get(b"a") == b"hello"  # str keys are their UTF-8 bytes
    assert await kv.exists("a")
    buf = bytearray(8)
    assert await kv.get_into("a", buf) == 5 and buf[:5] == b"hello"
    assert await kv.put("empty", b"")
    assert await kv.get("empty") == b""
    assert await kv.remove("a")
    assert not await kv.remove("a")
    assert await kv.get("a") is None
    assert not b.tmp_paths("/kv")
    s = await kv.stats()
    assert (s.entries, s.puts) == (1, 2)
    assert s.hits >= 3 and s.misses >= 2
    await kv.close()


async def test_put_existing_keeps_value_unless_overwrite() -> None:
    b = MemBackend()
    kv = await _open(b)
    assert await kv.put("k", b"first")
    assert not await kv.put("k", b"second")
    assert await kv.get("k") == b"first"
    assert await kv.put("k", b"third", overwrite=True)
    assert await kv.get("k") == b"third"
    assert len(b.entry_paths("/kv")) == 1
    assert not b.tmp_paths("/kv")


async def test_bad_input_stores_nothing() -> None:
    b = MemBackend()
    kv = await _open(b, max_key_bytes=16, max_value_bytes=1000)
    with pytest.raises(ChainfsError) as e:
        await kv.put("k" * 17, b"v")
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(ChainfsError) as e:
        await kv.batch_put(["ok", "big"], [b"v", bytes(1001)])
    assert e.value.errno == errno.EFBIG
    assert await kv.get("ok") is None  # nothing of the batch was stored
    with pytest.raises(TypeError):
        await kv.put("k", 12345)
    with pytest.raises(ChainfsError):
        await kv.get("k" * 17)
    await kv.put("k", b"0123456789")
    with pytest.raises(ChainfsError) as e:
        await kv.get_into("k", bytearray(4))
    assert e.value.errno == errno.ERANGE
    with pytest.raises(TypeError):
        await kv.get_into("k", b"readonly buffer")
    assert not b.tmp_paths("/kv")
    assert len(b.entry_paths("/kv")) == 1


async def test_failed_write_leaves_nothing_visible() -> None:
    b = MemBackend()
    kv = await _open(b)
    b.fail_write = ChainfsError(Code.ENOSPC, "no space left on device")
    with pytest.raises(OSError) as e:
        await kv.put("k", b"x" * 1000)
    assert e.value.errno == errno.ENOSPC
    assert not b.tmp_paths("/kv") and not b.entry_paths("/kv")
    b.fail_write = None
    assert await kv.get("k") is None
    assert await kv.put("k", b"x" * 1000)
    assert await kv.get("k") == b"x" * 1000


# -- puts through prepared temp files -----------------------------------------------


async def _settle() -> None:
    """Let the background refill and removals run (they are tasks on this loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_puts_take_prepared_files_and_close_removes_the_rest() -> None:
    b = MemBackend()
    kv = await _open(b, put_prepared_files=3)
    assert await kv.put("a", b"1")  # the first put creates its own, then 3 are prepared
    await _settle()
    assert len(b.tmp_paths("/kv", prepared=True)) == 3
    for i in range(5):
        ready = set(b.tmp_paths("/kv", prepared=True))
        assert await kv.put(f"k{i}", bytes([i]) * 100)
        assert b.published[-1] in ready  # written into a file made ahead
        await _settle()
        assert len(b.tmp_paths("/kv", prepared=True)) == 3  # and made up for
    assert [await kv.get(f"k{i}") for i in range(5)] == [bytes([i]) * 100 for i in range(5)]
    assert not await kv.put("k0", b"other")  # present: kept, its temp file removed
    await _settle()
    assert await kv.get("k0") == bytes([0]) * 100
    assert not b.tmp_paths("/kv") and len(b.tmp_paths("/kv", prepared=True)) == 3
    await kv.close()
    assert b.tmp_paths("/kv", prepared=True) == [] and b.open_files == set()


async def test_a_batch_larger_than_the_pool_stores_every_value() -> None:
    b = MemBackend()
    kv = await _open(b, put_prepared_files=2)
    keys = [f"b{i}" for i in range(40)]
    values = [bytes([i]) * (i + 1) for i in range(40)]
    assert await kv.batch_put(keys, values) == [True] * 40
    assert await kv.batch_get(keys) == values
    assert await kv.batch_put(keys[:5], values[:5]) == [False] * 5
    await _settle()
    assert not b.tmp_paths("/kv") and len(b.tmp_paths("/kv", prepared=True)) <= 2
    await kv.close()
    assert b.tmp_paths("/kv", prepared=True) == [] and b.open_files == set()


async def test_no_prepared_files_when_turned_off() -> None:
    b = MemBackend()
    kv = await _open(b, put_prepared_files=0)
    for i in range(3):
        assert await kv.put(f"k{i}", b"v")
        await _settle()
        assert b.tmp_paths("/kv", prepared=True) == []
    assert b.creates == 3
    await kv.close()


async def test_a_failed_put_through_a_prepared_file_leaves_nothing() -> None:
    b = MemBackend()
    kv = await _open(b, put_prepared_files=2)
    assert await kv.put("a", b"1")
    await _settle()
    b.fail_write = ChainfsError(Code.EIO, "storage failed")
    with pytest.raises(ChainfsError) as e:
        await kv.put("k", b"x" * 1000)
    assert e.value.errno == errno.EIO
    await _settle()
    assert not b.tmp_paths("/kv") and len(b.entry_paths("/kv")) == 1  # "a" only
    assert len(b.open_files) == 2  # only the prepared ones are still open
    b.fail_write = None
    assert await kv.put("k", b"x" * 1000) and await kv.get("k") == b"x" * 1000
    await kv.close()


async def test_a_prepared_file_removed_by_a_cleaner_is_replaced_in_the_put() -> None:
    b = MemBackend()
    kv = await _open(b, put_prepared_files=2)
    assert await kv.put("a", b"1")
    await _settle()
    for p in b.tmp_paths("/kv", prepared=True):  # another handle's cleaner took them
        b._drop(p)
    assert await kv.put("k", b"value")
    assert await kv.get("k") == b"value"
    await _settle()
    assert not b.tmp_paths("/kv")
    await kv.close()
    assert b.open_files == set()


async def test_prepared_files_are_retired_before_their_rights_need_renewal() -> None:
    b = MemBackend()
    b.usable_s = 0.05  # write capabilities due for renewal this soon
    kv = await _open(b, put_prepared_files=2)
    assert await kv.put("a", b"1")
    await _settle()
    old = set(b.tmp_paths("/kv", prepared=True))
    await asyncio.sleep(0.1)
    creates = b.creates
    assert await kv.put("k", b"v")  # takes none of the old ones
    await _settle()
    assert b.creates >= creates + 1
    assert not old & set(b.tmp_paths("/kv", prepared=True))  # the old ones were removed
    await kv.close()
    assert b.open_files == set()


async def test_batches_in_key_order_into_buffers() -> None:
    b = MemBackend()
    kv = await _open(b)
    rng = random.Random(1)
    keys = [f"key-{i}" for i in range(50)]
    values = [rng.randbytes(rng.randrange(0, 3000)) for _ in keys]
    assert await kv.batch_put(keys[::2], values[::2]) == [True] * 25
    got = await kv.batch_get(keys)
    assert got == [v if i % 2 == 0 else None for i, v in enumerate(values)]
    bufs = [bytearray(3000) for _ in keys]
    lens = await kv.batch_get_into(keys, bufs)
    for i, (n, buf) in enumerate(zip(lens, bufs, strict=True)):
        if i % 2:
            assert n == -1
        else:
            assert bytes(buf[:n]) == values[i]
    ex = await kv.batch_exists(keys)
    assert list(ex) == [i % 2 == 0 for i in range(50)]
    assert ex.leading_hits == 1
    assert (await kv.batch_exists(keys[0:1] + keys[2:7:2] + keys[1:2])).leading_hits == 4
    assert (await kv.batch_exists([])).leading_hits == 0
    assert await kv.batch_remove(keys[:4]) == [True, False, True, False]
    assert sorted(await kv.keys("key-1")) == sorted(k for k in keys[4::2] if k.startswith("key-1"))
    # One metadata batch and one storage batch per batch_get, whatever the key count.
    b.stat_calls = b.read_calls = 0
    await kv.batch_get(keys)
    assert (b.stat_calls, b.read_calls) == (1, 1)


async def test_naming_is_fixed_by_the_creator() -> None:
    b = MemBackend()
    first = await _open(b, shards=8, name_hash_bytes=4)
    await first.put("k", b"v")
    second = await _open(b, shards=64, name_hash_bytes=16)  # asks for another naming
    assert (second.config.shards, second.config.name_hash_bytes) == (8, 4)
    assert await second.get("k") == b"v"
    b.xattrs[("/kv", "user.chainfs.kvcache")] = b"not json"
    with pytest.raises(ChainfsError) as e:
        await _open(b)
    assert e.value.errno == errno.EINVAL


async def test_concurrent_single_gets_travel_as_batches() -> None:
    import asyncio

    b = MemBackend()
    kv = await _open(b, coalesce_inflight=2)
    keys = [f"k{i}" for i in range(100)]
    await kv.batch_put(keys, [k.encode() for k in keys])
    b.stat_calls = 0
    got = await asyncio.gather(*(kv.get(k) for k in [*keys, "missing"]))
    assert got == [k.encode() for k in keys] + [None]
    assert b.stat_calls <= 4  # 2 lone calls at once, then the rest together
    b.stat_calls = 0
    bufs = [bytearray(8) for _ in keys]
    lens = await asyncio.gather(*(kv.get_into(k, buf) for k, buf in zip(keys, bufs, strict=True)))
    assert lens == [len(k) for k in keys] and bufs[42][:3] == b"k42"
    ex = await asyncio.gather(*(kv.exists(k) for k in ["k1", "nope", "k2"]))
    assert ex == [True, False, True]
    # One caller's error (a too small buffer) is its own; the others get their values.
    small = asyncio.gather(kv.get_into("k10", bytearray(1)), return_exceptions=True)
    fine = asyncio.gather(*(kv.get(k) for k in keys[:5]))
    (err,), values = await asyncio.gather(small, fine)
    assert isinstance(err, ChainfsError) and err.errno == errno.ERANGE
    assert values == [k.encode() for k in keys[:5]]
    assert b.stat_calls <= 10


async def test_values_across_chunks_one_request_per_chunk() -> None:
    b = MemBackend()  # 64 KiB chunks
    kv = await _open(b)
    rng = random.Random(5)
    sizes = [0, 1, 65536 - 30, 65536 - 29, 65536, 3 * 65536 + 7]
    keys = [f"v{i}" for i in range(len(sizes))]
    values = [rng.randbytes(n) for n in sizes]
    await kv.batch_put(keys, values)
    reads: list[list[tuple[int, int]]] = []
    real = b.kv_read_many

    async def recording(items: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        reads.append([(info.ino, offset) for info, offset, _ in items])
        return await real(items)

    def no_chunk_read_twice(ranges: list[tuple[int, int]]) -> None:
        # Every range starts a chunk (the backend cuts longer ones at chunk ends).
        assert all(offset % 65536 == 0 for _, offset in ranges), ranges
        assert len(set(ranges)) == len(ranges)

    b.kv_read_many = recording  # type: ignore[method-assign]
    assert await kv.batch_get(keys) == values
    assert len(reads) == 1  # one storage batch
    no_chunk_read_twice(reads[0])
    bufs = [bytearray(n + 3) for n in sizes]
    assert await kv.batch_get_into(keys, bufs) == sizes
    assert [bytes(buf[: len(v)]) for buf, v in zip(bufs, values, strict=True)] == values
    assert len(reads) == 2
    no_chunk_read_twice(reads[1])
    # Removed under the read: a miss, also for the part that went to the caller's buffer.
    big = b.entry_paths("/kv")

    async def remove_all(items: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        b.kv_read_many = real  # type: ignore[method-assign]
        for path in big:
            await b.kv_unlink(path)
        return await real(items)

    b.kv_read_many = remove_all  # type: ignore[method-assign]
    assert await kv.batch_get_into(keys, bufs) == [-1] * len(keys)


async def test_read_buffers_come_back_to_the_pool_and_are_reused() -> None:
    b = MemBackend()
    kv = await _open(b, scratch_pool_bytes=1 << 20)
    keys = [f"k{i}" for i in range(20)]
    values = [bytes([i]) * (POOL_MIN_BYTES + 3000) for i in range(20)]
    await kv.batch_put(keys, values)
    pool = kv._values._pool
    assert pool is not None
    # Entries up to POOL_MIN_BYTES are read into new buffers: the pool stays unused.
    await kv.batch_put(["s0", "s1"], [b"a" * 3000, b"b" * 3000])
    assert await kv.batch_get(["s0", "s1"]) == [b"a" * 3000, b"b" * 3000]
    assert pool.mapped_total == 0
    assert await kv.batch_get(keys) == values
    mapped = pool.mapped_total
    assert mapped > 0
    assert pool.in_use_buffers == 0  # every scratch buffer was given back
    assert await kv.batch_get(keys) == values
    assert await kv.get("missing") is None
    assert pool.mapped_total == mapped  # the second batch reused them
    assert pool.in_use_buffers == 0
    # Reads beyond the pool's bound still work (fresh buffers), and nothing leaks.
    small = await _open(MemBackend(), scratch_pool_bytes=4096)
    await small.batch_put(keys, values)
    assert await small.batch_get(keys) == values
    assert small._values._pool is not None and small._values._pool.in_use_buffers == 0
    unpooled = await _open(MemBackend(), scratch_pool_bytes=0)
    await unpooled.batch_put(keys, values)
    assert await unpooled.batch_get(keys) == values


async def test_keys_returns_original_types() -> None:
    kv = await _open(MemBackend())
    await kv.batch_put(["s1", b"b1", b"\xff\xfe"], [b"1", b"2", b"3"])
    assert sorted(await kv.keys(), key=repr) == sorted(["s1", b"b1", b"\xff\xfe"], key=repr)
    assert await kv.keys(b"\xff") == [b"\xff\xfe"]


async def test_hash_collisions_are_detected_and_probed() -> None:
    b = MemBackend()
    # One name byte and one shard: 300 keys over 256 names must collide.
    kv = await _open(b, shards=1, name_hash_bytes=1, max_probes=64)
    keys = [f"k{i}" for i in range(300)]
    values = [f"value of {k}".encode() for k in keys]
    assert all(await kv.batch_put(keys, values))
    assert any("~" in p for p in b.entry_paths("/kv"))
    assert await kv.batch_get(keys) == values
    assert all(await kv.batch_exists(keys))
    assert not await kv.put(keys[7], b"other")  # present: found through its probe
    assert len(await kv.keys()) == 300
    # Removing entries at the head or middle of a chain keeps the rest reachable.
    chained = [p for p in b.entry_paths("/kv") if p.endswith("~2")]
    assert chained
    head = chained[0].rsplit("~", 1)[0]
    heads = [k for k in keys if kv._entries.path(Key.of(k, 100), 0) == head]
    assert len(heads) >= 3
    assert await kv.batch_remove([heads[0], heads[1]]) == [True, True]
    assert await kv.batch_get(heads[2:]) == [values[keys.index(k)] for k in heads[2:]]
    assert await kv.batch_get(heads[:2]) == [None, None]
    gone = set(heads[:2])
    assert await kv.batch_get(keys) == [
        None if k in gone else v for k, v in zip(keys, values, strict=True)
    ]
    # So does eviction of an expired chain head.
    kv.config.ttl_s = 1000.0
    b.age(head, 2000)
    await kv.gc(full=True)
    live = [k for k in heads[2:]]
    got = await kv.batch_get(live)
    assert sum(v is None for v in got) == 1  # the expired one only
    # A key whose name is taken by another reads as a miss, not as the other's value.
    assert await kv.get("absent-key") is None


async def test_removing_many_entries_of_one_chain_keeps_the_rest_reachable() -> None:
    b = MemBackend()
    kv = await _open(b, shards=1, name_hash_bytes=1, max_probes=64)
    by_name: dict[str, list[str]] = {}
    for i in range(5000):
        by_name.setdefault(Key.of(f"x{i}", 100).name(1, 0), []).append(f"x{i}")
    chain = next(ks for ks in by_name.values() if len(ks) >= 8)[:8]
    values = [k.encode() * 3 for k in chain]
    assert all(await kv.batch_put(chain, values))
    assert len(b.entry_paths("/kv")) == 8
    gone = [chain[0], chain[2], chain[3], chain[6]]
    assert all(await kv.batch_remove(gone))
    assert len(b.entry_paths("/kv")) == 4
    assert await kv.batch_get(chain) == [
        None if k in gone else v for k, v in zip(chain, values, strict=True)
    ]
    assert all("~" not in p or int(p.rsplit("~", 1)[1]) < 4 for p in b.entry_paths("/kv"))


async def test_collision_with_too_few_probes_is_a_clear_error() -> None:
    kv = await _open(MemBackend(), shards=1, name_hash_bytes=1, max_probes=1)
    errors = 0
    for i in range(300):
        try:
            await kv.put(f"k{i}", b"v")
        except ChainfsError as e:
            assert e.errno == errno.EEXIST
            errors += 1
    assert errors > 0
    assert len(await kv.keys()) == 300 - errors


# -- reads racing with removal ------------------------------------------------------


async def test_removal_during_read_is_a_clean_miss() -> None:
    b = MemBackend()
    kv = await _open(b)
    value = bytes(range(256)) * 40
    await kv.put("k", value)
    (path,) = b.entry_paths("/kv")

    async def remove_it(ino: int) -> None:
        b.before_read = None
        await b.kv_unlink(path)

    b.before_read = remove_it
    assert await kv.get("k") is None
    buf = bytearray(len(value))
    await kv.put("k", value)
    b.before_read = remove_it
    assert await kv.get_into("k", buf) == -1


async def test_replacement_during_read_returns_one_whole_value() -> None:
    b = MemBackend()
    kv = await _open(b)
    old, new = b"o" * 5000, b"n" * 5000
    await kv.put("k", old)

    async def replace_it(ino: int) -> None:
        b.before_read = None
        await kv.put("k", new, overwrite=True)

    b.before_read = replace_it
    got = await kv.get("k")
    assert got == new  # looked up again after the check failed
    s = await kv.stats()
    assert s.read_retries == 1


async def test_value_of_zeros_removed_mid_read_is_still_whole() -> None:
    # Zero-filled holes must never be mistaken for a value... unless the value
    # really is zeros, in which case the checksum proves the bytes right.
    b = MemBackend()
    kv = await _open(b)
    await kv.put("z", bytes(4096))
    (path,) = b.entry_paths("/kv")

    async def remove_it(ino: int) -> None:
        b.before_read = None
        await b.kv_unlink(path)

    b.before_read = remove_it
    assert await kv.get("z") is None  # the header is gone, so it is a miss


# -- eviction ------------------------------------------------------------------------


async def test_ttl_expired_entries_are_misses_and_removed() -> None:
    b = MemBackend()
    kv = await _open(b, ttl=60)
    await kv.batch_put(["old", "new"], [b"1", b"2"])
    old_path = next(p for p in b.entry_paths("/kv") if b.data[b.names[p].ino].endswith(b"1"))
    b.age(old_path, 120)
    assert await kv.get("old") is None
    assert not await kv.exists("old")
    assert await kv.get("new") == b"2"
    # A put over an expired entry replaces it.
    assert await kv.put("old", b"3")
    assert await kv.get("old") == b"3"
    b.age(b.entry_paths("/kv")[0], 120)
    b.age(b.entry_paths("/kv")[1], 120)
    r = await kv.gc(full=True)
    assert r.expired == 2
    assert not b.entry_paths("/kv")
    assert (await kv.stats()).expirations == 2


async def test_capacity_evicts_least_recently_used_to_low_watermark() -> None:
    b = MemBackend()
    value = bytes(1000)
    entry_bytes = FIXED_HEADER_BYTES + 3 + len(value)
    kv = await _open(
        b,
        capacity_bytes=entry_bytes * 20,
        high_watermark=0.9,
        low_watermark=0.5,
        atime_granularity_s=0,
    )
    keys = [f"k{i:02d}" for i in range(30)]
    for i, k in enumerate(keys):
        await kv.put(k, value)
        b.age(kv._entries.path(Key.of(k, 100), 0), 1000 - i)  # k00 oldest ... k29 newest
    # k00..k04 are read now: most recently used.
    assert all(v is not None for v in await kv.batch_get(keys[:5]))
    await kv.flush_access_times()
    r = await kv.gc(full=True)
    assert r.estimated_bytes is not None and r.estimated_bytes <= entry_bytes * 10
    present = set(k for k, e in zip(keys, await kv.batch_exists(keys), strict=True) if e)
    assert len(present) == 10
    assert set(keys[:5]) <= present  # recently read: kept
    assert set(keys[25:]) <= present  # newest: kept
    assert (await kv.stats()).evictions == 20


async def test_gc_work_per_round_is_bounded() -> None:
    b = MemBackend()
    kv = await _open(b, ttl=10, gc_max_removals_per_round=7)
    await kv.batch_put([f"k{i}" for i in range(20)], [b"v"] * 20)
    for p in b.entry_paths("/kv"):
        b.age(p, 100)
    r = await kv.gc(full=True)
    assert r.expired == 7
    assert len(b.entry_paths("/kv")) == 13


async def test_eviction_continues_to_low_watermark_over_bounded_rounds() -> None:
    b = MemBackend()
    kv = await _open(
        b, capacity_bytes=2000, high_watermark=0.75, low_watermark=0.5, gc_max_removals_per_round=2
    )
    await kv.batch_put([f"k{i:02d}" for i in range(20)], [bytes(100 - 27)] * 20)  # 100 B each
    evicted = [(await kv.gc()).evicted for _ in range(7)]
    assert evicted == [2, 2, 2, 2, 2, 0, 0]  # 2000 B -> 1000 B, two per round, then stop
    assert len(b.entry_paths("/kv")) == 10


async def test_gc_waits_for_a_full_scan_before_evicting() -> None:
    b = MemBackend()
    kv = await _open(b, shards=8, capacity_bytes=100, gc_shards_per_round=3)
    await kv.batch_put([f"k{i}" for i in range(20)], [bytes(50)] * 20)
    r1 = await kv.gc()
    assert r1.estimated_bytes is None and r1.evicted == 0  # 3 of 8 shards known
    await kv.gc()
    r3 = await kv.gc()
    assert r3.estimated_bytes is not None
    assert r3.estimated_bytes <= 80


async def test_stale_temp_files_are_removed() -> None:
    b = MemBackend()
    kv = await _open(b, ttl=100, tmp_max_age_s=60)
    b.add_file("/kv/tmp/dead-writer-1", b"partial")
    b.add_file("/kv/tmp/live-writer-1", b"partial")
    b.age("/kv/tmp/dead-writer-1", 61)
    r = await kv.gc(full=True)
    assert r.tmp_removed == 1
    assert b.tmp_paths("/kv") == ["/kv/tmp/live-writer-1"]


async def test_background_gc_runs_and_close_stops_it() -> None:
    import asyncio

    b = MemBackend()
    kv = await _open(b, ttl=10, background_gc=True, gc_interval_s=0.01)
    await kv.put("k", b"v")
    b.age(b.entry_paths("/kv")[0], 100)
    for _ in range(1000):  # bounded poll: up to ~10 s
        if not b.entry_paths("/kv"):
            break
        await asyncio.sleep(0.01)
    assert not b.entry_paths("/kv")
    await kv.close()
    assert kv.closed
    with pytest.raises(ValueError):
        await kv.get("k")
