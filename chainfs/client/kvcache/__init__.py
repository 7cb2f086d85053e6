"""KV cache for LLM inference: immutable values by key, stored as chainfs files.

    cache = fs.kvcache("/kv/llama", ttl=3600, capacity_bytes=64 << 30)
    cache.put(block_hash, kv_bytes)
    n = cache.get_into(block_hash, pinned_buffer)   # -1: miss
    hits = cache.batch_exists(block_hashes).leading_hits

Layout under the cache directory: ``data/<shard>/<name>`` holds one entry
(see the format module), ``tmp/`` holds values being written.

Semantics, across processes and clients:
- Visibility: a put writes the whole value to a file in ``tmp/`` (storage
  acknowledges every byte on every replica), then one metadata transaction
  closes the file with its exact length and renames it into place. A reader
  sees no entry or the complete one, never a part. The temp files are created
  ahead (``put_prepared_files`` per handle, their write sessions open), so a
  put costs its storage write and that one commit.
- Immutability: a put on a key that is present keeps the present value and
  returns False (first writer wins; both writers wrote the same bytes in the
  usual content-addressed use). ``put(..., overwrite=True)`` replaces it
  atomically instead. A value never changes in place.
- Reads verify: the header names the key and carries the value's length and
  CRC32C, checked after every read. A value removed (evicted, expired,
  replaced) while it is being read fails the check; the read then looks the
  key up again and returns the current value or a miss, never a partial,
  mixed or zeroed one.
- Location cache: a handle remembers where the entries its gets found are
  (``location_cache_entries``) and trusts that for ``location_cache_ms`` (1 s)
  from the metadata lookup, renewing what it keeps reading in background
  batches; a repeated get is then one storage read. Its own puts and removes
  are seen at once; another client's remove or overwrite within
  ``location_cache_ms`` (until then the old value, whole and checked).
- Misses: ``get`` -> None, ``get_into`` -> -1, ``exists`` -> False,
  ``batch_get`` / ``batch_get_into`` -> None / -1 at that position.
- Keys: str (UTF-8; "k" and b"k" are the same key) or bytes, 1 byte to
  ``max_key_bytes`` (ENAMETOOLONG beyond). Values: any contiguous buffer of 0
  bytes to ``max_value_bytes`` (at most 64 MiB; EFBIG beyond, nothing stored).
  Values and get_into buffers may be numpy arrays, CPU torch tensors (their
  bytes, any dtype, read and written in place) and ``chainfs.usrbio`` shared
  buffers, without a copy; a non-contiguous one is a TypeError (pass a
  contiguous copy) and so is a tensor off the CPU.
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

Modules: ``config`` (settings), ``format`` (an entry's bytes and name),
``backend`` (the file-system operations, over an AsyncFileSystem),
``entries`` (naming, lookup, chain-keeping removal), ``locations`` (the
location cache: repeated gets skip meta), ``coalesce`` (batching of lone
calls), ``cache`` (AsyncKVCache), ``puts`` (temp files made ahead),
``eviction`` (TTL, watermarks, access times), ``sync`` (KVCache).
"""

from chainfs.client.kvcache.backend import EntryInfo, FsBackend, KVCacheBackend
from chainfs.client.kvcache.cache import AsyncKVCache, BatchExists, KVStats, open_kvcache
from chainfs.client.kvcache.config import MAX_VALUE_BYTES, KVCacheConfig, make_config
from chainfs.client.kvcache.eviction import GcRound
from chainfs.client.kvcache.sync import KVCache

__all__ = [
    "MAX_VALUE_BYTES",
    "AsyncKVCache",
    "BatchExists",
    "EntryInfo",
    "FsBackend",
    "GcRound",
    "KVCache",
    "KVCacheBackend",
    "KVCacheConfig",
    "KVStats",
    "make_config",
    "open_kvcache",
]
