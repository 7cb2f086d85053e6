"""Settings of the data plane (embed `DataPlaneConfig` in a service's config)."""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.common.config import require_non_negative, require_positive
from chainfs.common.tls import TlsConfig
from chainfs.common.tls import current as tls_current
from chainfs.common.units import MiB


@dataclass
class DataPlaneConfig:
    # Largest payload of one frame: a 64 MiB chunk plus 1 MiB of slack for
    # batched reads that return a little more than one chunk.
    max_payload_bytes: int = 64 * MiB + MiB
    # Largest header message a client accepts in a reply: a ListChunksRsp of
    # 65536 chunk metas is ~4 MiB.
    max_header_bytes: int = 16 * MiB
    # Largest header message a server accepts in a request. Requests are small
    # (meta's largest is well under 1 MiB); a header beyond the staging buffer
    # is received into the bounded buffer pool, so this also caps what one
    # connection can make the server set aside before the bytes arrive.
    max_request_header_bytes: int = 1 * MiB
    # Requests one connection carries at once (client: not sent beyond it;
    # server: stops reading the connection while this many are unanswered).
    max_inflight_per_connection: int = 64
    # Connections a client opens to one peer address; a new one is opened only
    # when every existing one is busy, so large transfers spread over streams.
    max_connections_per_peer: int = 4
    # Connections a server accepts at once; more are closed on accept.
    max_server_connections: int = 4096
    # Connections a server accepts from one peer IP address (all unix-socket
    # connections count as one address); more are closed on accept.
    max_connections_per_address: int = 256
    # Of max_server_connections, slots only cluster peers may take (the
    # server's is_cluster_peer hook says who is one), so a flood of client
    # connections cannot cut the chain's forwarding links.
    reserved_peer_connections: int = 64
    # Server: a connection with no request in flight and nothing received or
    # sent for this long is closed (clients reconnect on their next request).
    idle_timeout_ms: int = 120_000
    # Client: a pooled connection unused for this long is closed by the client
    # itself, before the server's idle_timeout_ms, so a request never races the
    # server closing it.
    client_idle_timeout_ms: int = 60_000
    connect_timeout_ms: int = 3_000  # a peer that does not accept within this is UNAVAILABLE
    request_timeout_ms: int = 30_000  # default per request (send + handler + reply): ETIMEDOUT
    # Server: a frame whose bytes stop arriving, or replies the peer stops
    # reading, for this long close the connection (frees the buffers a stalled
    # or hostile peer holds).
    frame_stall_timeout_ms: int = 10_000
    # Server, while requests wait for buffer-pool room: a connection receiving
    # a payload into pool space, or with replies queued, that moved fewer than
    # this many bytes per second over the last pool_pressure_window_ms is
    # closed, so a stalled or trickling peer cannot keep memory from others.
    min_payload_bytes_per_s_under_pressure: int = 1 * MiB
    pool_pressure_window_ms: int = 1_000
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
    # Server: pool bytes one connection may hold at once (its requests in
    # flight plus the one being received); beyond it the connection stops
    # reading until its own requests finish. Effective value is capped at
    # buffer_pool_bytes; it must hold one max_payload_bytes frame.
    max_pool_bytes_per_connection: int = 66 * MiB
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

    def effective_tls(self) -> TlsConfig:
        """The TLS settings connections use: ``tls``, else the process's."""
        return tls_current() if self.tls is None else self.tls

    def validate(self) -> None:
        require_positive(
            self,
            "max_payload_bytes",
            "max_header_bytes",
            "max_request_header_bytes",
            "max_inflight_per_connection",
            "max_connections_per_peer",
            "max_server_connections",
            "max_connections_per_address",
            "idle_timeout_ms",
            "client_idle_timeout_ms",
            "pool_pressure_window_ms",
            "max_pool_bytes_per_connection",
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
            "reserved_peer_connections",
            "min_payload_bytes_per_s_under_pressure",
            "socket_send_buffer_bytes",
            "socket_recv_buffer_bytes",
        )
        if self.max_payload_bytes > self.buffer_pool_bytes:
            raise ValueError("buffer_pool_bytes must hold at least one max_payload_bytes frame")
        if self.max_request_header_bytes > self.buffer_pool_bytes:
            raise ValueError("buffer_pool_bytes must hold one max_request_header_bytes header")
        if self.max_pool_bytes_per_connection < self.max_payload_bytes:
            raise ValueError("max_pool_bytes_per_connection must hold one max_payload_bytes frame")
        if self.reserved_peer_connections >= self.max_server_connections:
            raise ValueError("reserved_peer_connections must be below max_server_connections")
        if self.recv_staging_bytes < 4096:
            raise ValueError("recv_staging_bytes must be >= 4096")
        if self.max_iov_per_send > 1024:
            raise ValueError("max_iov_per_send must be <= 1024 (IOV_MAX)")
        if self.max_payload_bytes >= 1 << 63 or max(
            self.max_header_bytes, self.max_request_header_bytes
        ) >= (1 << 32):
            raise ValueError("frame bounds exceed the wire format")
        if self.tls is not None:
            self.tls.validate()
