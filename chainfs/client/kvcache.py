"""KV cache for LLM inference: immutable values by key, stored as chainfs files.

    cache = fs.kvcache("/kv/llama", ttl=3600, capacity_bytes=64 << 30)
    cache.put(block_hash, kv_bytes)
    n = cache.get_into(block_hash, pinned_buffer)   # -1: miss
    hits = cache.batch_exists(block_hashes).leading_hits

Layout under the cache directory: ``data/<shard>/<name>`` holds one entry
(see kvcache_format), ``tmp/`` holds values being written.

Semantics, across processes and clients:
- Visibility: a put writes the whole value to a file in ``tmp/``, closes it
  (storage has acknowledged every byte on every replica, meta has the exact
  length), then renames it into place in one metadata transaction. A reader
  sees no entry or the complete one, never a part.
- Immutability: a put on a key that is present keeps the present value and
  returns False (first writer wins; both writers wrote the same bytes in the
  usual content-addressed use). ``put(..., overwrite=True)`` replaces it
  atomically instead. A value never changes in place.
- Reads verify: the header names the key and carries the value's length and
  CRC32C, checked after every read. A value removed (evicted, expired,
  replaced) while it is being read fails the check; the read then looks the
  key up again and returns the current value or a miss, never a partial,
  mixed or zeroed one.
- Misses: ``get`` -> None, ``get_into`` -> -1, ``exists`` -> False,
  ``batch_get`` / ``batch_get_into`` -> None / -1 at that position.
- Keys: str (UTF-8; "k" and b"k" are the same key) or bytes, 1 byte to
  ``max_key_bytes`` (ENAMETOOLONG beyond). Values: any contiguous buffer of 0
  bytes to ``max_value_bytes`` (at most 64 MiB; EFBIG beyond, nothing stored).
  Entries are named by a hash of the key; a name taken by another key (a hash
  collision) is detected from the stored key and the entry goes to the next
  probe name (``~1``, ``~2``, ...; EEXIST after ``max_probes``). Removing an
  entry of such a chain moves the chain's last entry into its name (one
  atomic rename), so lookups, which stop at the first free name, still reach
  every entry.
- Eviction: entries older than ``ttl`` (seconds since their put, by the
  modification time meta recorded, compared with this host's clock) are
  misses at once and are removed in the background. When the cache's bytes exceed
  ``high_watermark * capacity_bytes``, the least recently used entries are
  removed down to ``low_watermark * capacity_bytes``. Access times are
  recorded approximately (relatime style: at most once per
  ``atime_granularity_s`` per entry, queued, bounded, dropped when the queue
  is full) by handles that have a capacity or ``record_access_times=True``.
  Each round of the background task does bounded work (shards scanned,
  entries removed). Several processes may evict at once (each removes what
  it sees as least recently used; the total may undershoot the low mark).
  Entries this process is reading are pinned against its own eviction; other
  processes' evictions are made safe by the read verification above.
- Counters: ``stats()`` scans the cache for entries and bytes (cache-wide);
  hits, misses, evictions and expirations are counted by this handle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from chainfs.client.aio_fs import layout_of, normpath
from chainfs.client.kvcache_format import (
    MAX_KEY_FIELD_BYTES,
    Check,
    Key,
    check_entry,
    check_header,
    decode_header,
    encode_header,
    header_len,
    shard_dir_name,
)
from chainfs.client.layout import Layout, split
from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import RENAME_NOREPLACE, XATTR_CREATE, At
from chainfs.common.units import MiB
from chainfs.proto import meta_pb2 as mt

if TYPE_CHECKING:
    from chainfs.client._loop import LoopThread
    from chainfs.client.aio_fs import AsyncFileSystem

log = logging.getLogger(__name__)

MAX_VALUE_BYTES = 64 * MiB  # the largest value any cache accepts
_NS = 1_000_000_000
T = TypeVar("T")

KeyLike = str | bytes | bytearray | memoryview
Buffer = Any  # any object with the buffer protocol (bytes, bytearray, memoryview, numpy...)


@dataclass
class KVCacheConfig:
    # Seconds an entry lives after its put; None: no expiry.
    ttl_s: float | None = None
    # Bytes of values (and headers) the cache aims to hold; None: unbounded.
    capacity_bytes: int | None = None
    # Eviction starts above this fraction of capacity_bytes ...
    high_watermark: float = 0.95
    # ... and stops at this fraction (the gap amortises scans over many puts).
    low_watermark: float = 0.80
    # Longest key in bytes; keys are stored in each entry's header.
    max_key_bytes: int = 1024
    # Largest value in bytes (at most 64 MiB).
    max_value_bytes: int = MAX_VALUE_BYTES
    # Sub-directories the entries are spread over (bounds directory size, and
    # is the unit of background scanning).
    shards: int = 256
    # Digest bytes in an entry's file name (16 = 128 bits: collisions are
    # astronomically rare; tests use 1 to force them).
    name_hash_bytes: int = 16
    # Names tried per key before a put gives up on colliding keys.
    max_probes: int = 4
    # Puts in flight at once in batch_put (each holds one value's write buffers).
    max_parallel_puts: int = 16
    # Keys per metadata batch / storage batch in batch calls.
    max_batch_keys: int = 1024
    # get/get_into/exists calls made while this many are in flight wait and go
    # out together as one batch (one metadata call, one storage batch).
    coalesce_inflight: int = 4
    # Idle read buffers kept for reuse (a fresh buffer costs a zero-fill that
    # shows at GB/s); in-use buffers are not counted.
    scratch_pool_bytes: int = 64 * MiB
    # Re-reads of a key whose entry changed (was removed, replaced) under a read.
    max_read_retries: int = 2
    # Record entries' access times for LRU eviction (one metadata update per
    # entry per atime_granularity_s). None: when this handle has a capacity.
    # Processes that only read a capacity-bounded cache pass True (or the
    # capacity) so that their reads count.
    record_access_times: bool | None = None
    # An entry's access time is recorded at most once per this many seconds.
    atime_granularity_s: float = 60.0
    # Pending access-time updates; beyond that they are dropped (LRU is approximate).
    atime_queue_max: int = 4096
    # Access-time updates in flight at once (bounds the load they put on meta).
    atime_parallel: int = 2
    # Run TTL/capacity eviction in a background task of this handle (when a
    # ttl or capacity is set). Turn off in all but one or a few processes
    # sharing a cache to save scanning.
    background_gc: bool = True
    # Seconds between background rounds.
    gc_interval_s: float = 1.0
    # Shards scanned per round (bounded work per round).
    gc_shards_per_round: int = 32
    # Entries removed per round, expired and evicted together.
    gc_max_removals_per_round: int = 512
    # Oldest entries remembered per shard as eviction candidates.
    gc_candidates_per_shard: int = 256
    # Files in tmp/ older than this are left-overs of writers that died: removed.
    tmp_max_age_s: float = 600.0

    def validate(self) -> None:
        if self.ttl_s is not None and not self.ttl_s > 0:
            raise ValueError("ttl_s must be > 0 (or None)")
        if self.capacity_bytes is not None and self.capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be > 0 (or None)")
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError("need 0 < low_watermark <= high_watermark <= 1")
        if not 1 <= self.max_key_bytes <= MAX_KEY_FIELD_BYTES:
            raise ValueError(f"max_key_bytes must be in [1, {MAX_KEY_FIELD_BYTES}]")
        if not 0 <= self.max_value_bytes <= MAX_VALUE_BYTES:
            raise ValueError(f"max_value_bytes must be in [0, {MAX_VALUE_BYTES}]")
        if not 1 <= self.shards <= 65536:
            raise ValueError("shards must be in [1, 65536]")
        if not 1 <= self.name_hash_bytes <= 32:
            raise ValueError("name_hash_bytes must be in [1, 32]")
        if not 1 <= self.max_probes <= 64:
            raise ValueError("max_probes must be in [1, 64]")
        for name in (
            "max_parallel_puts",
            "max_batch_keys",
            "coalesce_inflight",
            "atime_queue_max",
            "atime_parallel",
            "gc_shards_per_round",
            "gc_max_removals_per_round",
            "gc_candidates_per_shard",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_read_retries", "atime_granularity_s", "scratch_pool_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("gc_interval_s", "tmp_max_age_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


# -- what the cache needs from the file system ----------------------------------


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """What meta says about one file."""

    ino: int
    size: int
    layout: Layout
    mtime_ns: int
    atime_ns: int

    @property
    def last_access_ns(self) -> int:
        return max(self.mtime_ns, self.atime_ns)


class KVCacheBackend(Protocol):
    """The file-system operations a KV cache is built on (AsyncFileSystem provides them)."""

    async def kv_makedirs(self, paths: Sequence[str]) -> None:
        """mkdir -p each path (existing directories are fine)."""

    async def kv_stat_many(self, paths: Sequence[str]) -> list[EntryInfo | None]:
        """Stat files in one batch; None where the path (or its parent) does not exist."""

    async def kv_read_many(self, reads: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        """Read ``len(view)`` bytes at ``offset`` of each file straight into ``view``,
        all in parallel through the chunk path; the bytes actually received per
        read (fewer when chunks are gone: never zero-filled)."""

    async def kv_create(self, path: str, parts: Sequence[memoryview]) -> None:
        """Create ``path`` exclusively, write ``parts`` in order, close (length reported)."""

    async def kv_rename(self, src: str, dst: str, replace: bool) -> None:
        """Atomic rename; EEXIST when ``dst`` exists and not ``replace``."""

    async def kv_unlink(self, path: str) -> bool:
        """Remove a file; False if it did not exist."""

    def kv_list(self, path: str) -> AsyncIterator[list[tuple[str, EntryInfo | None]]]:
        """Pages of (name, info) of a directory (info None for non-files)."""

    async def kv_set_atime(self, path: str, atime_ns: int) -> None:
        """Set a file's access time (ENOENT is not an error)."""

    async def kv_xattr_create(self, path: str, name: str, value: bytes) -> bool:
        """Set an extended attribute unless it exists (atomically); whether it was set."""

    async def kv_xattr_get(self, path: str, name: str) -> bytes | None:
        """An extended attribute's value, None if it is not set."""


