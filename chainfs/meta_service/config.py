"""Configuration of a metadata server (`chainfs serve meta --config F`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from chainfs.common.dataplane.address import MAX_UNIX_PATH_BYTES
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.metrics import check_port
from chainfs.common.rpc.retry import RetryPolicy
from chainfs.common.rpc.server_config import GrpcServerConfig
from chainfs.common.tls import TlsConfig
from chainfs.common.units import KiB, MiB

MIN_CHUNK_SIZE = 64 * KiB  # bytes: the smallest chunk size a layout may use
MAX_CHUNK_SIZE = 64 * MiB  # bytes: the largest
NAME_MAX = 255  # bytes in one name (POSIX NAME_MAX)
PATH_MAX = 4096  # bytes in a path or symlink target, NUL included (POSIX PATH_MAX)
# Inodes are not a fixed pool (ids come from a 64-bit allocator): statfs reports
# this total so `df -i` shows the inodes in use against a large, constant size.
INODES_TOTAL = 1 << 32

# A capability lives at least a minute (clients renew a little before the end)
# and at most a day (a leaked one stops working by then).
MIN_CAPABILITY_TTL_MS = 60_000
MAX_CAPABILITY_TTL_MS = 24 * 3600_000


@dataclass
class MetaConfig:
    listen_host: str = "127.0.0.1"
    port: int = 0  # gRPC port; 0 = ephemeral
    # The same API over the framed data plane (~8x less CPU per call than gRPC
    # in Python); advertised to clients as the node's data_address.
    frame_enabled: bool = True
    frame_port: int = 0  # 0 = ephemeral
    # Also serve the framed API on this unix socket (absolute path, 0600; "" =
    # none). Clients on the same host use it instead of loopback TCP, whose
    # kernel work per call costs about as much CPU as meta's own work on a stat.
    unix_socket: str = ""
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 = ephemeral, -1 = off
    # The open-sessions gauge: sessions in the store are counted this often,
    # up to this many (the count stops there; one counting pass reads them all).
    session_count_interval_ms: int = 10_000
    session_count_limit: int = 100_000
    # The metadata store every meta server of the cluster shares (chainfs.kv URL).
    kv_url: str = "memory://"
    # host:port of every mgmtd. Empty = standalone: no routing, no storage; file
    # layouts draw from `static_chains` and operations that need storage
    # (shrinking truncate, exact length, GC of chunks) fail with ENOSYS.
    mgmtd_addresses: list[str] = field(default_factory=list)
    static_chains: list[int] = field(default_factory=list)  # standalone only
    mgmtd_timeout_ms: int = 5_000  # one mgmtd call, failover included
    # Pauses between rounds over the mgmtd addresses, and their number, within that time.
    mgmtd_retry: RetryPolicy = field(default_factory=RetryPolicy)
    heartbeat_interval_ms: int = 0  # 0 = the interval mgmtd answers at registration
    storage_timeout_ms: int = 10_000  # one storage call made by meta (length query, removal)
    # Lifetime of a capability meta signs (clients renew before it ends). Expiries
    # are rounded up to 1/16 of it, so one lives up to 1/16 longer (caps.REUSE_STEPS).
    capability_ttl_ms: int = 10 * 60_000

    # Formatting a new store (later starts read these from the store).
    root_mode: int = 0o755  # permission bits of the root directory
    default_chunk_size_bytes: int = 4 * MiB  # the root's layout; directories inherit it
    default_stripe: int = 16  # chains a new file spreads over (capped by the chains there are)
    alloc_shards: int = 16  # inode-id counters: servers reserving at once rarely collide
    alloc_batch: int = 1024  # ids one reservation takes: one KV transaction per this many creates

    # Limits (bad input is refused with an errno, nothing changed).
    max_path_depth: int = 512  # components in one request path (ENAMETOOLONG beyond)
    max_symlink_follows: int = 40  # symlinks followed in one resolution (ELOOP beyond; Linux: 40)
    max_links: int = 65_000  # hard links of one file (EMLINK beyond; ext4's limit)
    max_stripe: int = 256  # chains one file may spread over
    max_file_size_bytes: int = 1 << 62  # EFBIG beyond
    max_xattr_name_bytes: int = 255  # ERANGE beyond (Linux XATTR_NAME_MAX)
    max_xattr_value_bytes: int = 64 * KiB  # E2BIG beyond (Linux XATTR_SIZE_MAX)
    max_xattrs_per_inode: int = 256  # ENOSPC beyond
    readdir_page_entries: int = 1024  # entries per readdir page when the client asks for 0
    readdir_max_page_entries: int = 8192  # a larger request is cut to this
    max_batch_stat: int = 4096  # inodes in one batch stat (E2BIG beyond)
    max_session_ends_per_call: int = 1024  # sessions in one EndSessions call (E2BIG beyond)

    # Write sessions: a client keeps its sessions alive (KeepAlive) at a third
    # of this; sessions of a client silent for longer are closed by meta.
    session_timeout_ms: int = 60_000
    session_prune_interval_ms: int = 5_000  # how often vanished clients are looked for
    session_prune_batch: int = 256  # sessions closed per round (bounded work)
    # Advisory locks (flock, fcntl): held by a client's lease like its sessions.
    max_lock_owners_per_inode: int = 1024  # lock holders of one file (ENOLCK beyond)
    max_lock_ranges_per_owner: int = 256  # disjoint ranges one holder keeps (ENOLCK beyond)

    # Removed files: chunks are dropped from storage by a background task.
    # A removed file's chunks stay this long after its last session ends (open
    # files hold sessions, so readers of an open fd need no delay).
    gc_delay_ms: int = 0
    gc_interval_ms: int = 1_000  # pause between GC rounds when the queue is empty
    gc_batch: int = 64  # files per GC round
    gc_concurrency: int = 8  # files removed from storage at once
    gc_retry_delay_ms: int = 5_000  # a file whose removal failed is retried after this
    gc_status_scan_limit: int = 10_000  # queue entries one `admin gc-status` reads at most
    # Trash: 0 = off (POSIX: unlink frees at once). Above 0, a regular file's
    # last name moves to /.trash/<uid>/ and is purged after this long.
    trash_retention_ms: int = 0
    trash_purge_interval_ms: int = 1_000  # pause between purge rounds when none is due
    trash_purge_batch: int = 64  # records purged per transaction
    trash_list_limit: int = 10_000  # records one `admin trash list` (or entry lookup) reads
    # Cluster-wide settings (`chainfs admin config set meta.*`) are fetched from mgmtd this often.
    cluster_config_poll_ms: int = 5_000

    # Idempotency: answers to mutating requests kept for retries.
    # 2 min: 4x the client's retry budget (meta_timeout_ms 30 s); a record is ~0.2 KB,
    # so at 1000 creates/s about 25 MB are kept.
    idempotency_ttl_ms: int = 120_000
    idempotency_clean_interval_ms: int = 10_000
    idempotency_clean_batch: int = 1024  # records expired per round

    grpc: GrpcServerConfig = field(default_factory=GrpcServerConfig)  # control-plane bounds
    log_level: str = "INFO"
    # TLS of this node's TCP connections, gRPC and data plane (chainfs.common.tls);
    # empty ca_file = plain TCP.
    tls: TlsConfig = field(default_factory=TlsConfig)
    # The cluster secret (0600 file, the same on every server): with it every
    # call needs a user's token (uid/gid come from the token, never from the
    # request) and meta presents its node key to mgmtd; "" = NO authentication
    # (callers' uid/gid claims are believed: tests and throw-away clusters).
    # Meta also signs data-plane capabilities with a key derived from it.
    cluster_secret_file: str = ""
    # The token directory (from mgmtd) is fetched this often, so a removed
    # user or rotated token stops working within it; an unknown token fetches
    # at once, at most once per user_miss_refresh_min_ms.
    user_refresh_interval_ms: int = 5_000
    user_miss_refresh_min_ms: int = 200
    # Framed transport bounds: requests and answers are header-only messages
    # (a readdir page with attributes is the largest, well under 16 MiB).
    dataplane: DataPlaneConfig = field(
        default_factory=lambda: DataPlaneConfig(
            max_payload_bytes=64 * KiB, buffer_pool_bytes=1 * MiB, buffer_pool_cached_bytes=0
        )
    )

    def validate(self) -> None:
        check_port("metrics_port", self.metrics_port)
        if not MIN_CAPABILITY_TTL_MS <= self.capability_ttl_ms <= MAX_CAPABILITY_TTL_MS:
            raise ValueError(
                f"capability_ttl_ms must be in {MIN_CAPABILITY_TTL_MS}..{MAX_CAPABILITY_TTL_MS}"
            )
        if self.session_count_interval_ms <= 0 or self.session_count_limit <= 0:
            raise ValueError("session_count_interval_ms and session_count_limit must be > 0")
        if not 0 <= self.port <= 65535 or not 0 <= self.frame_port <= 65535:
            raise ValueError("port and frame_port must be in 0..65535")
        if self.unix_socket and not os.path.isabs(self.unix_socket):
            raise ValueError(f"unix_socket must be an absolute path, not {self.unix_socket!r}")
        if len(os.fsencode(self.unix_socket)) >= MAX_UNIX_PATH_BYTES:
            raise ValueError(
                f"unix_socket path of {len(os.fsencode(self.unix_socket))} bytes: "
                f"the kernel takes fewer than {MAX_UNIX_PATH_BYTES}"
            )
        self.dataplane.validate()
        self.tls.validate()
        if not MIN_CHUNK_SIZE <= self.default_chunk_size_bytes <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"default_chunk_size_bytes must be in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        if self.default_chunk_size_bytes & (self.default_chunk_size_bytes - 1):
            raise ValueError("default_chunk_size_bytes must be a power of two")
        if not 1 <= self.default_stripe <= self.max_stripe:
            raise ValueError("default_stripe must be in 1..max_stripe")
        if not 0 <= self.root_mode <= 0o7777:
            raise ValueError("root_mode must be permission bits (<= 0o7777)")
        if self.cluster_secret_file and not self.mgmtd_addresses:
            raise ValueError("cluster_secret_file needs mgmtd_addresses (users live in mgmtd)")
        if self.mgmtd_addresses and self.static_chains:
            raise ValueError("static_chains is for standalone mode (no mgmtd_addresses)")
        positive = (
            "mgmtd_timeout_ms",
            "storage_timeout_ms",
            "alloc_shards",
            "alloc_batch",
            "max_path_depth",
            "max_links",
            "max_stripe",
            "max_xattr_name_bytes",
            "max_xattr_value_bytes",
            "max_xattrs_per_inode",
            "readdir_page_entries",
            "readdir_max_page_entries",
            "max_batch_stat",
            "max_session_ends_per_call",
            "session_timeout_ms",
            "session_prune_interval_ms",
            "session_prune_batch",
            "max_lock_owners_per_inode",
            "max_lock_ranges_per_owner",
            "gc_interval_ms",
            "gc_batch",
            "gc_concurrency",
            "gc_retry_delay_ms",
            "cluster_config_poll_ms",
            "gc_status_scan_limit",
            "trash_purge_interval_ms",
            "trash_purge_batch",
            "trash_list_limit",
            "idempotency_ttl_ms",
            "idempotency_clean_interval_ms",
            "idempotency_clean_batch",
            "user_refresh_interval_ms",
            "user_miss_refresh_min_ms",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in (
            "max_symlink_follows",
            "gc_delay_ms",
            "heartbeat_interval_ms",
            "trash_retention_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.readdir_page_entries > self.readdir_max_page_entries:
            raise ValueError("readdir_page_entries must be <= readdir_max_page_entries")
        if self.alloc_shards > 65535:
            raise ValueError("alloc_shards must be <= 65535")
