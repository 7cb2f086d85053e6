"""Bounds of a service's gRPC server (embed `GrpcServerConfig` as `grpc` in its config)."""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.common.config import require_positive


@dataclass
class GrpcServerConfig:
    # RPCs running at once (long polls and streams included); more are refused
    # with RESOURCE_EXHAUSTED. Above mgmtd's max_watch_streams (4096).
    max_concurrent_rpcs: int = 8192
    # HTTP/2 streams one connection may open at once.
    max_concurrent_streams_per_connection: int = 128
    # A connection that has not finished its HTTP/2 handshake by then is closed.
    handshake_timeout_ms: int = 10_000
    # A connection with no RPC for this long gets GOAWAY (clients reconnect).
    max_connection_idle_ms: int = 300_000
    # The server pings an idle-looking connection this often and closes it
    # when the ping is not answered within keepalive_timeout_ms (a vanished peer).
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000

    def validate(self) -> None:
        require_positive(
            self,
            "max_concurrent_rpcs",
            "max_concurrent_streams_per_connection",
            "handshake_timeout_ms",
            "max_connection_idle_ms",
            "keepalive_time_ms",
            "keepalive_timeout_ms",
        )
