"""Storage service: chunk engine, CRAQ chain replication, the storage node.

- ``server``: the node process: start/stop, opening targets, mgmtd
  registration and heartbeats, runtime target creation.
- ``service``: the request handlers: the data plane (framed TCP + unix
  socket; a dispatch table by msg_type) for reads, updates and chain
  forwarding, and the StorageControl gRPC servicer for operators and resync.
- ``config``: StorageConfig (every default, documented) and EngineOptions.
- ``chunk_engine``: one target directory's update/commit/read logic:
  copy-on-write versions (committed + at most one pending), crash recovery;
  built on ``chunk_record`` (the record and its key), ``record_store``
  (RocksDB behind an LRU), ``chunk_files`` (content files, O_DIRECT, cached
  descriptors) and ``block_crcs`` (per-block CRC32C arithmetic).
- ``craq``: the replication rules (head/middle/tail, commits on the ack,
  NOT_COMMITTED reads, stale chain versions, retried requests applied once);
  which target serves what comes from its public state in routing.
- ``resync``, ``chunk_copy``, ``scrubber``, ``fencing``: failure handling
  (filling a returning target, copying one chunk, repairing corrupt replicas,
  refusing service without mgmtd).
- ``crc``: CRC32C combine/extend-by-zeros, so appends extend a chunk's
  checksum without a second pass over the payload.

Defaults and why (figures from bench/storage_bench.py):
- ``durable = false``: an acknowledged write is on 3 replicas; fdatasync per
  update would add its cost to every hop of the chain.
- ``verify_reads = true``: one CRC32C pass in C over a chunk that is read
  into memory anyway.
- ``direct_writes = true``: whole-chunk writes skip the page-cache copy
  (but not those under ``direct_write_min_bytes``: small values stay cached for reads).
"""
