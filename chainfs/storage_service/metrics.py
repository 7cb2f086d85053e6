"""What a storage node counts and shows at ``/metrics`` (names in docs/metrics.md).

The data-plane handlers (:mod:`service`) count requests, bytes and CRC
failures here; :func:`node_collector` reads the node's live state (usage,
repair queue, lost chunks, scrubbing, resync) at each scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from chainfs.common import metrics
from chainfs.common.errors import Code
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.resync import Resyncer, SyncReceiver
from chainfs.storage_service.scrubber import Repairer, Scrubber


class NodeState(Protocol):
    """What the collector reads of a StorageNode (typed here: node imports us)."""

    targets: dict[int, LocalTarget]
    sync_receiver: SyncReceiver
    repairer: Repairer | None
    scrubber: Scrubber | None
    resyncer: Resyncer | None


OP_NAMES: dict[int, str] = {
    sp.UPDATE: "update",
    sp.BATCH_READ: "batch_read",
    sp.REMOVE_CHUNKS: "remove_chunks",
    sp.QUERY_LAST_CHUNK: "query_last_chunk",
    sp.LIST_CHUNKS: "list_chunks",
    sp.SYNC_REPORT: "sync_report",
}

READ_BYTES = metrics.counter(
    "chainfs_storage_read_bytes", "Bytes read from a target for clients", ["target"]
)
READ_OPS = metrics.counter("chainfs_storage_read_ops", "Chunk reads served", ["target"])
# source="client": the chain head took it from a client; "chain": forwarded by
# the predecessor. Cluster write throughput is the client-sourced sum.
WRITE_BYTES = metrics.counter(
    "chainfs_storage_write_bytes", "Bytes written to a target", ["target", "source"]
)
WRITE_OPS = metrics.counter(
    "chainfs_storage_write_ops", "Chunk updates applied", ["target", "source"]
)
CRC_FAILURES = metrics.counter(
    "chainfs_storage_crc_failures", "Reads that found a stored chunk's CRC32C wrong", ["target"]
)
REQUESTS = metrics.RequestMetrics("chainfs_storage_request", "Data-plane request")
observe = REQUESTS.observe
# Labelled children, made once: labels() takes a lock and builds a key per call.
_SECONDS: dict[str, Any] = {}
_BY_TARGET: dict[tuple[Any, ...], Any] = {}


def served_at_once(op: str, seconds: float) -> None:
    """Count a request answered without waiting (never in flight across the loop)."""
    child = _SECONDS.get(op)
    if child is None:
        child = _SECONDS[op] = REQUESTS.seconds.labels(op)
    child.observe(seconds)


def failed(op: str, e: Exception) -> None:
    """Count a request answered with the error ``e`` (as ``observe`` does)."""
    REQUESTS.error(op, getattr(e, "code", None) or getattr(e, "errno", None) or Code.INTERNAL)


def _of_target(family: Any, target_id: int, *more: str) -> Any:
    key = (family, target_id, *more)
    child = _BY_TARGET.get(key)
    if child is None:
        child = _BY_TARGET[key] = family.labels(str(target_id), *more)
    return child


def op_name(msg_type: int) -> str:
    return OP_NAMES.get(msg_type, "unknown")


def count_update(req: sp.UpdateReq, rsp: sp.UpdateRsp) -> None:
    if rsp.status.code != Code.OK:
        REQUESTS.error("update", rsp.status.code)
        return
    if req.type != sp.WRITE:
        return
    source = "chain" if req.from_target else "client"
    _of_target(WRITE_OPS, req.target_id, source).inc()
    _of_target(WRITE_BYTES, req.target_id, source).inc(req.length)


def count_reads(req: sp.BatchReadReq, rsp: sp.BatchReadRsp) -> list[int]:
    """Count a batch read's served ios and bytes per target; the indexes of the
    ios that found their chunk's CRC32C wrong (to repair)."""
    # Summed per target first: a labels() lookup and an inc() cost microseconds
    # each, and a batch holds up to a thousand small reads.
    results = rsp.results
    if len(results) == 1:  # a lone read (KV get, random pread): no dict, no zip
        res = results[0]
        code = res.status.code
        if code == Code.OK:
            target_id = req.ios[0].target_id
            _of_target(READ_OPS, target_id).inc()
            _of_target(READ_BYTES, target_id).inc(res.length)
            return []
        if code == Code.CHECKSUM_MISMATCH:
            _of_target(CRC_FAILURES, req.ios[0].target_id).inc()
            return [0]
        return []
    served: dict[int, list[int]] = {}  # target -> [reads, bytes]
    damaged: list[int] = []
    for i, (io, res) in enumerate(zip(req.ios, results, strict=True)):
        code = res.status.code
        if code == Code.OK:
            counts = served.get(io.target_id)
            if counts is None:
                served[io.target_id] = [1, res.length]
            else:
                counts[0] += 1
                counts[1] += res.length
        elif code == Code.CHECKSUM_MISMATCH:
            _of_target(CRC_FAILURES, io.target_id).inc()
            damaged.append(i)
    for target_id, (reads, nbytes) in served.items():
        _of_target(READ_OPS, target_id).inc(reads)
        _of_target(READ_BYTES, target_id).inc(nbytes)
    return damaged


def _per_target(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["target"])


def node_collector(node: NodeState) -> metrics.CollectFn:
    """The node's live state as metric families, read at each scrape."""

    def collect() -> Iterator[Metric]:
        used = _per_target(
            "chainfs_storage_target_used_bytes", "Bytes of chunk data the target holds"
        )
        cap = _per_target("chainfs_storage_target_capacity_bytes", "Size of the target's disk")
        lost = _per_target(
            "chainfs_storage_lost_chunks", "Damaged chunks with no good replica found yet"
        )
        left = _per_target(
            "chainfs_storage_resync_bytes_left", "Bytes still to receive while syncing"
        )
        for tid, t in list(node.targets.items()):
            u, c = t.engine.usage()
            used.add_metric([str(tid)], u)
            cap.add_metric([str(tid)], c)
            if node.repairer is not None:
                lost.add_metric([str(tid)], node.repairer.lost_chunks(tid))
            progress = node.sync_receiver.progress.get(tid)
            left.add_metric([str(tid)], progress.bytes_left if progress else 0)
        yield from (used, cap, lost, left)
        yield from _background(node)

    return collect


def _background(node: NodeState) -> Iterator[Metric]:
    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    if node.repairer is not None:
        r = node.repairer
        yield gauge(
            "chainfs_storage_repair_queue_entries", "Chunks queued for repair", len(r.entries)
        )
        yield counter("chainfs_storage_repaired_chunks", "Chunk replicas repaired", r.repaired)
        yield counter("chainfs_storage_repair_failures", "Failed repair attempts", r.failed)
    if node.scrubber is not None:
        s = node.scrubber
        yield counter(
            "chainfs_storage_scrub_checked_bytes", "Bytes the scrubber verified", s.checked_bytes
        )
        yield counter(
            "chainfs_storage_scrub_corrupt_chunks",
            "Corrupt chunks the scrubber found",
            s.found_corrupt,
        )
    if node.resyncer is not None:
        y = node.resyncer
        yield gauge(
            "chainfs_storage_resyncs_active", "Resyncs this node is feeding now", len(y.tasks)
        )
        yield counter(
            "chainfs_storage_resync_sent_bytes", "Bytes sent to syncing successors", y.bytes_sent
        )