# -- results ---------------------------------------------------------------------


class BatchExists(list[bool]):
    """``batch_exists`` answer: one bool per key, plus the leading run of hits."""

    @property
    def leading_hits(self) -> int:
        """How many keys from the first one are all present (a prefix-cache hit length)."""
        n = 0
        for present in self:
            if not present:
                break
            n += 1
        return n


@dataclass
class KVStats:
    entries: int  # entries in the cache (scanned now)
    bytes: int  # bytes of those entries' files (values + headers)
    hits: int  # the rest are counted by this handle since it was opened
    misses: int
    evictions: int  # removed for capacity
    expirations: int  # removed for TTL
    puts: int  # values stored
    put_existing: int  # puts that found the key present (nothing written)
    read_retries: int  # reads that found their entry changed under them and looked again
    capacity_bytes: int | None = None
    ttl_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _ShardScan:
    entries: int
    bytes: int
    # (last access ns, name, size, ino), oldest first, at most gc_candidates_per_shard.
    candidates: list[tuple[int, str, int, int]]
    # Base names with entries at probes > 0 (collision chains; rare).
    chained: set[str] = field(default_factory=set)


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    puts: int = 0
    put_existing: int = 0
    read_retries: int = 0


@dataclass
class _Located:
    """A key's entry, found and checked (header read)."""

    probe: int
    info: EntryInfo


@dataclass
class GcRound:
    """What one background round did."""

    shards_scanned: int = 0
    expired: int = 0
    evicted: int = 0
    tmp_removed: int = 0
    estimated_bytes: int | None = None  # None until every shard has been scanned once
    errors: list[str] = field(default_factory=list)


# -- the async core --------------------------------------------------------------


LAYOUT_XATTR = "user.chainfs.kvcache"  # on the cache directory: how its entries are named
_LAYOUT_FIELDS = ("shards", "name_hash_bytes", "max_probes")


def _parse_layout(raw: bytes | None, where: str) -> dict[str, int]:
    try:
        if raw is None:
            raise ValueError(f"no {LAYOUT_XATTR} attribute")
        doc = json.loads(raw)
        if doc.get("format") != 1:
            raise ValueError(f"format {doc.get('format')!r}")
        layout = {name: int(doc[name]) for name in _LAYOUT_FIELDS}
        KVCacheConfig(**layout).validate()  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as e:
        raise ChainfsError(Code.EINVAL, f"not a KV cache of this version: {e}", where) from None
    return layout


