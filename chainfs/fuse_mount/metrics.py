"""What the FUSE mount counts (names in docs/metrics.md): every FUSE request by
op, with its latency and errors (the errno answered). Bytes moved are the
client library's counters (:mod:`chainfs.client.metrics`)."""

from __future__ import annotations

from chainfs.common import metrics

REQUESTS = metrics.RequestMetrics("chainfs_fuse_request", "FUSE request")
