"""Configuration of a storage node (`chainfs serve storage --config F`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chainfs.common.config import require_non_negative, require_positive
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.metrics import check_port
from chainfs.common.rpc.server_config import GrpcServerConfig
from chainfs.common.tls import TlsConfig
from chainfs.common.units import KiB, MiB
from chainfs.storage_service.failure_config import FailureConfig

MIN_CHUNK_SIZE = 64 * 1024  # bytes: the smallest chunk size a file layout may use
MAX_CHUNK_SIZE = 64 * 1024 * 1024  # bytes: the largest
MIN_CRC_BLOCK = 4096  # bytes: smallest per-block CRC granule
MAX_CRC_BLOCK = 1024 * 1024  # bytes: largest (64 MiB chunks keep 64+ CRCs)


def check_crc_block_bytes(bs: int) -> None:
    if not (MIN_CRC_BLOCK <= bs <= MAX_CRC_BLOCK and bs & (bs - 1) == 0):
        raise ValueError(
            f"crc_block_bytes {bs}: must be a power of 2 in [{MIN_CRC_BLOCK}, {MAX_CRC_BLOCK}]"
        )


def check_journal_write_max_bytes(n: int) -> None:
    if not 0 <= n <= MAX_CHUNK_SIZE // 4:
        raise ValueError(f"journal_write_max_bytes {n}: must be in [0, {MAX_CHUNK_SIZE // 4}]")


# Encoded size bound of one ReadIO in a BatchReadReq (every varint at its widest).
MAX_READ_IO_BYTES = 50


@dataclass
class StorageConfig:
    listen_host: str = "127.0.0.1"
    port: int = 0  # gRPC control port (StorageControl); 0 = ephemeral
    data_port: int = 0  # framed data-plane TCP port; 0 = ephemeral
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 = ephemeral, -1 = off
    # Same-host fast path: the data plane also listens on this unix socket and
    # same-host peers (clients, chain predecessors) use it. A relative path is
    # taken inside the first target directory (one node per directory, so no
    # two nodes collide); "" = TCP only.
    unix_socket: str = "data.sock"
    mgmtd_addresses: list[str] = field(default_factory=list)  # host:port of every mgmtd
    # The cluster secret (chainfs.common.auth.secret; 0600): node keys and the
    # capability key come from it. "" = no authentication (every request served).
    cluster_secret_file: str = ""
    node_id: int = 0  # 0 = assigned by mgmtd at first registration, then persisted per target
    targets: list[str] = field(default_factory=list)  # one directory per storage target
    # fdatasync chunk data and sync the metadata WAL before acknowledging an update.
    # Off by default: replication across 3 nodes is the durability of an acknowledged
    # write (3FS's model); measured cost in bench/storage_bench.py (see the report).
    durable: bool = False
    # Whole-chunk writes whose payload buffer is page-aligned go to disk with
    # O_DIRECT instead of being copied into the page cache. Measured here: 3
    # replicas writing new 4 MiB chunks through the page cache spent ~40% of both
    # cores in that copy (fresh page-cache pages cost ~0.3-0.5 GB/s in this VM),
    # O_DIRECT moved 1.2 GB/s with little CPU. Reads stay buffered.
    direct_writes: bool = True
    # Of those, writes shorter than this many bytes go through the page cache all
    # the same: the copy of a small value costs little, and the value stays there,
    # so the reads that follow a put (KV-cache values of a few KiB, read on each
    # replica) are served on the event loop instead of from the disk in a thread.
    direct_write_min_bytes: int = 64 * 1024
    # Verify the stored CRC32C of the whole chunk on every read, answering
    # CHECKSUM_MISMATCH instead of bad bytes. On: its cost (one CRC pass at ~13 GB/s
    # in C over the chunk, which is read into memory anyway) is small beside the wire.
    verify_reads: bool = True
    # Per-block CRC32C granule of new chunks (bytes, a power of 2 in [4 KiB, 1 MiB]):
    # a verified partial read checks only the blocks it touches. Each chunk keeps
    # the size it was created with (recorded in its metadata), so changing this
    # affects new chunks only. 64 KiB: a 256 KiB read loads at most 384 KiB, and a
    # 4 MiB chunk's metadata carries 256 bytes of CRCs.
    crc_block_bytes: int = 64 * 1024
    # Overwrites inside a chunk's committed bytes of at most this many bytes are
    # journaled (the bytes go into the metadata store with the pending record and
    # are written in place into the chunk file at commit) instead of copying the
    # whole chunk to a new file. Larger partial overwrites still copy: journaling
    # them would push chunk-sized values through RocksDB's WAL and memtable.
    # 0 = always copy.
    journal_write_max_bytes: int = 512 * 1024
    # Per node (all its targets share them): chunk files kept open for reads (LRU).
    # A read of a file not kept costs an open and a close. -1 = a quarter of the
    # soft RLIMIT_NOFILE at start, within [256, 65536] (5,000 at 20,000); 0 = open
    # per read. `chainfs bench`'s KV-cache phase alone touches up to ~2,100 per node.
    open_chunk_files: int = -1
    # Per target: chunk records cached in memory before RocksDB (LRU, ~0.5 KiB each).
    chunk_meta_cache_entries: int = 8192
    # Reads whose span is at most this many bytes are served on the event loop
    # from the page cache (RWF_NOWAIT), skipping the I/O-thread hop; a read that
    # would need the disk still goes to a thread. 0 = every read in a thread.
    inline_read_bytes: int = 64 * 1024
    # Updates of at most this many bytes are applied and committed on the event
    # loop (a small buffered write and a record put), skipping two I/O-thread
    # round trips per replica; larger ones, and every update of a durable
    # target (fdatasync), go to a thread. 0 = every update in a thread.
    inline_update_bytes: int = 64 * 1024
    # Refuse new chunks (ENOSPC) when the target's file system is fuller than this.
    disk_usage_limit_ratio: float = 0.95
    # Targets added at runtime (`chainfs admin create-targets`) are listed in this
    # JSON file and opened at every start after the configured `targets`. A
    # relative path is taken inside the first target directory, like unix_socket.
    extra_targets_file: str = "extra_targets.json"
    max_new_targets: int = 64  # targets one create-targets request may add
    heartbeat_interval_ms: int = 1000  # mgmtd may override with its own interval
    io_threads: int = 4  # threads doing blocking file and RocksDB I/O
    # Bounds.
    request_cache_entries: int = 65536  # per target: recent (client id, request id) answers kept
    max_batch_read_ios: int = 4096  # ios in one batched read frame
    # Memory bound (target: a node under load <= 300 MiB RSS): ~80 MiB of process
    # baseline + received payloads (dataplane.buffer_pool_bytes, 128 MiB) + these.
    max_read_bytes_in_flight: int = 96 * 1024 * 1024  # bytes of read buffers held at once
    read_buffer_cache_bytes: int = 32 * 1024 * 1024  # of those, kept mapped for reuse
    max_remove_chunks: int = 4096  # chunks one remove request drops; the client loops on `more`
    max_list_chunks: int = 65536  # chunk metas one list/dump reply carries
    # Capability checks remembered (a client's next request with the same one
    # skips the HMAC); ~0.3 KiB each.
    capability_cache_entries: int = 4096
    forward_timeout_ms: int = 10_000  # one forward to the successor
    forward_retries: int = 3  # attempts to forward before answering UNAVAILABLE
    forward_retry_backoff_ms: int = 100  # doubled per attempt
    mgmtd_timeout_ms: int = 5_000
    # mgmtd's user directory (admin tokens on StorageControl) is fetched this
    # often; an unknown token fetches at once, at most once per the second bound.
    user_refresh_interval_ms: int = 5_000
    user_miss_refresh_min_ms: int = 200
    log_level: str = "INFO"
    # TLS of this node's TCP connections, gRPC and data plane (chainfs.common.tls);
    # empty ca_file = plain TCP.
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Framed data plane; received payloads (writes, forwards) held at once <= 128 MiB.
    dataplane: DataPlaneConfig = field(
        default_factory=lambda: DataPlaneConfig(
            buffer_pool_bytes=128 * MiB,
            buffer_pool_cached_bytes=64 * MiB,
            # The largest request header: a BatchReadReq of max_batch_read_ios
            # (4096) ios of at most MAX_READ_IO_BYTES each (200 KiB).
            max_request_header_bytes=512 * KiB,
        )
    )
    grpc: GrpcServerConfig = field(default_factory=GrpcServerConfig)  # control-plane bounds
    failure: FailureConfig = field(default_factory=FailureConfig)  # fencing, resync, scrubbing

    def validate(self) -> None:
        self.tls.validate()
        check_port("metrics_port", self.metrics_port)
        if not 0.0 < self.disk_usage_limit_ratio <= 1.0:
            raise ValueError("disk_usage_limit_ratio must be in (0, 1]")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets lists a directory twice")
        if not self.extra_targets_file:
            raise ValueError("extra_targets_file must name a file")
        require_positive(
            self,
            "io_threads",
            "request_cache_entries",
            "max_batch_read_ios",
            "max_read_bytes_in_flight",
            "max_remove_chunks",
            "max_list_chunks",
            "capability_cache_entries",
            "forward_timeout_ms",
            "forward_retries",
            "heartbeat_interval_ms",
            "mgmtd_timeout_ms",
            "max_new_targets",
        )
        if self.max_batch_read_ios * MAX_READ_IO_BYTES > self.dataplane.max_request_header_bytes:
            raise ValueError("dataplane.max_request_header_bytes must hold max_batch_read_ios ios")
        if self.max_read_bytes_in_flight < MAX_CHUNK_SIZE:
            raise ValueError("max_read_bytes_in_flight must hold at least one 64 MiB chunk")
        check_crc_block_bytes(self.crc_block_bytes)
        check_journal_write_max_bytes(self.journal_write_max_bytes)
        if self.open_chunk_files < -1:
            raise ValueError("open_chunk_files must be -1 (auto) or >= 0")
        require_non_negative(
            self,
            "direct_write_min_bytes",
            "chunk_meta_cache_entries",
            "inline_read_bytes",
            "inline_update_bytes",
        )
        if not 0 <= self.read_buffer_cache_bytes <= self.max_read_bytes_in_flight:
            raise ValueError("read_buffer_cache_bytes must be in [0, max_read_bytes_in_flight]")

    def engine_options(self) -> EngineOptions:
        """What each target's chunk engine takes from this node's configuration."""
        return EngineOptions(
            durable=self.durable,
            disk_usage_limit_ratio=self.disk_usage_limit_ratio,
            direct_writes=self.direct_writes,
            direct_write_min_bytes=self.direct_write_min_bytes,
            crc_block_bytes=self.crc_block_bytes,
            open_files=self.open_chunk_files,
            meta_cache_entries=self.chunk_meta_cache_entries,
            journal_write_max_bytes=self.journal_write_max_bytes,
        )


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """A chunk engine's settings; the defaults are StorageConfig's (see there)."""

    durable: bool = StorageConfig.durable
    disk_usage_limit_ratio: float = StorageConfig.disk_usage_limit_ratio
    direct_writes: bool = StorageConfig.direct_writes
    direct_write_min_bytes: int = StorageConfig.direct_write_min_bytes
    crc_block_bytes: int = StorageConfig.crc_block_bytes
    open_files: int = StorageConfig.open_chunk_files
    meta_cache_entries: int = StorageConfig.chunk_meta_cache_entries
    journal_write_max_bytes: int = StorageConfig.journal_write_max_bytes

    def __post_init__(self) -> None:
        check_crc_block_bytes(self.crc_block_bytes)
        check_journal_write_max_bytes(self.journal_write_max_bytes)
        if self.direct_write_min_bytes < 0:
            raise ValueError("direct_write_min_bytes must be >= 0")
        if self.open_files < -1 or self.meta_cache_entries < 0:
            raise ValueError("open_files must be >= -1 (auto), meta_cache_entries >= 0")
