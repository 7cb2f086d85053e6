"""Storage service: chunk engine, CRAQ chain replication, the storage node.

- ``chunk_engine``: one target directory; chunk files + RocksDB metadata,
  copy-on-write versions (committed + at most one pending), crash recovery.
- ``craq``: the replication rules (head/middle/tail, commits on the ack,
  NOT_COMMITTED reads, stale chain versions, retried requests applied once);
  which target serves what comes from its public state in routing.
- ``server``: the node: data plane (framed TCP + unix socket) for reads,
  updates and chain forwarding; StorageControl gRPC for operators; mgmtd
  registration and heartbeats.
- ``crc``: CRC32C combine/extend-by-zeros, so appends extend a chunk's
  checksum without a second pass over the payload.

Defaults and why (figures from bench/storage_bench.py):
- ``durable = false``: an acknowledged write is on 3 replicas; fdatasync per
  update would add its cost to every hop of the chain.
- ``verify_reads = true``: one CRC32C pass in C over a chunk that is read
  into memory anyway.
- ``direct_writes = true``: whole-chunk writes skip the page-cache copy.
"""
