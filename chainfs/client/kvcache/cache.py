"""AsyncKVCache: get, put and remove of immutable values (semantics: the package docstring)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chainfs.client.chunk_io import ChunkIO
from chainfs.client.kvcache.backend import EntryInfo, FsBackend, KVCacheBackend, NewFile
from chainfs.client.kvcache.coalesce import Coalescer
from chainfs.client.kvcache.config import (
    LAYOUT_XATTR,
    KVCacheConfig,
    apply_layout,
    layout_doc,
    make_config,
)
from chainfs.client.kvcache.entries import Entries, Holder
from chainfs.client.kvcache.eviction import AccessTimes, Evictor, GcRound
from chainfs.client.kvcache.format import (
    Key,
    decode_header,
    encode_header,
    header_len,
)
from chainfs.client.kvcache.locations import LocationRenewer
from chainfs.client.kvcache.puts import TempFiles
from chainfs.client.kvcache.reads import Value, ValueReads
from chainfs.client.kvcache.sync_gets import SyncGets
from chainfs.client.layout import normpath
from chainfs.client.usrbio.user import SharedBuffer
from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code

log = logging.getLogger(__name__)

KeyLike = str | bytes | bytearray | memoryview
Buffer = Any  # the buffer protocol (bytes, numpy...), a CPU torch tensor, a usrbio SharedBuffer

_STATS_SCAN_PARALLEL = 16  # shards listed at once by stats()


class BatchExists(list[bool]):
    """``batch_exists`` answer: one bool per key, plus the leading run of hits."""

    @property
    def leading_hits(self) -> int:
        """How many keys from the first one are all present (a prefix-cache hit length)."""
        return next((i for i, present in enumerate(self) if not present), len(self))


@dataclass
class _Counts:
    """What this handle's reads and writes counted since it was opened."""

    hits: int = 0
    misses: int = 0
    puts: int = 0  # values stored
    put_existing: int = 0  # puts that found the key present (nothing written)
    read_retries: int = 0  # reads that found their entry changed under them and looked again
    # Keys of sync gets and batch gets (also counted in hits) read from the calling thread,
    sync_served: int = 0
    sync_fallbacks: int = 0  # and those that took the loop path (not a clean cached hit)
    lookups: int = 0  # key names stat'ed at meta to find entries (gets, exists)
    renewals: int = 0  # cached locations stat'ed again at meta in the background


@dataclass(kw_only=True)
class KVStats(_Counts):
    entries: int  # entries in the cache (scanned now)
    bytes: int  # bytes of those entries' files (values + headers)
    evictions: int  # removed for capacity by this handle
    expirations: int  # removed for TTL by this handle
    capacity_bytes: int | None = None
    ttl_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_value_view(value: Buffer) -> memoryview:
    value = _plain_buffer(value)
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(
            f"a KV-cache value must support the buffer protocol, not {type(value).__name__}"
        ) from None
    return _bytes_view(view, "a KV-cache value must be a contiguous buffer")


def as_out_view(buffer: Buffer) -> memoryview:
    view = memoryview(_plain_buffer(buffer))
    if view.readonly:
        raise TypeError("get_into needs a writable buffer")
    return _bytes_view(view, "get_into needs a contiguous buffer")


def _plain_buffer(obj: Any) -> Any:
    """A buffer-protocol object over ``obj``'s own memory: a registered shared buffer's
    view, a CPU torch tensor's bytes (no copy); anything else as it is."""
    if isinstance(obj, SharedBuffer):
        return obj.view
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is None or not isinstance(obj, torch.Tensor):
        return obj
    if obj.device.type != "cpu":
        raise TypeError(f"KV-cache tensors must be on the CPU, not {obj.device} (use .cpu())")
    if not obj.is_contiguous():
        raise TypeError("a non-contiguous tensor is not one buffer: pass t.contiguous() (a copy)")
    # uint8 view of the same storage (numpy has no bfloat16; every dtype has bytes)
    return obj.detach().reshape(-1).view(torch.uint8).numpy()


