"""Settings of the data plane (embed `DataPlaneConfig` in a service's config)."""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.common.config import require_non_negative, require_positive
from chainfs.common.tls import TlsConfig
from chainfs.common.units import MiB


@dataclass
class DataPlaneConfig:
    # Largest payload of one frame: a 64 MiB chunk plus 1 MiB of slack for
    # batched reads that return a little more than one chunk.
    max_payload_bytes: int = 64 * MiB + MiB
    # Largest header message: a ListChunksRsp of 65536 chunk metas is ~4 MiB.
    max_header_bytes: int = 16 * MiB
    # Requests one connection carries at once (client: not sent beyond it;
    # server: stops reading the connection while this many are unanswered).
    max_inflight_per_connection: int = 64
    # Connections a client opens to one peer address; a new one is opened only
    # when every existing one is busy, so large transfers spread over streams.
    max_connections_per_peer: int = 4
    # Connections a server accepts at once; more are closed on accept.
    max_server_connections: int = 4096
    connect_timeout_ms: int = 3_000  # a peer that does not accept within this is UNAVAILABLE
    request_timeout_ms: int = 30_000  # default per request (send + handler + reply): ETIMEDOUT
    # Server: a frame whose bytes stop arriving, or replies the peer stops
    # reading, for this long close the connection (frees the buffers a stalled
    # or hostile peer holds).
    frame_stall_timeout_ms: int = 60_000
    # Every connection is probed this often for a peer reset that the event loop
    # does not report (uvloop drops a socket's poller on POLLERR silently); a
    # client's requests on a reset connection fail within this time.
    liveness_check_ms: int = 500
    # Server: bytes of request payload buffers held at once (in use + cached).
    # A request whose buffer does not fit waits, and its connection stops reading.
    buffer_pool_bytes: int = 256 * MiB
    # Of those, bytes of free buffers kept mapped for reuse (saves page faults);
    # capped at buffer_pool_bytes.
    buffer_pool_cached_bytes: int = 128 * MiB
    # Per connection: receive staging buffer for fixed headers, header messages
    # and small payloads (parsed in place; several small frames per recv).
    recv_staging_bytes: int = 256 * 1024
    # A payload with at least this many bytes still to come is received
    # straight into its destination buffer instead of through staging.
    direct_recv_min_bytes: int = 64 * 1024
    # Scatter-gather entries handed to one sendmsg() (Linux IOV_MAX is 1024).
    max_iov_per_send: int = 512
    # SO_SNDBUF / SO_RCVBUF in bytes; 0 keeps the kernel's auto-tuning.
    socket_send_buffer_bytes: int = 0
    socket_recv_buffer_bytes: int = 0
    # TLS of TCP connections (unix sockets stay plain). None = the process's
    # settings (chainfs.common.tls.current(): a service's [tls] section, else
    # the CHAINFS_TLS_* environment); set it only to differ from those.
    tls: TlsConfig | None = None

    def validate(self) -> None:
        require_positive(
            self,
            "max_payload_bytes",
            "max_header_bytes",
            "max_inflight_per_connection",
            "max_connections_per_peer",
            "max_server_connections",
            "connect_timeout_ms",
            "request_timeout_ms",
            "frame_stall_timeout_ms",
            "liveness_check_ms",
            "buffer_pool_bytes",
            "recv_staging_bytes",
            "direct_recv_min_bytes",
            "max_iov_per_send",
        )
        require_non_negative(
            self,
            "buffer_pool_cached_bytes",
            "socket_send_buffer_bytes",
            "socket_recv_buffer_bytes",
        )
        if self.max_payload_bytes > self.buffer_pool_bytes:
            raise ValueError("buffer_pool_bytes must hold at least one max_payload_bytes frame")
        if self.recv_staging_bytes < 4096:
            raise ValueError("recv_staging_bytes must be >= 4096")
        if self.max_iov_per_send > 1024:
            raise ValueError("max_iov_per_send must be <= 1024 (IOV_MAX)")
        if self.max_payload_bytes >= 1 << 63 or self.max_header_bytes >= 1 << 32:
            raise ValueError("frame bounds exceed the wire format")
        if self.tls is not None:
            self.tls.validate()
