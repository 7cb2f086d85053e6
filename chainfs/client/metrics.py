"""What the client library counts (names in docs/metrics.md): its chunk I/O,
by op, with bytes. Kept in the process's registry; the FUSE mount serves it at
/metrics, and a program using the library may serve it with
``chainfs.common.metrics.serve_metrics``."""

from __future__ import annotations

from chainfs.common import metrics

IO = metrics.RequestMetrics("chainfs_client_io", "Client chunk I/O call")
READ_BYTES = metrics.counter("chainfs_client_read_bytes", "Bytes read from storage by this client")
WRITE_BYTES = metrics.counter(
    "chainfs_client_write_bytes", "Bytes written to storage by this client (once per chain)"
)
# Sync KV-cache gets by where they were served: "thread" (the caller's, over
# its blocking sockets) or "loop" (sent on to the event-loop path).
KV_SYNC_GETS = metrics.counter(
    "chainfs_client_kvcache_sync_gets", "Sync KV-cache gets by where they were served", ["path"]
)
# Key names KV-cache handles stat at meta: "lookup" (to find an entry) or
# "renewal" (a cached location checked again in the background).
KV_META_STATS = metrics.counter(
    "chainfs_client_kvcache_meta_stats",
    "Key names KV-cache handles stat'ed at meta, by why",
    ["why"],
)
