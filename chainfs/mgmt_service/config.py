"""mgmtd settings (TOML; every default is here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chainfs.common.auth.tokens import ADMIN_TOKEN_FILE_NAME
from chainfs.common.config import require_positive
from chainfs.common.metrics import check_port
from chainfs.common.rpc.server_config import GrpcServerConfig
from chainfs.common.tls import TlsConfig


@dataclass
class MgmtdConfig:
    listen_host: str = "127.0.0.1"
    port: int = 0  # 0 = ephemeral; the bound port is in the ready file
    # Address other processes use to reach this mgmtd (NOT_PRIMARY answers name
    # it); "" = listen_host:bound port.
    advertise_address: str = ""
    # Where the KV store lives when kv_url is empty: rocksdb://<data_dir>/kv.
    data_dir: str = ""
    # Cluster state store: memory://, rocksdb:///dir, etcd://h:p[,h:p]/prefix.
    # Several mgmtds (failover) need a shared store: etcd.
    kv_url: str = ""
    cluster_id: str = "chainfs"
    # 0 = take a fresh id from the cluster's node-id counter at start.
    node_id: int = 0
    # Nodes heartbeat this often (ms); told to them at registration.
    heartbeat_interval_ms: int = 1000
    # A node silent this long (ms) is offline with its targets. Storage fences
    # itself after half of it, so keep it well above the mgmtd failover time.
    heartbeat_timeout_ms: int = 10_000
    # How often (ms) the primary checks heartbeat deadlines and steps chains.
    check_interval_ms: int = 200
    # Primary lease (ms): a standby takes over once the lease record stayed
    # unchanged this long; failover takes at most lease_ms + 2 * lease_renew_interval_ms
    # plus one KV commit.
    lease_ms: int = 3000
    lease_renew_interval_ms: int = 500
    # A primary stops acting this long (ms) before its lease would run out on
    # its own clock, so two primaries never act at once.
    lease_safety_margin_ms: int = 500
    grpc: GrpcServerConfig = field(default_factory=GrpcServerConfig)  # control-plane bounds
    # The framed transport (the client library's; no gRPC there, so clients
    # survive fork()) listens at the gRPC port + 1: clients derive it from the
    # mgmtd address they are given (chainfs.common.rpc.mgmt_wire).
    frame_enabled: bool = True
    # Bound on concurrent routing watches (WatchRoutingInfo streams plus
    # GetRoutingInfo long polls).
    max_watch_streams: int = 4096
    # Bound on how long one GetRoutingInfo long poll (wait_ms) is held (ms).
    max_routing_wait_ms: int = 30_000
    # Bounds on the config store.
    max_config_key_bytes: int = 256
    max_config_value_bytes: int = 64 * 1024
    # Prometheus /metrics and the read-only status page (HTTP, no login yet);
    # 0 = ephemeral (the bound address is in the ready file), -1 = off.
    metrics_port: int = 0
    status_port: int = 0
    # The status page's throughput charts: every online node's /metrics is
    # scraped this often (each scrape bounded by the timeout), and this many
    # samples are kept (300 x 2 s = the last 10 minutes).
    status_sample_interval_ms: int = 2_000
    status_scrape_timeout_ms: int = 1_000
    status_history_samples: int = 300
    # Rebalancing (admin add-node / drain-node / rebalance): replica moves running
    # at once (each chain moves one replica at a time), how long one move may take
    # to sync before it is rolled back (ms), how long the old target's node may take
    # to drop its chunks (ms), and the most moves one plan may hold.
    rebalance_max_concurrent_moves: int = 4
    rebalance_move_timeout_ms: int = 3_600_000
    rebalance_drop_timeout_ms: int = 600_000
    rebalance_max_moves: int = 100_000
    log_level: str = "INFO"
    # TLS of this node's TCP connections, gRPC and data plane (chainfs.common.tls);
    # empty ca_file = plain TCP.
    tls: TlsConfig = field(default_factory=TlsConfig)
    # The cluster secret (0600 file, the same on every server of the cluster):
    # with it every call needs a user's token or a node's key and the access
    # policy applies; "" = NO authentication (every caller trusted: tests and
    # throw-away clusters only). `chainfs up` creates one.
    cluster_secret_file: str = ""
    # Where the first start writes the token of user "admin" (0600; a token
    # already in the file is adopted); "" = <data_dir>/admin.token.
    admin_token_file: str = ""
    max_users: int = 10_000  # bound on stored users (each directory fetch sends all)
    # A framed connection's token is checked again this often (a store read),
    # so a removed user or rotated token stops working on connections opened
    # before, within this time; tokens re-checked are kept up to the bound.
    user_recheck_interval_ms: int = 5_000
    user_recheck_entries: int = 65_536

    def validate(self) -> None:
        self.tls.validate()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        check_port("metrics_port", self.metrics_port)
        check_port("status_port", self.status_port)
        if self.user_recheck_interval_ms <= 0 or self.user_recheck_entries <= 0:
            raise ValueError("user_recheck_interval_ms and user_recheck_entries must be > 0")
        for name in (
            "status_sample_interval_ms",
            "status_scrape_timeout_ms",
            "status_history_samples",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not self.kv_url and not self.data_dir:
            raise ValueError(
                "set kv_url (memory://, rocksdb:///dir, etcd://h:p/prefix) or data_dir"
            )
        if self.heartbeat_interval_ms <= 0:
            raise ValueError("heartbeat_interval_ms must be > 0")
        if self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError("heartbeat_timeout_ms must be >= 2 * heartbeat_interval_ms")
        if self.check_interval_ms <= 0:
            raise ValueError("check_interval_ms must be > 0")
        if self.lease_renew_interval_ms <= 0 or self.lease_ms < 2 * self.lease_renew_interval_ms:
            raise ValueError("need 0 < lease_renew_interval_ms <= lease_ms / 2")
        if not 0 <= self.lease_safety_margin_ms < self.lease_ms - self.lease_renew_interval_ms:
            raise ValueError(
                "need 0 <= lease_safety_margin_ms < lease_ms - lease_renew_interval_ms"
            )
        if self.max_watch_streams < 1:
            raise ValueError("max_watch_streams must be >= 1")
        self.grpc.validate()
        if self.grpc.max_concurrent_rpcs <= self.max_watch_streams:
            # Watches are RPCs too: at the bound they would lock out every other call.
            raise ValueError("grpc.max_concurrent_rpcs must exceed max_watch_streams")
        if self.max_routing_wait_ms <= 0:
            raise ValueError("max_routing_wait_ms must be > 0")
        if self.frame_enabled and self.port == 65535:
            raise ValueError("port 65535 leaves no room for the framed port (port + 1)")
        require_positive(
            self,
            "rebalance_max_concurrent_moves",
            "rebalance_move_timeout_ms",
            "rebalance_max_moves",
        )
        if self.node_id < 0:
            raise ValueError("node_id must be >= 0")
        if self.max_users < 1:
            raise ValueError("max_users must be >= 1")
        if self.cluster_secret_file and not (self.admin_token_file or self.data_dir):
            raise ValueError("with cluster_secret_file, set admin_token_file or data_dir")

    def admin_token_path(self) -> Path:
        if self.admin_token_file:
            return Path(self.admin_token_file)
        return Path(self.data_dir) / ADMIN_TOKEN_FILE_NAME

    def store_url(self) -> str:
        if self.kv_url:
            return self.kv_url
        return "rocksdb://" + str((Path(self.data_dir) / "kv").resolve())


def redact_url(url: str) -> str:
    """Store URL without credentials (user:password@)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme + "://" + rest.split("@", 1)[1]
    return url