def _bytes_view(view: memoryview, not_contiguous: str) -> memoryview:
    if not view.contiguous:
        raise TypeError(f"{not_contiguous} (make a contiguous copy first)")
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
        self._entries = Entries(store, self.directory, config)
        self._temps = TempFiles(store, self._entries.tmp_dir, config)
        self._counts = _Counts()
        self._values = ValueReads(self._entries)
        record = config.record_access_times
        self._access = AccessTimes(
            self._entries, config.capacity_bytes is not None if record is None else record
        )
        self._evictor = Evictor(self._entries)
        self._renewer = LocationRenewer(
            self._entries.locations, store.kv_stat_many, config.max_batch_keys,
            config.location_cache_ms,
        )  # fmt: skip
        self._single_gets: Coalescer[tuple[Key, memoryview | None], Value | None] = Coalescer(
            self._run_single_gets, config.max_batch_keys, config.coalesce_inflight
        )
        self._single_exists: Coalescer[Key, bool] = Coalescer(
            self._run_single_exists, config.max_batch_keys, config.coalesce_inflight
        )
        self._primes: Coalescer[Key, bool | None] = Coalescer(
            self._run_primes, config.max_batch_keys, config.coalesce_inflight
        )
        self._closed = False
        # Sync gets of cached locations from the caller's thread (KVCache.get); None: off.
        self._sync_gets: SyncGets | None = None

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
        # Create-once: the first opener's naming wins; everyone reads it back.
        await store.kv_xattr_create(d, LAYOUT_XATTR, layout_doc(config))
        apply_layout(config, await store.kv_xattr_get(d, LAYOUT_XATTR), d)
        cache = cls(store, d, config)
        await store.kv_makedirs([cache._entries.tmp_dir, *cache._entries.shard_dirs])
        cache._access.start()
        if cache._entries.locations.enabled:
            cache._renewer.start()
            if config.sync_connections_per_node:
                reader = store.kv_sync_reader(
                    config.sync_connections_per_node, config.sync_timeout_ms
                )
                if reader is not None:
                    cache._sync_gets = SyncGets(cache._entries, cache._access, reader)
        if config.background_gc and (config.ttl_s is not None or config.capacity_bytes is not None):
            cache._evictor.start()
        return cache

    def _key(self, key: KeyLike) -> Key:
        return Key.of(key, self.config.max_key_bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed KV cache")

    @property
    def closed(self) -> bool:
        return self._closed

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
        got = await self._single_gets.call((self._key(key), as_out_view(buffer)))
        return -1 if got is None else len(got)

    async def batch_get(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """Values in key order, None for a missing key."""
        self._check_open()
        out: list[bytes | None] = []
        for r in await self._get_batches([self._key(k) for k in keys], [None] * len(keys)):
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
        outs: list[memoryview | None] = [as_out_view(b) for b in buffers]
        lengths: list[int] = []
        first_error: ChainfsError | None = None
        for r in await self._get_batches([self._key(k) for k in keys], outs):
            if isinstance(r, ChainfsError):
                first_error = first_error or r
            lengths.append(-1 if r is None or isinstance(r, ChainfsError) else len(r))
        if first_error is not None:
            raise first_error
        return lengths

    async def _get_batches(
        self, keys: list[Key], outs: list[memoryview | None]
    ) -> list[Value | ChainfsError | None]:
        step = self.config.max_batch_keys
        out: list[Value | ChainfsError | None] = []
        for lo in range(0, len(keys), step):
            out.extend(await self._get_many(keys[lo : lo + step], outs[lo : lo + step]))
        return out

    async def _run_single_gets(
        self, items: list[tuple[Key, memoryview | None]]
    ) -> list[Value | ChainfsError | None]:
        return await self._get_many([k for k, _ in items], [o for _, o in items])

    async def _prime(self, key: Key) -> bool | None:
        """For a sync get of a key with no cached location (``Entries.prime``):
        True, its location is cached now, for the calling thread to read; False,
        a miss (counted); None, take the loop path."""
        self._check_open()
        got = await self._primes.call(key)
        if got is False:
            self._counts.misses += 1
        return got

    async def _run_primes(self, keys: list[Key]) -> list[bool | ChainfsError | None]:
        return [*await self._entries.prime(keys)]

    async def _run_single_exists(self, keys: list[Key]) -> list[bool | ChainfsError]:
        return [loc is not None for loc in await self._entries.locate(keys, use_cached=True)]

    async def _get_many(
        self, keys: list[Key], outs: list[memoryview | None]
    ) -> list[Value | ChainfsError | None]:
        """Per key: its value (a view of ``outs[i]`` when given, else new bytes), None
        on a miss, or ERANGE when the value does not fit ``outs[i]``.

        One metadata batch looks up the keys without a young cached location;
        one storage batch reads every hit.
        """
        result: list[Value | ChainfsError | None] = [None] * len(keys)
        read = functools.partial(self._values.read, keys, outs, result)
        found, retried = await self._entries.find(keys, read, use_cached=True)
        self._counts.read_retries += retried
        if self._access.enabled:
            now_ns = time.time_ns()
            stale = [
                key
                for key, loc in zip(keys, found, strict=True)
                if loc is not None
                and self._access.note(self._entries.path(key, loc.probe), loc.info, now_ns)
            ]
            if stale:  # their cached access times are old now: look them up anew later
                self._entries.locations.drop_keys(stale)
        self._counts.hits += sum(1 for r in result if isinstance(r, Value))
        self._counts.misses += result.count(None)
        return result

    async def exists(self, key: KeyLike) -> bool:
        self._check_open()
        return await self._single_exists.call(self._key(key))

    async def batch_exists(self, keys: Sequence[KeyLike]) -> BatchExists:
        """Whether each key is present (``.leading_hits``: the length of the leading run)."""
        self._check_open()
        ks = [self._key(k) for k in keys]
        out = BatchExists()
        step = self.config.max_batch_keys
        for lo in range(0, len(ks), step):
            found = await self._entries.locate(ks[lo : lo + step], use_cached=True)
            out.extend(loc is not None for loc in found)
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
            async with self._entries.writes:
                return await self._put_one(k, v, overwrite)

        try:
            results = await asyncio.gather(
                *(one(k, v) for k, v in zip(ks, vs, strict=True)), return_exceptions=True
            )
        finally:
            self._entries.locations.drop_keys(ks)  # this handle's gets see its puts at once
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [bool(r) for r in results]

    async def _put_one(self, key: Key, value: memoryview, overwrite: bool) -> bool:
        head = encode_header(key.raw, key.is_str, len(value), crc32c(value))
        parts = [memoryview(head), value]
        length = len(head) + len(value)
        for fresh in (False, True):
            f = await self._temp_file(fresh)
            stored = False
            try:
                await self._store.kv_write_new(f, parts)
                stored = await self._place(key, f, length, overwrite)
            except ChainfsError as e:
                # ENOENT at publish: the temp file (or tmp/) was removed under us (a
                # cleaner took it for a dead writer's): once more with a new file.
                if fresh or e.code != Code.ENOENT or not f.closed:
                    raise
                self._temps.drop_prepared()
                continue
            finally:
                if not stored:  # nothing half-visible: the name was never in data/
                    await self._temps.remove(f, wrote=True)
            break
        if stored:
            self._counts.puts += 1
            self._evictor.note_put(key.shard(self.config.shards), length)
        else:
            self._counts.put_existing += 1
        return stored

    async def _temp_file(self, fresh: bool) -> NewFile:
        """A temp file for one put (``fresh``: created now, none of the prepared ones)."""
        try:
            return await (self._temps.create() if fresh else self._temps.take())
        except ChainfsError as e:
            if e.code != Code.ENOENT:
                raise
        # tmp/ is gone (the cache directory was removed): recreate once.
        self._temps.drop_prepared()
        await self._store.kv_makedirs([self._entries.tmp_dir, *self._entries.shard_dirs])
        return await self._temps.create()

    async def _place(self, key: Key, f: NewFile, length: int, overwrite: bool) -> bool:
        """Publish ``f`` (``length`` bytes) as ``key``'s entry: at its first free
        probe name, or at the name its own entry holds (replaced when overwrite
        or expired). False: present. The first try closes and renames in one
        commit; once ``f`` is closed, renames follow."""
        probe = 0
        # Bounded: a name is looked at again only when it was freed under us.
        for _ in range(4 * self.config.max_probes):
            if probe >= self.config.max_probes:
                break
            dst = self._entries.path(key, probe)
            try:
                if not f.closed:
                    await self._store.kv_publish(f, length, dst, replace=False)
                else:
                    await self._store.kv_rename(f.path, dst, replace=False)
                return True
            except ChainfsError as e:
                if e.code != Code.EEXIST or not f.closed:
                    raise
            # The name is taken: by this key (present or expired) or by another key.
            holder = await self._entries.holder(key, probe)
            if holder is Holder.OTHER:
                probe += 1
            elif holder is Holder.MINE and not overwrite:
                return False
            elif holder is not Holder.ABSENT:  # ABSENT: freed meanwhile, try it again
                await self._store.kv_rename(f.path, dst, replace=True)
                return True
        raise ChainfsError(
            Code.EEXIST,
            f"{self.config.max_probes} entry names of this key are taken by other keys",
            key.display(),
        )

    async def remove(self, key: KeyLike) -> bool:
        """Remove ``key``; False if it was not present."""
        return (await self.batch_remove([key]))[0]

    async def batch_remove(self, keys: Sequence[KeyLike]) -> list[bool]:
        self._check_open()
        ks = [self._key(k) for k in keys]
        out: list[bool] = []
        step = self.config.max_batch_keys
        for lo in range(0, len(ks), step):
            part = ks[lo : lo + step]
            locs = await self._entries.locate(part)
            found = [
                (i, self._entries.path(k, loc.probe))
                for i, (k, loc) in enumerate(zip(part, locs, strict=True))
                if loc is not None
            ]
            removed = await self._entries.remove([p for _, p in found], [True] * len(found))
            done = [False] * len(part)
            for (i, _), ok in zip(found, removed, strict=True):
                done[i] = ok
            out.extend(done)
        return out

    # -- listing and stats ---------------------------------------------------
    async def keys(self, prefix: KeyLike = b"") -> list[str | bytes]:
        """Every present key starting with ``prefix`` (scans the whole cache)."""
        self._check_open()
        want = prefix.encode("utf-8") if isinstance(prefix, str) else bytes(prefix)
        now_ns = time.time_ns()
        out: list[str | bytes] = []
        step = self.config.max_batch_keys
        for shard_dir in self._entries.shard_dirs:
            async for page in self._store.kv_list(shard_dir):
                files = [
                    info
                    for _, info in page
                    if info is not None and not self._entries.expired(info, now_ns)
                ]
                for lo in range(0, len(files), step):
                    found = await self._read_keys(files[lo : lo + step])
                    out.extend(original for raw, original in found if raw.startswith(want))
        return out

    async def _read_keys(self, files: list[EntryInfo]) -> list[tuple[bytes, str | bytes]]:
        """(key bytes, original key) of each whole entry among ``files``."""
        probe_bytes = header_len(self.config.max_key_bytes)
        bufs = [memoryview(bytearray(min(info.size, probe_bytes))) for info in files]
        got = await self._store.kv_read_many(
            [(info, 0, b) for info, b in zip(files, bufs, strict=True)]
        )
        out: list[tuple[bytes, str | bytes]] = []
        for info, b, n in zip(files, bufs, got, strict=True):
            header = decode_header(b[:n])
            if header is None or header.value_len != info.size - header_len(len(header.key)):
                continue  # not an entry, or being removed
            out.append((header.key, header.original_key()))
        return out

    async def stats(self) -> KVStats:
        """Counters of this handle, and entries/bytes of the whole cache (scanned now)."""
        self._check_open()
        sem = asyncio.Semaphore(_STATS_SCAN_PARALLEL)

        async def scan(s: int) -> tuple[int, int]:
            async with sem:
                shard, _ = await self._evictor.scan_shard(s)
                return shard.entries, shard.bytes

        scans = await asyncio.gather(*(scan(s) for s in range(self.config.shards)))
        counts = dataclasses.replace(self._counts)
        counts.lookups = self._entries.looked_up
        if self._sync_gets is not None:
            sync = self._sync_gets.counts()
            counts.sync_served, counts.sync_fallbacks = sync.served, sync.fallbacks
            counts.hits += sync.served
            counts.misses += sync.misses
        counts.renewals = self._renewer.renewed
        return KVStats(
            entries=sum(e for e, _ in scans),
            bytes=sum(b for _, b in scans),
            evictions=self._evictor.evictions,
            expirations=self._evictor.expirations,
            capacity_bytes=self.config.capacity_bytes,
            ttl_s=self.config.ttl_s,
            **dataclasses.asdict(counts),
        )

    # -- eviction ------------------------------------------------------------
    def estimated_bytes(self) -> int | None:
        """Bytes in the cache as of the last scans plus this handle's puts since (None
        until every shard was scanned once)."""
        return self._evictor.estimated_bytes()

    async def gc(self, full: bool = False) -> GcRound:
        """One bounded round of TTL and capacity eviction (what the background task runs).

        ``full``: scan every shard this round (still at most
        gc_max_removals_per_round removals).
        """
        self._check_open()
        return await self._evictor.run(full)

    async def flush_access_times(self) -> None:
        """Record queued access times now (tests and orderly shutdown)."""
        await self._access.flush()

    # -- lifetime ------------------------------------------------------------
    async def close(self) -> None:
        """Stop the background tasks and record pending access times (idempotent)."""
        if not self._closed:
            await self._temps.close()
            await self._evictor.stop()
            await self._renewer.stop()
            await self._access.stop()
            try:
                await self._access.flush()
            except Exception:  # closing goes on; eviction then sees older access times
                log.warning(
                    "kvcache %s: access times not recorded at close", self.directory, exc_info=True
                )
            self._closed = True
            self._values.close()
            if self._sync_gets is not None:
                self._sync_gets.close()

    async def __aenter__(self) -> AsyncKVCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<chainfs.AsyncKVCache {self.directory!r}{' closed' if self._closed else ''}>"


async def open_kvcache(
    io: ChunkIO,
    file_mode: int,
    directory: str,
    ttl: float | None = None,
    capacity_bytes: int | None = None,
    config: KVCacheConfig | None = None,
    **options: Any,
) -> AsyncKVCache:
    """What ``AsyncFileSystem.kvcache`` does: the cache in ``directory`` (created if needed)."""
    c = make_config(ttl, capacity_bytes, config, **options)
    return await AsyncKVCache.open(FsBackend(io, file_mode), normpath(directory), c)
