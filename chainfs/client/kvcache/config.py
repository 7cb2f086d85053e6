"""Settings of one KV-cache handle, and the part of them fixed by the cache's creator."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chainfs.client.kvcache.format import MAX_KEY_FIELD_BYTES
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.units import KiB, MiB

MAX_VALUE_BYTES = 64 * MiB  # the largest value any cache accepts

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Bounds:
    """Allowed values of one setting: ``low`` inclusive (exclusive when
    ``low_open``), ``high`` inclusive; None leaves that side open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in [{self.low}, {self.high}]"


def _bounded(default: V, low: float, high: float | None = None, *, low_open: bool = False) -> V:
    """A dataclass field whose value ``validate`` keeps within bounds (None passes)."""
    bounds = _Bounds(low, high, low_open)
    return field(default=default, metadata={"bounds": bounds})


def _positive(default: V) -> V:
    return _bounded(default, 0, low_open=True)


@dataclass
class KVCacheConfig:
    # Seconds an entry lives after its put; None: no expiry.
    ttl_s: float | None = _positive(None)
    # Bytes of values (and headers) the cache aims to hold; None: unbounded.
    capacity_bytes: int | None = _positive(None)
    # Eviction starts above this fraction of capacity_bytes ...
    high_watermark: float = _bounded(0.95, 0.0, 1.0, low_open=True)
    # ... and stops at this fraction (the gap amortises scans over many puts).
    low_watermark: float = _bounded(0.80, 0.0, 1.0, low_open=True)
    # Longest key in bytes; keys are stored in each entry's header.
    max_key_bytes: int = _bounded(1024, 1, MAX_KEY_FIELD_BYTES)
    # Largest value in bytes (at most 64 MiB).
    max_value_bytes: int = _bounded(MAX_VALUE_BYTES, 0, MAX_VALUE_BYTES)
    # Sub-directories the entries are spread over (bounds directory size, and
    # is the unit of background scanning).
    shards: int = _bounded(256, 1, 65536)
    # Digest bytes in an entry's file name (16 = 128 bits: collisions are
    # astronomically rare; tests use 1 to force them).
    name_hash_bytes: int = _bounded(16, 1, 32)
    # Names tried per key before a put gives up on colliding keys.
    max_probes: int = _bounded(4, 1, 64)
    # Puts in flight at once in batch_put (each holds one value's write buffers).
    max_parallel_puts: int = _positive(16)
    # Temp files this handle creates ahead, write sessions open, so that a put
    # waits only for its storage write and one metadata commit (the close that
    # also renames the file into place). Removed at close. 0: each put creates
    # its own first (one more metadata commit in the put).
    put_prepared_files: int = _bounded(4, 0, 64)
    # Keys per metadata batch / storage batch in batch calls.
    max_batch_keys: int = _positive(1024)
    # get/get_into/exists calls made while this many are in flight wait and go
    # out together as one batch (one metadata call, one storage batch).
    coalesce_inflight: int = _positive(4)
    # Pooled read buffers (in use and idle; a fresh buffer costs a zero-fill
    # that shows at GB/s). Reads beyond it use fresh buffers. 0: no pool.
    scratch_pool_bytes: int = _bounded(64 * MiB, 0)
    # Re-reads of a key whose entry changed (was removed, replaced) under a read.
    max_read_retries: int = _bounded(2, 0)
    # Keys whose entry location (probe, inode, layout, size, mtime) this handle
    # remembers, so a repeated get is one storage read and no metadata call
    # (least recently used dropped first; about 1 KiB each). 0: no location cache.
    location_cache_entries: int = _bounded(16384, 0, 1 << 22)
    # How long a remembered location is trusted, in ms from the lookup that found
    # it. Another client's remove or overwrite of a key is seen by this handle's
    # gets within this time; until then a get may return the value as it was
    # (whole and checked, never a part or a mix). This handle's own puts, removes
    # and evictions are seen at once; TTL expiry is judged at every get. 0: off.
    location_cache_ms: float = _bounded(1000.0, 0, 3_600_000)
    # A sync get (KVCache.get, from any thread) of a key whose location is cached
    # reads the value from the calling thread over a pool of blocking sockets,
    # this many per storage node, instead of hopping onto the client's event-loop
    # thread; anything but a clean answer (or TLS on) takes the loop path, with
    # its retries and failover. 0: every get takes the loop path.
    sync_connections_per_node: int = _bounded(4, 0, 64)
    # Largest value such a get reads from the calling thread (the entry must also
    # sit in one chunk); larger ones take the loop path.
    sync_read_max_bytes: int = _bounded(64 * KiB, 1, MAX_VALUE_BYTES)
    # Bound in ms on each socket operation of such a get (connect, send, reply,
    # counted from its start); past it the connection is dropped and the get
    # takes the loop path. A peer that failed to connect is skipped this long.
    sync_timeout_ms: float = _bounded(2000.0, 1, 600_000)
    # Record entries' access times for LRU eviction (one metadata update per
    # entry per atime_granularity_s). None: when this handle has a capacity.
    # Processes that only read a capacity-bounded cache pass True (or the
    # capacity) so that their reads count.
    record_access_times: bool | None = None
    # An entry's access time is recorded at most once per this many seconds.
    atime_granularity_s: float = _bounded(60.0, 0)
    # Pending access-time updates; beyond that they are dropped (LRU is approximate).
    atime_queue_max: int = _positive(4096)
    # Access-time updates in flight at once (bounds the load they put on meta).
    atime_parallel: int = _positive(2)
    # Run TTL/capacity eviction in a background task of this handle (when a
    # ttl or capacity is set). Turn off in all but one or a few processes
    # sharing a cache to save scanning.
    background_gc: bool = True
    # Seconds between background rounds (eviction, and access-time recording
    # when nothing wakes it sooner).
    gc_interval_s: float = _positive(1.0)
    # Shards scanned per round (bounded work per round).
    gc_shards_per_round: int = _positive(32)
    # Entries removed per round, expired and evicted together.
    gc_max_removals_per_round: int = _positive(512)
    # Oldest entries remembered per shard as eviction candidates.
    gc_candidates_per_shard: int = _positive(256)
    # Files in tmp/ older than this are left-overs of writers that died: removed.
    tmp_max_age_s: float = _positive(600.0)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds is not None and value is not None and not bounds.admits(value):
                raise ValueError(f"{f.name} must be {bounds.describe()}")
        if self.low_watermark > self.high_watermark:
            raise ValueError("need 0 < low_watermark <= high_watermark <= 1")