class _ScratchPool:
    """Read buffers for reuse, by size class, at most ``max_bytes`` of them idle."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._idle_bytes = 0
        self._free: dict[int, list[bytearray]] = collections.defaultdict(list)

    @staticmethod
    def _size_class(n: int) -> int:
        if n <= 64 * 1024:
            return max(4096, 1 << (n - 1).bit_length())
        return -(-n // (64 * 1024)) * (64 * 1024)

    def take(self, n: int) -> memoryview:
        size = self._size_class(n)
        free = self._free.get(size)
        if free:
            self._idle_bytes -= size
            return memoryview(free.pop())[:n]
        return memoryview(bytearray(size))[:n]

    def give(self, view: memoryview) -> None:
        buf = view.obj
        assert isinstance(buf, bytearray), type(buf)
        view.release()
        if self._idle_bytes + len(buf) <= self._max_bytes:
            self._free[len(buf)].append(buf)
            self._idle_bytes += len(buf)


ItemT = TypeVar("ItemT")
R = TypeVar("R")


class _Coalescer(Generic[ItemT, R]):
    """Single-item calls that arrive while ``max_inflight`` batches are out wait, and
    then go out together as one batch (3FS batches small reads the same way). The
    first calls go out at once: coalescing adds no latency to a lone caller."""

    def __init__(
        self,
        run: Callable[[list[ItemT]], Awaitable[list[R | ChainfsError]]],
        max_batch: int,
        max_inflight: int,
    ) -> None:
        assert max_batch > 0 and max_inflight > 0
        self._run = run
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: list[tuple[ItemT, asyncio.Future[R]]] = []
        self._inflight: set[asyncio.Task[None]] = set()

    async def call(self, item: ItemT) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._launch()
        return await fut

    def _launch(self) -> None:
        while self._queue and len(self._inflight) < self._max_inflight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            task = asyncio.ensure_future(self._run_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._launch()

    async def _run_batch(self, batch: list[tuple[ItemT, asyncio.Future[R]]]) -> None:
        live = [(item, fut) for item, fut in batch if not fut.done()]  # skip the cancelled
        if not live:
            return
        try:
            results = await self._run([item for item, _ in live])
        except BaseException as e:
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for (_, fut), r in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(r, ChainfsError):
                fut.set_exception(r)
            else:
                fut.set_result(r)


def _split_probe(path: str) -> tuple[str, int]:
    """(path without its probe suffix, probe number) of an entry path."""
    base, sep, probe = path.rpartition("~")
    if not sep or "/" in probe or not probe.isdigit():
        return path, 0
    return base, int(probe)


def _as_value_view(value: Buffer) -> memoryview:
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(
            f"a KV-cache value must support the buffer protocol, not {type(value).__name__}"
        ) from None
    if not view.contiguous:
        raise ChainfsError(Code.EINVAL, "a KV-cache value must be a contiguous buffer")
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


def _as_out_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if view.readonly:
        raise TypeError("get_into needs a writable buffer")
    if not view.contiguous:
        raise ChainfsError(Code.EINVAL, "get_into needs a contiguous buffer")
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


class AsyncKVCache:
    """A KV cache in one chainfs directory (coroutines; run on the client's loop)."""

    def __init__(self, store: KVCacheBackend, directory: str, config: KVCacheConfig) -> None:
        config.validate()
        if not directory.startswith("/"):
            raise ChainfsError(
                Code.EINVAL, f"a KV-cache directory is an absolute path: {directory!r}"
            )
        self._store = store
        self.directory = directory.rstrip("/") or "/"
        self.config = config
        base = "" if self.directory == "/" else self.directory
        self._data_dir = f"{base}/data"
        self._tmp_dir = f"{base}/tmp"
        self._shard_dirs = [
            f"{self._data_dir}/{shard_dir_name(s, config.shards)}" for s in range(config.shards)
        ]
        # tmp names: unique per handle (random tag), per process, per put.
        self._tmp_prefix = f"{os.getpid()}-{secrets.token_hex(6)}-"
        self._tmp_seq = itertools.count()
        self._counters = _Counters()
        self._pins: collections.Counter[int] = collections.Counter()  # ino -> reads in flight
        self._atime_queue: dict[str, int] = {}  # path -> access ns (insertion ordered, bounded)
        self._atime_wakeup = asyncio.Event()
        self._shard_scans: dict[int, _ShardScan] = {}
        self._put_bytes_since_scan: collections.Counter[int] = collections.Counter()
        self._next_shard = 0
        self._evicting = False  # above the high watermark, not yet down to the low one
        self._put_sem = asyncio.Semaphore(config.max_parallel_puts)
        self._scratch = _ScratchPool(config.scratch_pool_bytes)
        self._record_access = (
            config.capacity_bytes is not None
            if config.record_access_times is None
            else config.record_access_times
        )
        self._single_gets: _Coalescer[tuple[Key, memoryview | None], bytes | memoryview | None] = (
            _Coalescer(self._run_single_gets, config.max_batch_keys, config.coalesce_inflight)
        )
        self._single_exists: _Coalescer[Key, bool] = _Coalescer(
            self._run_single_exists, config.max_batch_keys, config.coalesce_inflight
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @classmethod
    async def open(
        cls, store: KVCacheBackend, directory: str, config: KVCacheConfig | None = None
    ) -> AsyncKVCache:
        """Create the directory tree if needed and start the background tasks.

        How entries are named (shards, name_hash_bytes, max_probes) is fixed by
        whoever creates the cache, in the directory's ``user.chainfs.kvcache``
        attribute; later opens, from any process, use the stored values
        whatever their config says, so every handle finds every entry."""
        config = dataclasses.replace(config or KVCacheConfig())
        config.validate()
        d = normpath(directory)
        await store.kv_makedirs([d])
        mine = {"format": 1, **{name: getattr(config, name) for name in _LAYOUT_FIELDS}}
        # Create-once: the first opener's naming wins; everyone reads it back.
        await store.kv_xattr_create(d, LAYOUT_XATTR, json.dumps(mine).encode())
        layout = _parse_layout(await store.kv_xattr_get(d, LAYOUT_XATTR), d)
        for name in _LAYOUT_FIELDS:
            setattr(config, name, layout[name])
        cache = cls(store, d, config)
        await store.kv_makedirs([cache._tmp_dir, *cache._shard_dirs])
        cache._start_background()
        return cache

    def _start_background(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._atime_loop()))
        c = self.config
        if c.background_gc and (c.ttl_s is not None or c.capacity_bytes is not None):
            self._tasks.append(asyncio.ensure_future(self._gc_loop()))

    # -- naming --------------------------------------------------------------
    def _key(self, key: KeyLike) -> Key:
        return Key.of(key, self.config.max_key_bytes)

    def _path(self, key: Key, probe: int) -> str:
        shard = key.shard(self.config.shards)
        return f"{self._shard_dirs[shard]}/{key.name(self.config.name_hash_bytes, probe)}"

    def _expired(self, info: EntryInfo, now_ns: int) -> bool:
        ttl = self.config.ttl_s
        return ttl is not None and now_ns - info.mtime_ns > ttl * _NS

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed KV cache")

    # -- reads ---------------------------------------------------------------
    async def get(self, key: KeyLike) -> bytes | None:
        """The value of ``key``, or None."""
        self._check_open()
        got = await self._single_gets.call((self._key(key), None))
        assert got is None or isinstance(got, bytes), got
        return got

    async def get_into(self, key: KeyLike, buffer: Buffer) -> int:
        """Read the value into ``buffer``; its length, or -1 on a miss.

        ERANGE (nothing written) when the value is longer than the buffer. On a
        miss the buffer's content is unspecified.
        """
        self._check_open()
        got = await self._single_gets.call((self._key(key), _as_out_view(buffer)))
        return -1 if got is None else len(got)

    async def batch_get(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """Values in key order, None for a missing key."""
        self._check_open()
        ks = [self._key(k) for k in keys]
        out: list[bytes | None] = []
        for lo in range(0, len(ks), self.config.max_batch_keys):
            part = ks[lo : lo + self.config.max_batch_keys]
            for r in await self._get_many(part, [None] * len(part)):
                assert r is None or isinstance(r, bytes), r  # only a caller buffer fails alone
                out.append(r)
        return out

    async def batch_get_into(self, keys: Sequence[KeyLike], buffers: Sequence[Buffer]) -> list[int]:
        """Read each value into its buffer; lengths in key order, -1 for a miss.

        The part of a value in the entry's first chunk (beside its header) is
        copied from a scratch buffer; every later chunk lands straight in the
        buffer (one storage request per chunk either way).

        ERANGE when a value is longer than its buffer: that buffer is left
        alone, the other keys are read, then the error is raised.
        """
        self._check_open()
        if len(keys) != len(buffers):
            raise ChainfsError(
                Code.EINVAL, f"{len(keys)} keys but {len(buffers)} buffers in batch_get_into"
            )
        ks = [self._key(k) for k in keys]
        views: list[memoryview | None] = [_as_out_view(b) for b in buffers]
        out: list[int] = []
        first_error: BaseException | None = None
        for lo in range(0, len(ks), self.config.max_batch_keys):
            hi = lo + self.config.max_batch_keys
            for r in await self._get_many(ks[lo:hi], views[lo:hi]):
                if isinstance(r, BaseException):
                    first_error = first_error or r
                    out.append(-1)
                else:
                    out.append(-1 if r is None else len(r))
        if first_error is not None:
            raise first_error
        return out

    async def _run_single_gets(
        self, items: list[tuple[Key, memoryview | None]]
    ) -> list[bytes | memoryview | ChainfsError | None]:
        return await self._get_many([k for k, _ in items], [o for _, o in items])

    async def _run_single_exists(self, keys: list[Key]) -> list[bool | ChainfsError]:
        return [loc is not None for loc in await self._locate(keys)]

    async def _get_many(
        self, keys: list[Key], outs: list[memoryview | None]
    ) -> list[bytes | memoryview | ChainfsError | None]:
        """Per key: its value (a view of ``outs[i]`` when given, else new bytes), None
        on a miss, or ERANGE when the value does not fit ``outs[i]``.

        One metadata batch looks every key up; one storage batch reads every hit,
        one request per chunk: storage checks a whole chunk's CRC for every
        request, so two requests on one chunk would cost it twice. The first
        chunk (header and the value's start) lands in a pooled scratch buffer
        and that part of the value is copied out; the value's later chunks go
        straight into the caller's buffer.
        """
        n = len(keys)
        result: list[bytes | memoryview | ChainfsError | None] = [None] * n
        probe = [0] * n
        retries = [0] * n
        pending = list(range(n))
        for _ in range(self.config.max_probes + self.config.max_read_retries + 1):
            if not pending:
                break
            infos = await self._store.kv_stat_many([self._path(keys[i], probe[i]) for i in pending])
            now_ns = time.time_ns()
            # (key index, info, first chunk (scratch), the rest of the value, caller buffer)
            reads: list[tuple[int, EntryInfo, memoryview, memoryview | None, memoryview | None]]
            reads = []
            items: list[tuple[EntryInfo, int, memoryview]] = []
            nxt: list[int] = []
            for i, info in zip(pending, infos, strict=True):
                if info is None or self._expired(info, now_ns):
                    continue  # miss
                hlen = keys[i].header_len
                vlen = info.size - hlen
                if vlen < 0:
                    # Too short to hold this key's entry: another key's; look further.
                    if probe[i] + 1 < self.config.max_probes:
                        probe[i] += 1
                        nxt.append(i)
                    continue
                out = outs[i]
                if out is not None and len(out) < vlen:
                    result[i] = ChainfsError(
                        Code.ERANGE,
                        f"value of {vlen} bytes does not fit a {len(out)}-byte buffer",
                        keys[i].display(),
                    )
                    continue
                first = min(info.size, info.layout.chunk_size)
                head = self._scratch.take(first)
                items.append((info, 0, head))
                rest: memoryview | None = None
                if info.size > first:
                    if out is not None:
                        rest = out[first - hlen : vlen]
                    else:
                        rest = memoryview(bytearray(info.size - first))
                    items.append((info, first, rest))
                reads.append((i, info, head, rest, out))
            if reads:
                for r in reads:
                    self._pins[r[1].ino] += 1
                try:
                    await self._store.kv_read_many(items)
                except BaseException:
                    for r in reads:
                        self._scratch.give(r[2])
                    raise
                finally:
                    for r in reads:
                        ino = r[1].ino
                        self._pins[ino] -= 1
                        if self._pins[ino] <= 0:
                            del self._pins[ino]
                for i, info, head, rest, out in reads:
                    hlen = keys[i].header_len
                    parts = [head[hlen:]] if rest is None else [head[hlen:], rest]
                    verdict = check_entry(keys[i].raw, head[:hlen], parts)
                    if verdict is Check.OK:
                        if out is not None:
                            out[: len(head) - hlen] = head[hlen:]
                            result[i] = out[: info.size - hlen]
                        else:
                            result[i] = b"".join(parts)
                        self._note_access(self._path(keys[i], probe[i]), info, now_ns)
                    elif verdict is Check.OTHER_KEY:
                        if probe[i] + 1 < self.config.max_probes:
                            probe[i] += 1
                            nxt.append(i)
                    elif retries[i] < self.config.max_read_retries:
                        # Removed or replaced under the read: look it up again.
                        retries[i] += 1
                        self._counters.read_retries += 1
                        nxt.append(i)
                    self._scratch.give(head)
            pending = nxt
        hits = sum(1 for r in result if isinstance(r, bytes | memoryview))
        self._counters.hits += hits
        self._counters.misses += sum(1 for r in result if r is None)
        return result

    def _note_access(self, path: str, info: EntryInfo, now_ns: int) -> None:
        """Queue an access-time update if the recorded one is older than the granularity."""
        if not self._record_access:
            return
        if now_ns - info.last_access_ns < self.config.atime_granularity_s * _NS:
            return
        if path not in self._atime_queue and len(self._atime_queue) >= self.config.atime_queue_max:
            return  # bounded: drop (the LRU order is approximate anyway)
        self._atime_queue[path] = now_ns
        self._atime_wakeup.set()

    async def _locate(self, keys: list[Key]) -> list[_Located | None]:
        """Find each key's entry (header checked, value not read); None if absent/expired."""
        n = len(keys)
        found: list[_Located | None] = [None] * n
        probe = [0] * n
        retries = [0] * n
        pending = list(range(n))
        for _ in range(self.config.max_probes + self.config.max_read_retries + 1):
            if not pending:
                break
            infos = await self._store.kv_stat_many([self._path(keys[i], probe[i]) for i in pending])
            now_ns = time.time_ns()
            reads: list[tuple[int, EntryInfo, memoryview]] = []
            nxt: list[int] = []
            for i, info in zip(pending, infos, strict=True):
                if info is None or self._expired(info, now_ns):
                    continue
                if info.size < keys[i].header_len:
                    if probe[i] + 1 < self.config.max_probes:
                        probe[i] += 1
                        nxt.append(i)
                    continue
                reads.append((i, info, memoryview(bytearray(keys[i].header_len))))
            if reads:
                await self._store.kv_read_many([(info, 0, hb) for _, info, hb in reads])
                for i, info, hbuf in reads:
                    key = keys[i]
                    verdict = check_header(key.raw, hbuf, info.size - key.header_len)
                    if verdict is Check.OK:
                        found[i] = _Located(probe[i], info)
                    elif verdict is Check.OTHER_KEY:
                        if probe[i] + 1 < self.config.max_probes:
                            probe[i] += 1
                            nxt.append(i)
                    elif retries[i] < self.config.max_read_retries:
                        retries[i] += 1
                        nxt.append(i)
            pending = nxt
        return found

    async def exists(self, key: KeyLike) -> bool:
        self._check_open()
        return await self._single_exists.call(self._key(key))

    async def batch_exists(self, keys: Sequence[KeyLike]) -> BatchExists:
        """Whether each key is present (``.leading_hits``: the length of the leading run)."""
        self._check_open()
        ks = [self._key(k) for k in keys]
        out = BatchExists()
        for lo in range(0, len(ks), self.config.max_batch_keys):
            out.extend(
                loc is not None
                for loc in await self._locate(ks[lo : lo + self.config.max_batch_keys])
            )
        return out

    # -- writes --------------------------------------------------------------
    async def put(self, key: KeyLike, value: Buffer, *, overwrite: bool = False) -> bool:
        """Store ``value`` under ``key``; False if the key was present (kept unless overwrite)."""
        return (await self.batch_put([key], [value], overwrite=overwrite))[0]

    async def batch_put(
        self, keys: Sequence[KeyLike], values: Sequence[Buffer], *, overwrite: bool = False
    ) -> list[bool]:
        """Store many values in parallel; per key, whether it was stored.

        Every key and value is checked first: one bad input stores nothing.
        If some puts fail (ENOSPC, EIO), the others still complete; the first
        failure is raised after all have finished.
        """
        self._check_open()
        if len(keys) != len(values):
            raise ChainfsError(
                Code.EINVAL, f"{len(keys)} keys but {len(values)} values in batch_put"
            )
        ks = [self._key(k) for k in keys]
        vs = [_as_value_view(v) for v in values]
        for k, v in zip(ks, vs, strict=True):
            if len(v) > self.config.max_value_bytes:
                raise ChainfsError(
                    Code.EFBIG,
                    f"KV-cache value of {len(v)} bytes is larger than "
                    f"max_value_bytes={self.config.max_value_bytes}",
                    k.display(),
                )

        async def one(k: Key, v: memoryview) -> bool:
            async with self._put_sem:
                return await self._put_one(k, v, overwrite)

        results = await asyncio.gather(
            *(one(k, v) for k, v in zip(ks, vs, strict=True)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [bool(r) for r in results]

    async def _put_one(self, key: Key, value: memoryview, overwrite: bool) -> bool:
        head = encode_header(key.raw, key.is_str, len(value), crc32c(value))
        tmp = f"{self._tmp_dir}/{self._tmp_prefix}{next(self._tmp_seq)}"
        await self._create_tmp(tmp, [memoryview(head), value])
        nbytes = len(head) + len(value)
        placed = False
        try:
            probe = 0
            # Bounded: a name is looked at again only when it was freed under us.
            for _ in range(4 * self.config.max_probes):
                if probe >= self.config.max_probes:
                    break
                dst = self._path(key, probe)
                try:
                    await self._store.kv_rename(tmp, dst, replace=False)
                except ChainfsError as e:
                    if e.code != Code.EEXIST:
                        raise
                else:
                    placed = True
                    self._note_put(key, nbytes)
                    return True
                # The name is taken: by this key (present or expired) or by another key.
                (holder,) = await self._locate_at([key], probe)
                if holder == "other":
                    probe += 1
                    continue
                if holder == "absent":
                    continue  # freed since our rename failed: try this name again
                if holder == "mine" and not overwrite:
                    self._counters.put_existing += 1
                    return False
                # This key's value to overwrite, or an expired or unreadable one: replace.
                await self._store.kv_rename(tmp, dst, replace=True)
                placed = True
                self._note_put(key, nbytes)
                return True
            raise ChainfsError(
                Code.EEXIST,
                f"{self.config.max_probes} entry names of this key are taken by other keys",
                key.display(),
            )
        finally:
            if not placed:
                with contextlib.suppress(ChainfsError, OSError):
                    await self._store.kv_unlink(tmp)

    def _note_put(self, key: Key, nbytes: int) -> None:
        self._counters.puts += 1
        self._put_bytes_since_scan[key.shard(self.config.shards)] += nbytes

    async def _create_tmp(self, tmp: str, parts: list[memoryview]) -> None:
        try:
            await self._store.kv_create(tmp, parts)
        except BaseException as e:
            # Nothing half-visible: the name was never in data/; drop the temp file.
            with contextlib.suppress(ChainfsError, OSError):
                await self._store.kv_unlink(tmp)
            if isinstance(e, ChainfsError) and e.code == Code.ENOENT:
                # tmp/ is gone (the cache directory was removed): recreate once.
                await self._store.kv_makedirs([self._tmp_dir, *self._shard_dirs])
                await self._store.kv_create(tmp, parts)
                return
            raise

    async def _locate_at(self, keys: list[Key], probe: int) -> list[str]:
        """Who holds each key's name at ``probe``: "mine", "expired-mine", "other", "absent"."""
        infos = await self._store.kv_stat_many([self._path(k, probe) for k in keys])
        now_ns = time.time_ns()
        out: list[str] = []
        for key, info in zip(keys, infos, strict=True):
            if info is None:
                out.append("absent")
                continue
            if info.size < key.header_len:
                out.append("other")
                continue
            hbuf = memoryview(bytearray(key.header_len))
            await self._store.kv_read_many([(info, 0, hbuf)])
            verdict = check_header(key.raw, hbuf, info.size - key.header_len)
            if verdict is Check.OTHER_KEY:
                out.append("other")
            elif verdict is Check.CHANGED:
                # Unreadable now (being removed): treat the name as ours to replace.
                out.append("expired-mine")
            elif self._expired(info, now_ns):
                out.append("expired-mine")
            else:
                out.append("mine")
        return out

    async def remove(self, key: KeyLike) -> bool:
        """Remove ``key``; False if it was not present."""
        return (await self.batch_remove([key]))[0]

    async def batch_remove(self, keys: Sequence[KeyLike]) -> list[bool]:
        self._check_open()
        ks = [self._key(k) for k in keys]
        out: list[bool] = []
        for lo in range(0, len(ks), self.config.max_batch_keys):
            part = ks[lo : lo + self.config.max_batch_keys]
            locs = await self._locate(part)

            found = [
                (i, self._path(k, loc.probe))
                for i, (k, loc) in enumerate(zip(part, locs, strict=True))
                if loc is not None
            ]
            removed = await self._remove_paths([p for _, p in found], [True] * len(found))
            done = [False] * len(part)
            for (i, _), ok in zip(found, removed, strict=True):
                done[i] = ok
            out.extend(done)
        return out

    async def _remove_paths(self, paths: list[str], may_chain: list[bool]) -> list[bool]:
        """Remove entries, keeping collision chains whole: an entry at probe p whose
        name has entries at higher probes is replaced, in one atomic rename, by the
        last of them (else a later probe would no longer be reachable: lookups stop
        at the first free name). ``may_chain[i]`` False skips looking for them."""
        by_base: dict[str, list[int]] = collections.defaultdict(list)
        for i, path in enumerate(paths):
            by_base[_split_probe(path)[0]].append(i)
        if any(len(ix) > 1 for ix in by_base.values()):
            # Several entries of one chain: one at a time, highest probe first, each
            # seeing the chain as the previous left it.
            out = [False] * len(paths)

            async def one_chain(ix: list[int]) -> None:
                for i in sorted(ix, key=lambda i: -_split_probe(paths[i])[1]):
                    (out[i],) = await self._remove_paths([paths[i]], [may_chain[i]])

            await asyncio.gather(*(one_chain(ix) for ix in by_base.values()))
            return out
        higher: list[tuple[int, str]] = []
        for i, (path, chain) in enumerate(zip(paths, may_chain, strict=True)):
            if chain:
                base, probe = _split_probe(path)
                higher.extend((i, f"{base}~{q}") for q in range(probe + 1, self.config.max_probes))
        last: dict[int, str] = {}
        if higher:
            infos = await self._store.kv_stat_many([h for _, h in higher])
            for (i, h), info in zip(higher, infos, strict=True):
                if info is not None:
                    last[i] = h  # in probe order: the highest present wins

        async def one(i: int, path: str) -> bool:
            async with self._put_sem:
                if i in last:
                    try:
                        await self._store.kv_rename(last[i], path, replace=True)
                        return True
                    except ChainfsError as e:
                        if e.code != Code.ENOENT:
                            raise  # ENOENT: the last entry went meanwhile; just remove
                return await self._store.kv_unlink(path)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(paths))))

    # -- listing and stats ---------------------------------------------------
    async def keys(self, prefix: KeyLike = b"") -> list[str | bytes]:
        """Every present key starting with ``prefix`` (scans the whole cache)."""
        self._check_open()
        want = prefix.encode("utf-8") if isinstance(prefix, str) else bytes(prefix)
        now_ns = time.time_ns()
        out: list[str | bytes] = []
        probe_bytes = header_len(self.config.max_key_bytes)
        for shard_dir in self._shard_dirs:
            async for page in self._store.kv_list(shard_dir):
                files = [
                    info for _, info in page if info is not None and not self._expired(info, now_ns)
                ]
                for lo in range(0, len(files), self.config.max_batch_keys):
                    chunk = files[lo : lo + self.config.max_batch_keys]
                    bufs = [memoryview(bytearray(min(info.size, probe_bytes))) for info in chunk]
                    got = await self._store.kv_read_many(
                        [(info, 0, b) for info, b in zip(chunk, bufs, strict=True)]
                    )
                    for info, b, n in zip(chunk, bufs, got, strict=True):
                        header = decode_header(b[:n])
                        if header is None or header.value_len != info.size - header_len(
                            len(header.key)
                        ):
                            continue  # not an entry, or being removed
                        if header.key.startswith(want):
                            out.append(header.original_key())
        return out

    async def _scan_shard(self, shard: int) -> tuple[_ShardScan, list[tuple[str, EntryInfo]]]:
        """Entries and bytes of one shard, its oldest entries, and its expired ones."""
        now_ns = time.time_ns()
        entries = 0
        nbytes = 0
        expired: list[tuple[str, EntryInfo]] = []
        oldest: list[tuple[int, str, int, int]] = []  # max-heap by negated access time
        keep = self.config.gc_candidates_per_shard
        chained: set[str] = set()
        async for page in self._store.kv_list(self._shard_dirs[shard]):
            for name, info in page:
                if info is None:
                    continue
                if "~" in name:
                    chained.add(name.split("~", 1)[0])
                if self._expired(info, now_ns):
                    expired.append((name, info))
                    continue
                entries += 1
                nbytes += info.size
                item = (-info.last_access_ns, name, info.size, info.ino)
                if len(oldest) < keep:
                    heapq.heappush(oldest, item)
                elif item > oldest[0]:
                    heapq.heapreplace(oldest, item)
        candidates = sorted((-a, name, size, ino) for a, name, size, ino in oldest)
        return _ShardScan(entries, nbytes, candidates, chained), expired

    async def stats(self) -> KVStats:
        """Counters of this handle, and entries/bytes of the whole cache (scanned now)."""
        self._check_open()
        sem = asyncio.Semaphore(16)

        async def scan(s: int) -> _ShardScan:
            async with sem:
                return (await self._scan_shard(s))[0]

        scans = await asyncio.gather(*(scan(s) for s in range(self.config.shards)))
        c = self._counters
        return KVStats(
            entries=sum(s.entries for s in scans),
            bytes=sum(s.bytes for s in scans),
            hits=c.hits,
            misses=c.misses,
            evictions=c.evictions,
            expirations=c.expirations,
            puts=c.puts,
            put_existing=c.put_existing,
            read_retries=c.read_retries,
            capacity_bytes=self.config.capacity_bytes,
            ttl_s=self.config.ttl_s,
        )

    # -- eviction ------------------------------------------------------------
    def estimated_bytes(self) -> int | None:
        """Bytes in the cache as of the last scans plus this handle's puts since (None
        until every shard was scanned once)."""
        if len(self._shard_scans) < self.config.shards:
            return None
        return sum(s.bytes for s in self._shard_scans.values()) + sum(
            self._put_bytes_since_scan.values()
        )

    async def gc(self, full: bool = False) -> GcRound:
        """One bounded round of TTL and capacity eviction (what the background task runs).

        ``full``: scan every shard this round (still at most
        gc_max_removals_per_round removals).
        """
        self._check_open()
        c = self.config
        r = GcRound()
        budget = c.gc_max_removals_per_round
        n_scan = c.shards if full else min(c.gc_shards_per_round, c.shards)
        for _ in range(n_scan):
            shard = self._next_shard
            self._next_shard = (shard + 1) % c.shards
            scan, expired = await self._scan_shard(shard)
            self._shard_scans[shard] = scan
            self._put_bytes_since_scan.pop(shard, None)
            r.shards_scanned += 1
            for name, _ in expired:
                if budget <= 0:
                    break
                budget -= 1
                if await self._remove_entry(shard, name, r):
                    r.expired += 1
                    self._counters.expirations += 1
        r.tmp_removed = await self._clean_tmp(budget)
        budget -= r.tmp_removed
        r.estimated_bytes = self.estimated_bytes()
        if c.capacity_bytes is not None and r.estimated_bytes is not None:
            high = c.high_watermark * c.capacity_bytes
            low = c.low_watermark * c.capacity_bytes
            # Hysteresis: once above high, keep evicting (over as many bounded
            # rounds as it takes) until at or below low.
            if r.estimated_bytes > high:
                self._evicting = True
            if self._evicting:
                r.estimated_bytes = await self._evict(r.estimated_bytes, low, budget, r)
                if r.estimated_bytes <= low:
                    self._evicting = False
        return r

    async def _evict(self, total: int, low: float, budget: int, r: GcRound) -> int:
        """Remove the least recently used candidates until ``total <= low``; the new total."""
        merged = heapq.merge(
            *(
                [(a, s, name, size, ino) for a, name, size, ino in scan.candidates]
                for s, scan in self._shard_scans.items()
            )
        )
        removed: dict[int, set[str]] = collections.defaultdict(set)
        for _, shard, name, size, ino in merged:
            if total <= low or budget <= 0:
                break
            if ino in self._pins:
                continue  # this process is reading it
            budget -= 1
            scan = self._shard_scans[shard]
            if await self._remove_entry(shard, name, r):
                r.evicted += 1
                self._counters.evictions += 1
            # Gone either way (removed now or by someone else): no longer counted.
            total -= size
            scan.bytes -= size
            scan.entries -= 1
            removed[shard].add(name)
        for shard, names in removed.items():
            scan = self._shard_scans[shard]
            scan.candidates = [c for c in scan.candidates if c[1] not in names]
        return total

    async def _remove_entry(self, shard: int, name: str, r: GcRound) -> bool:
        path = f"{self._shard_dirs[shard]}/{name}"
        scan = self._shard_scans.get(shard)
        may_chain = scan is None or name.split("~", 1)[0] in scan.chained
        try:
            (removed,) = await self._remove_paths([path], [may_chain])
            return removed
        except ChainfsError as e:
            r.errors.append(f"{path}: {e}")
            log.warning("kvcache: could not remove %s: %s", path, e)
            return False

    async def _clean_tmp(self, budget: int) -> int:
        """Remove temp files of writers that died (older than tmp_max_age_s)."""
        if budget <= 0:
            return 0
        cutoff_ns = time.time_ns() - int(self.config.tmp_max_age_s * _NS)
        removed = 0
        async for page in self._store.kv_list(self._tmp_dir):
            for name, info in page:
                if info is None or info.mtime_ns > cutoff_ns:
                    continue
                with contextlib.suppress(ChainfsError):
                    if await self._store.kv_unlink(f"{self._tmp_dir}/{name}"):
                        removed += 1
                if removed >= budget:
                    return removed
        return removed

    async def _gc_loop(self) -> None:
        while not self._closed:
            try:
                await self.gc()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a round failing (meta restarting...) must not stop GC
                log.warning("kvcache %s: gc round failed: %s", self.directory, e)
            await asyncio.sleep(self.config.gc_interval_s)

    async def _atime_loop(self) -> None:
        sem = asyncio.Semaphore(self.config.atime_parallel)

        async def one(path: str, ns: int) -> None:
            async with sem:
                try:
                    await self._store.kv_set_atime(path, ns)
                except ChainfsError as e:
                    log.debug("kvcache: atime of %s not recorded: %s", path, e)

        while True:
            await self._atime_wakeup.wait()
            self._atime_wakeup.clear()
            while self._atime_queue:
                batch = list(self._atime_queue.items())[: self.config.atime_queue_max]
                for p, _ in batch:
                    del self._atime_queue[p]
                await asyncio.gather(*(one(p, ns) for p, ns in batch))

    async def flush_access_times(self) -> None:
        """Record queued access times now (tests and orderly shutdown)."""
        batch = list(self._atime_queue.items())
        self._atime_queue.clear()
        for p, ns in batch:
            with contextlib.suppress(ChainfsError):
                await self._store.kv_set_atime(p, ns)

    # -- lifetime ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop the background tasks and record pending access times (idempotent)."""
        if self._closed:
            return
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.flush_access_times()
        self._closed = True

    async def __aenter__(self) -> AsyncKVCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<chainfs.AsyncKVCache {self.directory!r}{' closed' if self._closed else ''}>"


# -- the sync twin -------------------------------------------------------------


class KVCache:
    """A KV cache for synchronous code: AsyncKVCache run on the FileSystem's loop thread."""

    def __init__(self, acache: AsyncKVCache, loop: LoopThread) -> None:
        self._a = acache
        self._loop = loop

    @property
    def aio(self) -> AsyncKVCache:
        return self._a

    @property
    def directory(self) -> str:
        return self._a.directory

    @property
    def config(self) -> KVCacheConfig:
        return self._a.config

    @property
    def closed(self) -> bool:
        return self._a.closed

    def get(self, key: KeyLike) -> bytes | None:
        return self._loop.run(self._a.get(key))

    def get_into(self, key: KeyLike, buffer: Buffer) -> int:
        return self._loop.run(self._a.get_into(key, buffer))

    def exists(self, key: KeyLike) -> bool:
        return self._loop.run(self._a.exists(key))

    def put(self, key: KeyLike, value: Buffer, *, overwrite: bool = False) -> bool:
        return self._loop.run(self._a.put(key, value, overwrite=overwrite))

    def remove(self, key: KeyLike) -> bool:
        return self._loop.run(self._a.remove(key))

    def batch_get(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        return self._loop.run(self._a.batch_get(keys))

    def batch_get_into(self, keys: Sequence[KeyLike], buffers: Sequence[Buffer]) -> list[int]:
        return self._loop.run(self._a.batch_get_into(keys, buffers))

    def batch_exists(self, keys: Sequence[KeyLike]) -> BatchExists:
        return self._loop.run(self._a.batch_exists(keys))

    def batch_put(
        self, keys: Sequence[KeyLike], values: Sequence[Buffer], *, overwrite: bool = False
    ) -> list[bool]:
        return self._loop.run(self._a.batch_put(keys, values, overwrite=overwrite))

    def batch_remove(self, keys: Sequence[KeyLike]) -> list[bool]:
        return self._loop.run(self._a.batch_remove(keys))

    def keys(self, prefix: KeyLike = b"") -> list[str | bytes]:
        return self._loop.run(self._a.keys(prefix))

    def stats(self) -> KVStats:
        return self._loop.run(self._a.stats())

    def gc(self, full: bool = False) -> GcRound:
        return self._loop.run(self._a.gc(full))

    def estimated_bytes(self) -> int | None:
        return self._a.estimated_bytes()

    def flush_access_times(self) -> None:
        self._loop.run(self._a.flush_access_times())

    def close(self) -> None:
        if self._a.closed or not self._loop.alive:
            return
        self._loop.run(self._a.close())

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<chainfs.KVCache {self.directory!r}{' closed' if self.closed else ''}>"


class FsBackend:
    """KVCacheBackend over an AsyncFileSystem: meta calls through its MetaClient, chunk
    reads through its parallel chunk path (batched per storage node, into the views)."""

    def __init__(self, afs: AsyncFileSystem) -> None:
        self._afs = afs
        self._meta = afs._meta
        # Directory path -> (inode id, when resolved): entries are then named
        # (directory inode, name), which meta resolves with one lookup instead
        # of a walk from the root. Trusted for _DIR_INO_TTL_S, so a cache
        # directory removed and made again is noticed within that time.
        self._dirs: dict[str, tuple[int, float]] = {}

    async def _dir_inos(self, dirs: set[str]) -> dict[str, int]:
        now = time.monotonic()
        stale = [d for d in dirs if d not in self._dirs or now - self._dirs[d][1] > _DIR_INO_TTL_S]
        if stale:
            found = await self._meta.batch_stat(stale, follow=True)
            for d, r in zip(stale, found, strict=True):
                if isinstance(r, ChainfsError) or r.type != mt.DIRECTORY:
                    self._dirs.pop(d, None)
                else:
                    self._dirs[d] = (r.ino, now)
        return {d: self._dirs[d][0] for d in dirs if d in self._dirs}

    async def _ats(self, paths: Sequence[str]) -> list[At]:
        """(directory inode, name) for each path whose directory is known, else the path."""
        parts = [p.rsplit("/", 1) for p in paths]
        inos = await self._dir_inos({d or "/" for d, _ in parts})
        out: list[At] = []
        for p, (d, name) in zip(paths, parts, strict=True):
            ino = inos.get(d or "/")
            out.append(p if ino is None else (ino, name))
        return out

    async def kv_makedirs(self, paths: Sequence[str]) -> None:
        found = await self._meta.batch_stat(list(paths), follow=True)
        missing = [
            p
            for p, r in zip(paths, found, strict=True)
            if isinstance(r, ChainfsError) and r.code in (Code.ENOENT, Code.ENOTDIR)
        ]
        for p, r in zip(paths, found, strict=True):
            if isinstance(r, ChainfsError) and p not in missing:
                raise ChainfsError(r.code, r.message, p)
        sem = asyncio.Semaphore(_MKDIR_PARALLEL)

        async def mkdir(p: str) -> None:
            async with sem:
                await self._meta.mkdir(p, 0o777, parents=True)

        self._dirs.clear()
        await asyncio.gather(*(mkdir(p) for p in missing))

    async def kv_stat_many(self, paths: Sequence[str]) -> list[EntryInfo | None]:
        found = await self._meta.batch_stat(await self._ats(paths), follow=False)
        out: list[EntryInfo | None] = []
        for p, r in zip(paths, found, strict=True):
            if isinstance(r, ChainfsError):
                if r.code in (Code.ENOENT, Code.ENOTDIR):
                    out.append(None)
                    continue
                raise ChainfsError(r.code, r.message, p)
            out.append(_entry_info(r))
        return out

    async def kv_read_many(self, reads: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        work = [
            (info.ino, info.layout, piece, view)
            for info, offset, view in reads
            for piece in split(info.layout, offset, len(view))
        ]
        await self._afs._read_pieces(work)  # missing chunks come back as zeros
        return [len(view) for _, _, view in reads]

    async def kv_create(self, path: str, parts: Sequence[memoryview]) -> None:
        try:
            f = await self._afs.open(path, "xb")
        except OSError as e:
            raise _chainfs_error(e, path) from None
        try:
            for part in parts:
                await f.write(part)
        except OSError as e:
            with contextlib.suppress(OSError):
                await f.close()
            raise _chainfs_error(e, path) from None
        try:
            await f.close()
        except OSError as e:
            raise _chainfs_error(e, path) from None

    async def kv_rename(self, src: str, dst: str, replace: bool) -> None:
        at_src, at_dst = await self._ats([src, dst])
        try:
            await self._meta.rename(at_src, at_dst, flags=0 if replace else RENAME_NOREPLACE)
        except ChainfsError as e:
            if e.code == Code.ENOENT:
                self._dirs.clear()  # perhaps a directory was made again: look it up anew
            raise

    async def kv_unlink(self, path: str) -> bool:
        (at,) = await self._ats([path])
        try:
            await self._meta.unlink(at)
        except ChainfsError as e:
            if e.code in (Code.ENOENT, Code.ENOTDIR):
                return False
            raise
        return True

    async def kv_list(self, path: str) -> AsyncIterator[list[tuple[str, EntryInfo | None]]]:
        after = b""
        while True:
            try:
                rsp = await self._meta.readdir(
                    path, after, self._afs.config.readdir_page_entries, with_attrs=True
                )
            except ChainfsError as e:
                if e.code in (Code.ENOENT, Code.ENOTDIR):
                    return
                raise
            page: list[tuple[str, EntryInfo | None]] = []
            for ent in rsp.entries:
                name = ent.name.decode("utf-8", "surrogateescape")
                page.append((name, _entry_info(ent.inode)))
            if page:
                yield page
            if not rsp.more or not rsp.entries:
                return
            after = rsp.entries[-1].name

    async def kv_xattr_create(self, path: str, name: str, value: bytes) -> bool:
        try:
            await self._meta.setxattr(path, name, value, flags=XATTR_CREATE)
        except ChainfsError as e:
            if e.code == Code.EEXIST:
                return False
            raise
        return True

    async def kv_xattr_get(self, path: str, name: str) -> bytes | None:
        try:
            return await self._meta.getxattr(path, name)
        except ChainfsError as e:
            if e.code == Code.ENODATA:
                return None
            raise

    async def kv_set_atime(self, path: str, atime_ns: int) -> None:
        (at,) = await self._ats([path])
        try:
            await self._meta.setattr(at, follow=False, atime_ns=atime_ns)
        except ChainfsError as e:
            if e.code not in (Code.ENOENT, Code.ENOTDIR):
                raise


_MKDIR_PARALLEL = 16  # directory creations in flight when a cache is first opened
_DIR_INO_TTL_S = 5.0  # a directory's inode id is trusted this long (see FsBackend._dirs)


def _entry_info(inode: mt.Inode) -> EntryInfo | None:
    if inode.type != mt.FILE or not inode.layout.chunk_size or not inode.layout.chains:
        return None
    return EntryInfo(inode.ino, inode.size, layout_of(inode), inode.mtime_ns, inode.atime_ns)


def _chainfs_error(e: OSError, path: str) -> ChainfsError:
    if isinstance(e, ChainfsError):
        return e
    cause = e.__cause__
    if isinstance(cause, ChainfsError):
        return cause
    return ChainfsError(e.errno or Code.EIO, e.strerror or str(e), path)


async def open_kvcache(
    afs: AsyncFileSystem,
    directory: str,
    ttl: float | None = None,
    capacity_bytes: int | None = None,
    config: KVCacheConfig | None = None,
    **options: Any,
) -> AsyncKVCache:
    """What ``AsyncFileSystem.kvcache`` does: the cache in ``directory`` (created if needed)."""
    c = make_config(ttl, capacity_bytes, config, **options)
    return await AsyncKVCache.open(FsBackend(afs), normpath(directory), c)


def make_config(
    ttl: float | None = None,
    capacity_bytes: int | None = None,
    config: KVCacheConfig | None = None,
    **overrides: Any,
) -> KVCacheConfig:
    """The config ``fs.kvcache(directory, ttl, capacity_bytes, config=..., **overrides)`` means."""
    c = KVCacheConfig(**config.__dict__) if config is not None else KVCacheConfig()
    if ttl is not None:
        c.ttl_s = float(ttl)
    if capacity_bytes is not None:
        c.capacity_bytes = int(capacity_bytes)
    for name, value in overrides.items():
        if not hasattr(c, name):
            raise TypeError(f"kvcache() got an unexpected keyword argument {name!r}")
        setattr(c, name, value)
    c.validate()
    return c


__all__ = [
    "MAX_VALUE_BYTES",
    "AsyncKVCache",
    "BatchExists",
    "EntryInfo",
    "GcRound",
    "KVCache",
    "KVCacheBackend",
    "KVCacheConfig",
    "KVStats",
    "make_config",
    "open_kvcache",
]
