"""DataClient: request/response over pooled data-plane connections.

Per peer address the client keeps up to ``max_connections_per_peer``
connections, opened on demand: a request takes the least busy one and a new
one is opened only while every existing one is busy, so concurrent large
transfers spread over several TCP streams while a single caller reuses one.
At most ``max_inflight_per_connection`` requests ride one connection; callers
beyond the per-peer total wait (within their timeout).

Payload buffers are sent with ``sendmsg`` scatter-gather, never joined;
frames queued in the same event-loop iteration leave in one ``sendmsg``.
Response payloads land in a fresh buffer (large ones: an anonymous mapping
with huge pages, several times cheaper to fault in than a bytearray), or,
with ``payload_sink``, straight in the caller's buffers
(``recv_into``/``recvmsg_into``, no intermediate copy for anything bigger
than ``direct_recv_min_bytes``). The sink is called only for a successful
reply that has a payload (not for an error reply nor a 0-byte payload); it
must return writable buffers (any format; C-contiguous) holding at least the
payload, else the request fails with EINVAL and the bytes are discarded; a
sink that raises fails the request with its exception. Spare room is left
untouched.

Guarantee: when ``request`` returns or raises, the transport no longer
references the caller's payload or sink buffers. (A request abandoned by
timeout or cancellation after part of it was sent closes that connection,
since a frame cannot be recalled; one abandoned while its reply streams into
the sink has the rest of that reply discarded.)

Errors: a peer that refuses or does not accept within ``connect_timeout_ms``
-> ChainfsError(UNAVAILABLE) naming the address; a connection lost (reset,
or closed even in the middle of a reply) -> UNAVAILABLE, a malformed reply ->
BAD_FRAME, for every request on that connection, which is discarded (a
request none of whose bytes had left is retried once on a fresh connection,
which hides idle connections the peer has reset); no reply within the
timeout -> ETIMEDOUT (the request may or may not have been executed: retry
with the same request id in its header to stay idempotent); an error
response -> the server's ChainfsError (same code and message). Connections
with requests in flight are probed every ``liveness_check_ms`` for resets
the event loop does not report (see Connection.poke).

TLS: when the process's TLS settings (or ``config.tls``) are on, TCP
connections are TLS, the server verified against the CA and the address
(presenting our certificate, if we hold one); a server whose certificate
does not verify is EACCES, a handshake that fails otherwise (a plain server)
UNAVAILABLE. Unix-socket connections stay plain.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chainfs.common import tls
from chainfs.common.dataplane.address import parse_address
from chainfs.common.dataplane.buffers import fresh_buffer
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.dataplane.conn import Connection, OutFrame, as_byte_view, tls_handshake
from chainfs.common.dataplane.frame import MAX_REQUEST_ID, MSG_HELLO, FrameHeader, error_of_reply
from chainfs.common.dataplane.server import build_segments
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb

PayloadSink = Callable[[int, bytes], Sequence[bytearray | memoryview]]

_EMPTY = memoryview(b"")
# Errors connecting to a unix socket that mean "use TCP instead".
UNIX_UNUSABLE = (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ECONNREFUSED)


@dataclass(slots=True)
class Reply:
    """A response. ``payload_len`` bytes of payload arrived: in ``payload``
    (a fresh buffer) or, when the request named a ``payload_sink``, in the
    sink's buffers (then ``payload`` is empty)."""

    msg_type: int
    header: bytes
    payload: memoryview
    payload_len: int = 0


class _Pending:
    __slots__ = ("frame", "fut", "sink")

    def __init__(self, fut: asyncio.Future[Reply], sink: PayloadSink | None) -> None:
        self.fut = fut
        self.sink = sink
        self.frame: OutFrame | None = None


