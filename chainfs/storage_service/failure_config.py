"""Configuration of a storage node's failure handling: fencing, resync, scrubbing."""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.common.config import require_positive


@dataclass
class FailureConfig:
    # Stop serving reads and writes (answer FENCED) once the last acknowledged
    # heartbeat is older than this fraction of mgmtd's heartbeat timeout: mgmtd
    # declares the node offline only after the whole timeout, so a partitioned
    # node has stopped before the rest of the chain moves on without it.
    fence_after_timeout_ratio: float = 0.5
    # Resync: bytes per second one node sends to fill returning targets (all syncs
    # together), so a resync does not starve foreground I/O. 0 = unlimited.
    resync_rate_bytes_per_s: int = 256 * 1024 * 1024
    resync_scan_interval_ms: int = 200  # how often the node looks for targets to fill
    resync_report_interval_ms: int = 500  # progress reports to the syncing target
    resync_retry_ms: int = 500  # pause before a failed sync pass starts again
    # Chunk metadata entries one sync pass holds per side (source and target): the
    # lists are merge-compared a page at a time, so memory stays bounded whatever
    # the target holds (~100 bytes an entry; a DumpChunkMeta reply is one page).
    resync_batch_chunks: int = 4096
    resync_parallel_chunks: int = 8  # chunks one sync pass sends at once (each under its lock)
    # Read buffers the chunks being sent are read into (all syncs of a node), kept
    # mapped while syncs run: no fault-in of a fresh buffer per chunk. A chunk
    # larger than this is read into a buffer of its own.
    resync_buffer_bytes: int = 64 * 1024 * 1024
    # Scrubber: background CRC32C re-check of committed chunks. 0 = off.
    scrub_rate_bytes_per_s: int = 32 * 1024 * 1024  # read budget of the scrubber
    scrub_round_pause_ms: int = 60_000  # pause between two full passes over a target
    repair_queue_entries: int = 1024  # damaged chunks tracked, lost ones too (more: dropped)
    repair_timeout_ms: int = 10_000  # one read of a good replica
    # A failed repair is retried after repair_retry_min_ms, doubling up to
    # repair_retry_max_ms, at most repair_attempts_max times; then it waits for a
    # good copy to appear (the chunk rewritten, a replica found good, a chain change).
    repair_retry_min_ms: int = 1_000
    repair_retry_max_ms: int = 60_000
    repair_attempts_max: int = 6

    def validate(self) -> None:
        if not 0.0 < self.fence_after_timeout_ratio < 1.0:
            raise ValueError("fence_after_timeout_ratio must be in (0, 1)")
        require_positive(
            self,
            "resync_scan_interval_ms",
            "resync_report_interval_ms",
            "resync_retry_ms",
            "resync_batch_chunks",
            "resync_parallel_chunks",
            "resync_buffer_bytes",
            "repair_queue_entries",
            "repair_timeout_ms",
            "repair_retry_min_ms",
            "repair_attempts_max",
        )
        if self.repair_retry_max_ms < self.repair_retry_min_ms:
            raise ValueError("repair_retry_max_ms must be >= repair_retry_min_ms")
        if self.resync_rate_bytes_per_s < 0 or self.scrub_rate_bytes_per_s < 0:
            raise ValueError("rates must be >= 0")