def make_config(
    ttl: float | None = None,
    capacity_bytes: int | None = None,
    config: KVCacheConfig | None = None,
    **overrides: Any,
) -> KVCacheConfig:
    """The config ``fs.kvcache(directory, ttl, capacity_bytes, config=..., **overrides)`` means."""
    c = dataclasses.replace(config) if config is not None else KVCacheConfig()
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


# -- naming, fixed by whoever creates the cache ----------------------------------

LAYOUT_XATTR = "user.chainfs.kvcache"  # on the cache directory: how its entries are named
LAYOUT_FIELDS = ("shards", "name_hash_bytes", "max_probes")


def layout_doc(config: KVCacheConfig) -> bytes:
    """The naming settings of ``config`` as stored in LAYOUT_XATTR."""
    doc = {"format": 1, **{name: getattr(config, name) for name in LAYOUT_FIELDS}}
    return json.dumps(doc).encode()


def apply_layout(config: KVCacheConfig, raw: bytes | None, where: str) -> None:
    """Take the naming settings stored in LAYOUT_XATTR into ``config``; EINVAL when
    they are missing or not of this version."""
    try:
        if raw is None:
            raise ValueError(f"no {LAYOUT_XATTR} attribute")
        doc = json.loads(raw)
        if doc.get("format") != 1:
            raise ValueError(f"format {doc.get('format')!r}")
        layout = {name: int(doc[name]) for name in LAYOUT_FIELDS}
        KVCacheConfig(**layout).validate()  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as e:
        raise ChainfsError(Code.EINVAL, f"not a KV cache of this version: {e}", where) from None
    for name, value in layout.items():
        setattr(config, name, value)