class _ClientConn(Connection):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        cfg: DataPlaneConfig,
        address: str,
    ) -> None:
        super().__init__(loop, sock, cfg, address)
        self.pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._cur: _Pending | None = None
        self._cur_id = 0
        self._cur_buf: memoryview | None = None

    @property
    def inflight(self) -> int:
        return len(self.pending)

    def idle_s(self, now: float) -> float:
        """Seconds since anything was received or sent."""
        return now - max(self.last_recv_monotonic, self.last_send_monotonic)

    def next_request_id(self) -> int:
        rid = self._next_id
        self._next_id = 1 if rid == MAX_REQUEST_ID else rid + 1
        return rid

    def _on_header(self, hdr: FrameHeader, header: bytes) -> None:
        if not hdr.is_response:
            raise ChainfsError(
                Code.BAD_FRAME, f"data plane {self.peer}: request frame from a server"
            )
        pending = self.pending.get(hdr.request_id)
        self._cur, self._cur_id, self._cur_buf = pending, hdr.request_id, None
        n = hdr.payload_len
        if pending is None or pending.fut.done() or hdr.is_error or n == 0:
            self._begin_payload(None)  # abandoned request, error reply or no payload
            return
        if pending.sink is None:
            buf = fresh_buffer(n)
            self._cur_buf = buf
            self._begin_payload([buf])
            return
        try:
            views = [as_byte_view(b) for b in pending.sink(hdr.msg_type, header)]
            room = sum(len(v) for v in views)
            if room < n or any(v.readonly for v in views):
                raise ChainfsError(
                    Code.EINVAL,
                    f"payload_sink gave {room} writable bytes for a {n}-byte payload",
                )
        except BaseException as e:  # the caller's sink failed: fail its request, drop the bytes
            pending.fut.set_exception(e)
            self._begin_payload(None)
            return
        self._begin_payload(views)

    def _on_frame(self, hdr: FrameHeader, header: bytes) -> None:
        pending = self.pending.pop(hdr.request_id, None)
        cur_buf, self._cur, self._cur_buf = self._cur_buf, None, None
        if pending is None or pending.fut.done():
            return
        if hdr.is_error:
            pending.fut.set_exception(error_of_reply(hdr.status, header))
        elif cur_buf is not None:
            pending.fut.set_result(Reply(hdr.msg_type, header, cur_buf, hdr.payload_len))
        else:
            pending.fut.set_result(Reply(hdr.msg_type, header, _EMPTY, hdr.payload_len))

    def abandon(self, request_id: int) -> None:
        """The caller gave up on ``request_id``: forget it, never touch its buffers again."""
        pending = self.pending.pop(request_id, None)
        if pending is None:
            return
        frame = pending.frame
        if frame is not None and not self.cancel_frame(frame):
            # Part of the frame is in the kernel: it cannot be recalled, and the
            # rest of it still references the caller's buffers.
            self.close(
                ChainfsError(
                    Code.UNAVAILABLE, f"data plane {self.peer}: request abandoned mid-send"
                )
            )
            return
        if self._cur is pending and self._cur_id == request_id:
            self._discard_current()
            self._cur = None

    def _on_close(self, exc: BaseException | None) -> None:
        if exc is None:
            exc = ChainfsError(Code.UNAVAILABLE, f"data plane {self.peer}: connection closed")
        elif not isinstance(exc, ChainfsError):
            exc = ChainfsError(Code.UNAVAILABLE, f"data plane {self.peer}: {exc}")
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.fut.done():
                p.fut.set_exception(exc)
        self._cur = None


class _Peer:
    def __init__(self, address: str, cfg: DataPlaneConfig) -> None:
        self.address = address
        self.conns: list[_ClientConn] = []
        self.connecting: asyncio.Future[_ClientConn] | None = None
        # Requests in flight to this peer, bounded by connections x per-connection.
        self.active = 0
        self.limit = cfg.max_connections_per_peer * cfg.max_inflight_per_connection
        self.waiters: deque[asyncio.Future[None]] = deque()  # FIFO for a slot

    def release_slot(self) -> None:
        """Hand the slot to the first waiter (FIFO), or free it."""
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return
        self.active -= 1
        assert self.active >= 0


class DataClient:
    """Data-plane client; see the module docstring.

    With ``credential``, every new connection first sends a HELLO frame with
    it and is used only once the server accepted it (one round trip per
    connection); a refused credential fails the request with the server's
    error (UNAUTHENTICATED).
    """

    def __init__(
        self, config: DataPlaneConfig | None = None, credential: cpb.Credential | None = None
    ) -> None:
        self.config = config if config is not None else DataPlaneConfig()
        self.config.validate()
        self._hello = credential.SerializeToString() if credential is not None else b""
        tls_config = self.config.effective_tls()
        self._tls_ctx = tls_config.client_context() if tls_config.enabled else None
        self._peers: dict[str, _Peer] = {}
        self._closed = False
        self._liveness: asyncio.TimerHandle | None = None
        # "unix:/path" -> "host:port" of the same server, used when the unix
        # socket cannot be connected (EACCES, ENOENT, ECONNREFUSED).
        self.unix_fallbacks: dict[str, str] = {}

    async def request(
        self,
        address: str,
        msg_type: int,
        header: bytes,
        payload: Sequence[bytes | bytearray | memoryview] = (),
        payload_sink: PayloadSink | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Send one request frame and wait for its reply; see the module docstring."""
        if self._closed:
            raise ChainfsError(Code.UNAVAILABLE, "data plane client closed")
        cfg = self.config
        if len(header) > cfg.max_request_header_bytes:
            # Servers close a connection that sends more (before reading it): say so here.
            raise ChainfsError(
                Code.E2BIG,
                f"request header of {len(header)} bytes over the "
                f"{cfg.max_request_header_bytes} bound (max_request_header_bytes)",
            )
        if timeout_s is None:
            timeout_s = cfg.request_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        peer = self._peers.get(address)
        if peer is None:
            parse_address(address)  # EINVAL now rather than at connect
            peer = self._peers[address] = _Peer(address, cfg)
        if peer.active < peer.limit and not peer.waiters:
            peer.active += 1
        else:
            await self._wait_slot(peer, deadline, timeout_s)
        try:
            attempt = 0
            while True:
                conn = await self._connection(peer, deadline, timeout_s)
                rid = conn.next_request_id()
                segs = build_segments(0, msg_type, rid, header, payload, cfg.max_payload_bytes)
                fut: asyncio.Future[Reply] = loop.create_future()
                pending = _Pending(fut, payload_sink)
                conn.pending[rid] = pending
                frame = pending.frame = conn.send_frame(segs, None)
                timer = loop.call_at(deadline, _expire, fut, address, timeout_s)
                try:
                    return await fut
                except ChainfsError as e:
                    if (
                        attempt == 0
                        and conn.closed
                        and not frame.started
                        and e.code
                        in (
                            Code.UNAVAILABLE,
                            Code.BAD_FRAME,
                        )
                    ):
                        # The connection died (say an idle one the peer had reset)
                        # before any byte of this request left: a fresh one may carry it.
                        attempt += 1
                        continue
                    raise
                finally:
                    timer.cancel()
                    if not fut.done() or rid in conn.pending:
                        conn.abandon(rid)
                    pending.frame = None
        finally:
            peer.release_slot()

    @staticmethod
    async def _wait_slot(peer: _Peer, deadline: float, timeout_s: float) -> None:
        """Wait (FIFO) for a request slot of ``peer``; ETIMEDOUT at ``deadline``."""
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        peer.waiters.append(w)
        try:
            async with asyncio.timeout_at(deadline):
                await w
        except BaseException as e:
            if w.done() and not w.cancelled():
                peer.release_slot()  # handed to us just as we gave up: pass it on
            else:
                w.cancel()
            if isinstance(e, TimeoutError):
                raise ChainfsError(
                    Code.ETIMEDOUT,
                    f"data plane {peer.address}: no request slot within {timeout_s:.3f}s",
                ) from None
            raise

    async def _connection(self, peer: _Peer, deadline: float, timeout_s: float) -> _ClientConn:
        cfg = self.config
        liveness_s = cfg.liveness_check_ms / 1000
        while True:
            best: _ClientConn | None = None
            live = 0
            now = time.monotonic()
            for c in peer.conns:
                if not c.pending and c.idle_s(now) > liveness_s:
                    c.poke()  # notices a server that closed it while unused (EOF)
                if c.closed:
                    continue
                live += 1
                if best is None or c.inflight < best.inflight:
                    best = c
            if live != len(peer.conns):
                peer.conns = [c for c in peer.conns if not c.closed]
            # Reuse an idle connection; open another while all are busy and the
            # bound allows; otherwise share the least busy one.
            if (
                best is not None
                and best.inflight < cfg.max_inflight_per_connection
                and (
                    best.inflight == 0
                    or live >= cfg.max_connections_per_peer
                    or peer.connecting is not None
                )
            ):
                return best
            if peer.connecting is None and live < cfg.max_connections_per_peer:
                peer.connecting = asyncio.ensure_future(self._connect(peer, deadline))
                # Its waiters may all have timed out: a failure then goes unread,
                # and asyncio would log it with a traceback at garbage collection.
                peer.connecting.add_done_callback(_mark_retrieved)
            try:
                async with asyncio.timeout_at(deadline):
                    if peer.connecting is None:
                        # Every connection is full while the per-peer slots say
                        # otherwise (replies being delivered): let them finish.
                        await asyncio.sleep(0.001)
                        continue
                    fresh = await asyncio.shield(peer.connecting)
                    if fresh.closed and isinstance(fresh.close_exc, ChainfsError):
                        # Dropped right after connecting (under TLS 1.3 a server
                        # refuses a client certificate only then): say why, do
                        # not reconnect in a loop.
                        raise fresh.close_exc
            except TimeoutError:
                raise ChainfsError(
                    Code.ETIMEDOUT,
                    f"data plane {peer.address}: no connection within {timeout_s:.3f}s",
                ) from None
            except ChainfsError:
                if best is not None and not best.closed:
                    return best  # keep using what works
                raise

    async def _open_socket(self, address: str, deadline: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        family, sockaddr = parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            limit = min(deadline, loop.time() + self.config.connect_timeout_ms / 1000)
            async with asyncio.timeout_at(limit):
                await loop.sock_connect(sock, sockaddr)
                if self._tls_ctx is not None and isinstance(sockaddr, tuple):
                    sock = await self._handshake(loop, sock, sockaddr[0], address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open_with_fallback(self, address: str, deadline: float) -> socket.socket:
        """A connected socket to ``address``; a unix socket this process may not
        use (another user's, gone, or stale) is replaced by its TCP fallback."""
        fallback = self.unix_fallbacks.get(address)
        try:
            return await self._open_socket(address, deadline)
        except OSError as e:
            if fallback is None or e.errno not in UNIX_UNUSABLE:
                raise
        return await self._open_socket(fallback, deadline)

    async def _connect(self, peer: _Peer, deadline: float) -> _ClientConn:
        loop = asyncio.get_running_loop()
        address = peer.address
        try:
            sock = await self._open_with_fallback(address, deadline)
            try:
                conn = _ClientConn(loop, sock, self.config, address)
            except BaseException:
                sock.close()
                raise
        except TimeoutError:
            raise ChainfsError(
                Code.UNAVAILABLE, f"data plane peer {address} did not accept in time"
            ) from None
        except OSError as e:
            if isinstance(e, ChainfsError):
                raise
            raise ChainfsError(
                Code.UNAVAILABLE, f"data plane peer {address} unreachable: {e}"
            ) from None
        finally:
            peer.connecting = None
        if self._closed:
            conn.close(None)
            raise ChainfsError(Code.UNAVAILABLE, "data plane client closed")
        conn.start_reading()
        if self._hello:
            try:
                await self._say_hello(conn, deadline)
            except BaseException:
                conn.close(None)
                raise
        peer.conns.append(conn)
        if self._liveness is None:
            self._schedule_liveness(loop)
        return conn

    async def _say_hello(self, conn: _ClientConn, deadline: float) -> None:
        """Present the credential; return once the server accepted it."""
        loop = asyncio.get_running_loop()
        rid = conn.next_request_id()
        segs = build_segments(0, MSG_HELLO, rid, self._hello, (), self.config.max_payload_bytes)
        fut: asyncio.Future[Reply] = loop.create_future()
        conn.pending[rid] = _Pending(fut, None)
        conn.send_frame(segs, None)
        try:
            async with asyncio.timeout_at(deadline):
                await fut
        except TimeoutError:
            raise ChainfsError(
                Code.ETIMEDOUT, f"data plane {conn.peer}: no answer to the credential in time"
            ) from None
        finally:
            conn.pending.pop(rid, None)

    async def _handshake(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str, address: str
    ) -> socket.socket:
        assert self._tls_ctx is not None
        try:
            return await tls_handshake(loop, sock, self._tls_ctx, server_side=False, hostname=host)
        except (ssl.SSLError, ConnectionError) as e:
            raise tls.describe_failure(e, address) from None

    def _schedule_liveness(self, loop: asyncio.AbstractEventLoop) -> None:
        self._liveness = loop.call_later(self.config.liveness_check_ms / 1000, self._check_liveness)

    def _check_liveness(self) -> None:
        """Probe connections with requests in flight for a reset (see Connection.poke);
        close those unused for client_idle_timeout_ms (before the server does)."""
        self._liveness = None
        if self._closed:
            return
        any_conn = False
        now = time.monotonic()
        idle_s = self.config.client_idle_timeout_ms / 1000
        for peer in list(self._peers.values()):
            for conn in list(peer.conns):
                if conn.pending:
                    conn.poke()
                elif conn.idle_s(now) > idle_s:
                    conn.close(None)
                any_conn = any_conn or not conn.closed
        if any_conn:
            self._schedule_liveness(asyncio.get_running_loop())

    async def close(self) -> None:
        """Close every connection; requests in flight fail with UNAVAILABLE."""
        self._closed = True
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None
        for peer in self._peers.values():
            for conn in peer.conns:
                conn.close(ChainfsError(Code.UNAVAILABLE, "data plane client closed"))
            peer.conns.clear()
        self._peers.clear()

    def connection_count(self, address: str) -> int:
        peer = self._peers.get(address)
        return 0 if peer is None else sum(1 for c in peer.conns if not c.closed)


def _expire(fut: asyncio.Future[Reply], address: str, timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(
            ChainfsError(Code.ETIMEDOUT, f"data plane {address}: no reply within {timeout_s:.3f}s")
        )


def _mark_retrieved(task: asyncio.Future[_ClientConn]) -> None:
    """Read a finished task's exception: its waiters report it (or timed out)."""
    if not task.cancelled():
        task.exception()
