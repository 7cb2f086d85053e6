"""DataServer: accepts data-plane connections and runs a handler per request frame.

Per request: the payload is received into a buffer of the server's
:class:`BufferPool` (when the pool is full the connection stops reading until
a buffer frees up); ``handler(Request)`` either answers at once (returns a
:class:`Response`: a page-cache read, no task made) or returns an awaitable
that runs as its own task, so a connection carries many requests at once (at
most ``max_inflight_per_connection`` unanswered; beyond that it stops
reading); responses go out in completion order (the replies queued in one
loop iteration leave in one ``sendmsg``), matched by request id. The request's
payload buffer stays valid until its response has been handed to the kernel
(or the connection died and the handler finished), so a chain hop can
forward the very buffer it received.

A handler raising :class:`ChainfsError` produces an error response (code +
message) that the client raises as the same ChainfsError; any other
exception is logged and answered as INTERNAL. A malformed frame closes only
its connection. A frame whose bytes stop arriving, or replies the peer stops
reading, for ``frame_stall_timeout_ms`` close the connection too (frees the
buffers they hold).

TLS: when the process's TLS settings (or ``config.tls``) are on, TCP
connections are TLS (the handshake runs as a task, bounded by
``tls.handshake_timeout_ms``, and counts against ``max_server_connections``);
a client certificate is verified if presented, not required. Unix-socket
connections stay plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import resource
import socket
import ssl
import stat
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chainfs.common import tls
from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.identity import (
    ANONYMOUS,
    Identity,
    Need,
    require,
    set_current_identity,
)
from chainfs.common.auth.policy import authorize, need_of
from chainfs.common.dataplane.address import format_tcp
from chainfs.common.dataplane.buffers import BufferPool, PooledBuffer, size_class
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.dataplane.conn import (
    PAUSE_INFLIGHT,
    PAUSE_POOL,
    PAUSE_QUOTA,
    Connection,
    Segment,
    _FileSeg,
    as_byte_view,
    tls_handshake,
)
from chainfs.common.dataplane.frame import (
    FLAG_ERROR,
    FLAG_RESPONSE,
    MSG_HELLO,
    FrameHeader,
    encode_fixed,
)
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb

if TYPE_CHECKING:
    from chainfs.common.metrics import RequestMetrics

log = logging.getLogger(__name__)

_EMPTY = memoryview(b"")
MAX_ERROR_MESSAGE_BYTES = 4096
# After accept() fails (EMFILE, ENFILE, ENOBUFS ...) the listener stays readable:
# stop watching it this long (s) instead of spinning the loop and the log.
ACCEPT_RETRY_S = 0.1


@dataclass(frozen=True, slots=True)
class FileRegion:
    """``length`` bytes of the open file ``fd`` from ``offset``, sent with os.sendfile.

    The fd must stay open until the response is sent: close it in
    ``Response.on_done``. A file shorter than the region closes the connection
    (the peer sees a dropped frame), since the frame header already promised
    the bytes.
    """

    fd: int
    offset: int
    length: int


@dataclass(slots=True)
class Request:
    """One request frame as the handler sees it.

    ``payload`` is a view of a pooled buffer, valid until the response to
    this request has been sent; copy what must outlive that. ``identity`` is
    who the connection's HELLO proved the caller to be (anonymous without one).
    """

    msg_type: int
    request_id: int
    header: bytes
    payload: memoryview
    peer: str
    identity: Identity = ANONYMOUS


@dataclass(slots=True)
class Response:
    """What a handler returns.

    The payload on the wire is ``payload`` (in order; items may also be
    :class:`FileRegion`, to interleave memory and file data) followed by
    ``file_regions``. Buffers must stay unchanged until ``on_done(sent)`` is
    called: once the response is in the kernel (True) or dropped because the
    connection closed (False). Use it to close file descriptors or return
    read buffers to a pool.
    """

    msg_type: int
    header: bytes = b""
    payload: Sequence[bytes | bytearray | memoryview | FileRegion] = ()
    file_regions: Sequence[FileRegion] = ()
    on_done: Callable[[bool], None] | None = field(default=None)


Handler = Callable[[Request], Awaitable[Response]]
# What a DataServer runs per request: a Handler, or one that may answer at once
# (returns a Response: no task is made for it) and otherwise returns an awaitable.
# The part that runs at once runs in the loop's own context: it must not set
# context variables (current_identity) nor block.
EagerHandler = Callable[[Request], Response | Awaitable[Response]]

# A protobuf request type and the call that answers it with a protobuf message.
MessageCall = tuple[Any, Callable[[Any], Awaitable[Any]]]


def message_handler(
    what: str,
    calls: dict[int, MessageCall],
    policy_keys: Mapping[int, str] | None = None,
    *,
    admit: Callable[[Identity], None] | None = None,
    metrics: RequestMetrics | None = None,
    op_names: Mapping[int, str] | None = None,
) -> Handler:
    """A handler for services whose requests are one protobuf message each (meta,
    mgmtd): parse by msg_type, call, answer the serialized reply. An unknown
    msg_type is ENOSYS, a malformed request EINVAL; a ChainfsError the call
    raises becomes an error frame carrying its code.

    With ``policy_keys`` (msg_type -> "<service>/<method>"), the caller's
    identity must satisfy the access policy first, and the call runs with it
    as :func:`current_identity` (as gRPC handlers do). ``admit(identity)``
    raises to refuse a connection's identity (a revoked token) before that.
    With ``metrics``, each call is timed as the op ``op_names[msg_type]``.

    Everything a request needs besides its message (the parser, the call, the
    policy's need, the metric children) is looked up once here, and a request
    runs as one coroutine: no wrapper per concern."""
    table: dict[int, _MessageEntry] = {}
    for msg_type, (request_type, call) in calls.items():
        need: Need | None = None
        key = ""
        if policy_keys is not None:
            key = policy_keys.get(msg_type, f"{what}/{msg_type}")
            # An unclassified key refuses every call (authorize raises EPERM).
            need = need_of(key)
        op = op_names.get(msg_type, "") if op_names is not None else ""
        table[msg_type] = _MessageEntry(
            request_type,
            request_type.FromString,
            call,
            policy_keys is not None,
            need,
            key,
            op if metrics is not None and op else "",
        )

    async def handle(req: Request) -> Response:
        entry = table.get(req.msg_type)
        if entry is None:
            raise ChainfsError(Code.ENOSYS, f"unknown {what} msg_type {req.msg_type}")
        who = req.identity
        if admit is not None:
            admit(who)
        if entry.checked:
            if entry.need is None:
                authorize(entry.policy_key, who)  # raises: not in the policy
            else:
                require(entry.need, who, entry.policy_key)
            set_current_identity(who)
        try:
            request = entry.parse(bytes(req.header))
        except Exception as e:  # DecodeError: a malformed request is the caller's fault
            raise ChainfsError(
                Code.EINVAL, f"malformed {entry.request_type.__name__}: {e}"
            ) from None
        if entry.op and metrics is not None:
            with metrics.observe(entry.op):
                rsp = await entry.call(request)
        else:
            rsp = await entry.call(request)
        return Response(req.msg_type, rsp.SerializeToString())

    return handle


def run_eagerly(handler: Handler) -> EagerHandler:
    """``handler`` whose coroutine takes its first step at once, in a context of
    its own: a request that never waits (a stat on the embedded store) is
    answered without a task, and one that waits goes on as a task from where it
    stopped, every step in that same context (context variables it set stay)."""

    def eager(req: Request) -> Response | Awaitable[Response]:
        ctx = contextvars.copy_context()
        coro = handler(req)
        if not isinstance(coro, types.CoroutineType):
            return coro
        try:
            yielded = ctx.run(coro.send, None)
        except StopIteration as stop:
            rsp: Response = stop.value
            return rsp
        return _resume(ctx, coro, yielded)

    return eager


@types.coroutine
def _resume(
    ctx: contextvars.Context, coro: Coroutine[Any, Any, Response], yielded: Any
) -> Generator[Any, None, Response]:
    """Go on with ``coro`` (which yielded ``yielded`` to the loop) in a task, in ``ctx``."""
    while True:
        try:
            yield yielded
        except BaseException as exc:  # a cancellation thrown into the task
            try:
                yielded = ctx.run(coro.throw, exc)
            except StopIteration as stop:
                rsp: Response = stop.value
                return rsp
        else:
            try:
                yielded = ctx.run(coro.send, None)
            except StopIteration as stop:
                rsp = stop.value
                return rsp


@dataclass(frozen=True, slots=True)
class _MessageEntry:
    """What :func:`message_handler` resolved once for one msg_type."""

    request_type: Any
    parse: Callable[[bytes], Any]
    call: Callable[[Any], Awaitable[Any]]
    checked: bool  # the access policy applies (and the call runs as the caller)
    need: Need | None  # None with ``checked``: the key is not in the policy
    policy_key: str
    op: str  # metrics op name, "" = not timed


def build_segments(
    flags: int,
    msg_type: int,
    request_id: int,
    header: bytes,
    items: Sequence[bytes | bytearray | memoryview | FileRegion],
    max_payload_bytes: int,
) -> list[Segment]:
    """Segments of one frame: fixed header, header message, payload pieces."""
    segs: list[Segment] = []
    total = 0
    for item in items:
        if isinstance(item, FileRegion):
            if item.offset < 0 or item.length < 0:
                raise ChainfsError(Code.EINVAL, f"bad file region {item}")
            if item.length:
                segs.append(_FileSeg(item.fd, item.offset, item.length))
                total += item.length
        else:
            mv = as_byte_view(item)
            if len(mv):
                segs.append(mv)
                total += len(mv)
    if total > max_payload_bytes:
        raise ChainfsError(
            Code.E2BIG, f"payload of {total} bytes over the {max_payload_bytes} frame bound"
        )
    fixed = encode_fixed(flags, msg_type, request_id, len(header), 0, total)
    if len(header) <= 4096:
        head: list[Segment] = [memoryview(fixed + header)]
    else:
        head = [memoryview(fixed), memoryview(header)]
    return head + segs


def error_segments(request_id: int, msg_type: int, code: int, message: str) -> list[Segment]:
    body = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES]
    fixed = encode_fixed(FLAG_RESPONSE | FLAG_ERROR, msg_type, request_id, len(body), code, 0)
    return [memoryview(fixed + body)]


class _ServerConn(Connection):
    """A server connection; every buffer it holds comes from the server's pool,
    at most ``max_pool_bytes_per_connection`` of them at once."""

    def __init__(
        self,
        server: DataServer,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: str,
        address_key: str,
    ) -> None:
        super().__init__(loop, sock, server.config, peer)
        self.max_header_bytes = server.config.max_request_header_bytes
        self.server = server
        self.address_key = address_key
        self.inflight = 0
        self.identity = ANONYMOUS
        self.said_hello = False
        self.pool_bytes = 0  # capacity of the pool buffers this connection holds
        self._quota_bytes = min(self.cfg.max_pool_bytes_per_connection, self.cfg.buffer_pool_bytes)
        self._cur_buf: PooledBuffer | None = None
        self._hdr_buf: PooledBuffer | None = None
        self._pool_cb: Callable[[PooledBuffer], None] | None = None
        self._quota_wait: tuple[int, Callable[[PooledBuffer], None]] | None = None
        # (monotonic s, bytes received + sent) when the pressure watchdog last looked.
        self.rate_mark: tuple[float, int] | None = None

    def _lend(self, nbytes: int, use: Callable[[PooledBuffer], None]) -> PooledBuffer | None:
        """A pool buffer now, or None after pausing reading until ``use(buffer)``
        is called with one (when this connection's quota and the pool allow)."""
        if self.pool_bytes and self.pool_bytes + size_class(nbytes) > self._quota_bytes:
            self.pause_reading(PAUSE_QUOTA)
            self._quota_wait = (nbytes, use)
            return None
        pool = self.server.pool
        buf = pool.try_acquire(nbytes)
        if buf is not None:
            self.pool_bytes += buf.capacity
            return buf

        def got(b: PooledBuffer) -> None:
            self._pool_cb = None
            if self.closed:
                b.release()
                return
            self.pool_bytes += b.capacity
            use(b)
            self.resume_reading(PAUSE_POOL)

        self.pause_reading(PAUSE_POOL)
        self._pool_cb = got
        pool.when_available(nbytes, got)
        return None

    def give_back(self, buf: PooledBuffer) -> None:
        """Return a buffer this connection holds; a frame waiting on the quota may go on."""
        self.pool_bytes -= buf.capacity
        assert self.pool_bytes >= 0
        buf.release()
        wait = self._quota_wait
        if wait is None or self.closed:
            return
        if self.pool_bytes and self.pool_bytes + size_class(wait[0]) > self._quota_bytes:
            return
        self._quota_wait = None
        self.resume_reading(PAUSE_QUOTA)
        got = self._lend(*wait)
        if got is not None:
            wait[1](got)

    def _big_header_buffer(self, nbytes: int) -> memoryview | None:
        def use(b: PooledBuffer) -> None:
            self._hdr_buf = b
            self._got_big_header_buffer(b.view)

        buf = self._lend(nbytes, use)
        if buf is None:
            return None
        self._hdr_buf = buf
        return buf.view

    def _big_header_done(self) -> None:
        buf, self._hdr_buf = self._hdr_buf, None
        if buf is not None:
            self.give_back(buf)

    def _on_header(self, hdr: FrameHeader, header: bytes) -> None:
        if hdr.is_response:
            raise ChainfsError(
                Code.BAD_FRAME, f"data plane {self.peer}: response frame sent to a server"
            )
        if hdr.payload_len == 0:
            self._begin_payload(None)
            return

        def use(b: PooledBuffer) -> None:
            self._cur_buf = b
            self._begin_payload([b.view])

        buf = self._lend(hdr.payload_len, use)
        if buf is not None:
            use(buf)

    @property
    def receiving_into_pool(self) -> bool:
        """A payload or big header is partly received into a pool buffer."""
        return self._cur_buf is not None or self._hdr_buf is not None

    def _on_frame(self, hdr: FrameHeader, header: bytes) -> None:
        buf, self._cur_buf = self._cur_buf, None
        self.rate_mark = None
        payload = buf.view if buf is not None else _EMPTY
        req = Request(hdr.msg_type, hdr.request_id, header, payload, self.peer, self.identity)
        self.inflight += 1
        if self.inflight >= self.cfg.max_inflight_per_connection:
            self.pause_reading(PAUSE_INFLIGHT)
        self.server._dispatch(self, req, buf)

    def _on_close(self, exc: BaseException | None) -> None:
        if self._pool_cb is not None:
            self.server.pool.cancel_waiter(self._pool_cb)
            self._pool_cb = None
        self._quota_wait = None
        for buf in (self._cur_buf, self._hdr_buf):
            if buf is not None:
                self.give_back(buf)
        self._cur_buf = self._hdr_buf = None
        self.server._conn_closed(self, exc)

    def request_finished(self) -> None:
        self.inflight -= 1
        assert self.inflight >= 0
        if self.inflight < self.cfg.max_inflight_per_connection:
            self.resume_reading(PAUSE_INFLIGHT)


_SPARE_FDS = 1024  # descriptors a service needs besides its data-plane connections


def _raise_open_files_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE toward ``wanted`` (never above the hard limit), so
    max_server_connections is reachable and not cut short by EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class DataServer:
    """Framed data-plane server; see the module docstring.

    ``host=None`` listens on no TCP port (unix socket only). ``address`` is
    "host:port" of the TCP listener, ``unix_address`` is "unix:/path".
    """

    def __init__(
        self,
        handler: EagerHandler,
        host: str | None = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        config: DataPlaneConfig | None = None,
        authenticator: Authenticator | None = None,
        is_cluster_peer: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config if config is not None else DataPlaneConfig()
        self.config.validate()
        if host is None and unix_path is None:
            raise ValueError("DataServer needs a TCP host or a unix_path")
        self.handler = handler
        self.authenticator = authenticator
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.pool = BufferPool(
            self.config.buffer_pool_bytes,
            min(self.config.buffer_pool_cached_bytes, self.config.buffer_pool_bytes),
        )
        self._listeners: list[socket.socket] = []
        # Says whether a connection from this peer IP (or "unix") may take one of
        # the reserved_peer_connections slots; None: nobody may.
        self.is_cluster_peer = is_cluster_peer
        # Pools besides self.pool whose waiters also mean memory pressure (pools
        # that response buffers come from, e.g. a storage node's read pool).
        self.pressure_pools: list[BufferPool] = []
        self._conns: set[_ServerConn] = set()
        self._per_address: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._accept_retry: dict[socket.socket, asyncio.TimerHandle] = {}
        self._bound_port = 0
        tls_config = tls.current() if self.config.tls is None else self.config.tls
        self._tls_ctx = tls_config.server_context() if tls_config.enabled else None
        self._tls_timeout_s = tls_config.handshake_timeout_ms / 1000
        self._handshakes: set[asyncio.Task[None]] = set()
        self.stats = {
            "connections": 0,
            "requests": 0,
            "errors": 0,
            "bad_frames": 0,
            "refused_connections": 0,
            "idle_closed": 0,
            "slow_senders_closed": 0,
            "tls_failures": 0,
        }

    @property
    def address(self) -> str:
        if self.host is None or not self._bound_port:
            raise RuntimeError("DataServer has no TCP listener (not started?)")
        return format_tcp(self.host, self._bound_port)

    @property
    def unix_address(self) -> str | None:
        return f"unix:{self.unix_path}" if self.unix_path else None

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _raise_open_files_limit(self.config.max_server_connections + _SPARE_FDS)
        self._loop = loop
        backlog = min(socket.SOMAXCONN, 1024)
        where = ""
        try:
            if self.host is not None:
                where = f"{self.host}:{self.port}"
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                ls = socket.socket(family, socket.SOCK_STREAM)
                self._listeners.append(ls)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind((self.host, self.port))
                ls.listen(backlog)
                self._bound_port = ls.getsockname()[1]
            if self.unix_path is not None:
                where = self.unix_path
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(self.unix_path).st_mode):
                        os.unlink(self.unix_path)  # stale socket of a previous run
                us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listeners.append(us)
                us.bind(self.unix_path)
                # Owner only: other local users reach this node over TCP (clients
                # fall back on EACCES), where every request is checked the same way.
                os.chmod(self.unix_path, 0o600)
                us.listen(backlog)
        except OSError as e:
            for s in self._listeners:
                s.close()
            self._listeners.clear()
            # Name what could not be bound: a bare "Address already in use" at
            # start-up does not say which of a node's listeners failed.
            raise OSError(e.errno, f"data plane cannot listen on {where}: {e.strerror}") from e
        for ls in self._listeners:
            ls.setblocking(False)
            loop.add_reader(ls.fileno(), self._on_accept, ls)
        self._schedule_watchdog()

    def _on_accept(self, ls: socket.socket) -> None:
        assert self._loop is not None
        for _ in range(64):
            try:
                sock, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving who we have
                log.warning(
                    "data plane accept failed: %s; retrying in %.0f ms", e, ACCEPT_RETRY_S * 1e3
                )
                self._loop.remove_reader(ls.fileno())
                self._accept_retry[ls] = self._loop.call_later(
                    ACCEPT_RETRY_S, self._resume_accept, ls
                )
                return
            key = addr[0] if isinstance(addr, tuple) else "unix"
            refusal = self._refusal(key)
            if refusal:
                self.stats["refused_connections"] += 1
                log.warning("data plane: %s, refusing %s", refusal, key)
                sock.close()
                continue
            peer = format_tcp(addr[0], addr[1]) if isinstance(addr, tuple) else "unix"
            if self._tls_ctx is not None and isinstance(addr, tuple):
                task = self._loop.create_task(self._accept_tls(sock, peer, key, self._tls_ctx))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
            else:
                self._adopt(sock, peer, key)

    def _adopt(self, sock: socket.socket, peer: str, key: str) -> None:
        assert self._loop is not None
        try:
            conn = _ServerConn(self, self._loop, sock, peer, key)
        except OSError as e:
            log.warning("data plane: set-up of %s failed: %s", peer, e)
            sock.close()
            return
        self._conns.add(conn)
        self._per_address[key] = self._per_address.get(key, 0) + 1
        self.stats["connections"] += 1
        conn.start_reading()

    async def _accept_tls(
        self, sock: socket.socket, peer: str, key: str, ctx: ssl.SSLContext
    ) -> None:
        assert self._loop is not None
        try:
            async with asyncio.timeout(self._tls_timeout_s):
                ssock = await tls_handshake(self._loop, sock, ctx, server_side=True)
        except (OSError, TimeoutError) as e:  # a plain client, a bad certificate, a silent peer
            self.stats["tls_failures"] += 1
            log.info("data plane: TLS handshake with %s failed: %s", peer, e or "timed out")
            return
        self._adopt(ssock, peer, key)

    def _refusal(self, address_key: str) -> str:
        """Why a new connection from ``address_key`` is refused ("" = accept it)."""
        cfg = self.config
        n = len(self._conns) + len(self._handshakes)  # handshakes hold sockets too
        if n >= cfg.max_server_connections:
            return "connection limit reached"
        if self._per_address.get(address_key, 0) >= cfg.max_connections_per_address:
            return "per-address connection limit reached"
        if n >= cfg.max_server_connections - cfg.reserved_peer_connections and not (
            self.is_cluster_peer is not None and self.is_cluster_peer(address_key)
        ):
            return "only reserved cluster-peer slots left"
        return ""

    def _resume_accept(self, ls: socket.socket) -> None:
        self._accept_retry.pop(ls, None)
        if self._loop is not None and ls in self._listeners:
            self._loop.add_reader(ls.fileno(), self._on_accept, ls)

    def _dispatch(self, conn: _ServerConn, req: Request, buf: PooledBuffer | None) -> None:
        assert self._loop is not None
        self.stats["requests"] += 1
        if req.msg_type == MSG_HELLO:
            pending: Awaitable[Response] = self._hello(conn, req)
        else:
            try:
                out = self.handler(req)
            except BaseException as e:
                self._answer(conn, req, buf, None, e)
                return
            if isinstance(out, Response):  # answered at once: no task
                self._answer(conn, req, buf, out, None)
                return
            pending = out
        task = self._loop.create_task(self._serve(conn, req, buf, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self,
        conn: _ServerConn,
        req: Request,
        buf: PooledBuffer | None,
        pending: Awaitable[Response],
    ) -> None:
        try:
            rsp = await pending
        except BaseException as e:
            self._answer(conn, req, buf, None, e)
            return
        self._answer(conn, req, buf, rsp, None)

    def _answer(
        self,
        conn: _ServerConn,
        req: Request,
        buf: PooledBuffer | None,
        rsp: Response | None,
        exc: BaseException | None,
    ) -> None:
        """Queue the reply to ``req``: ``rsp``, or the error frame of ``exc``. Anything
        but an Exception (a cancellation, SystemExit) frees the request and is re-raised."""
        on_done = rsp.on_done if rsp is not None else None
        try:
            if rsp is not None:
                try:
                    segs = build_segments(
                        FLAG_RESPONSE,
                        rsp.msg_type,
                        req.request_id,
                        rsp.header,
                        [*rsp.payload, *rsp.file_regions],
                        self.config.max_payload_bytes,
                    )
                except ChainfsError as e:
                    exc = e
            if isinstance(exc, ChainfsError):
                self.stats["errors"] += 1
                segs = error_segments(req.request_id, req.msg_type, exc.code, exc.message)
            elif isinstance(exc, Exception):
                self.stats["errors"] += 1
                log.error("data plane handler failed on msg_type %d", req.msg_type, exc_info=exc)
                segs = error_segments(
                    req.request_id, req.msg_type, Code.INTERNAL, f"{type(exc).__name__}: {exc}"
                )
            elif exc is not None:
                raise exc
        except BaseException:
            if on_done is not None:
                on_done(False)
            self._finish(conn, buf)
            raise

        def done(sent: bool) -> None:
            try:
                if on_done is not None:
                    on_done(sent)
            finally:
                self._finish(conn, buf)

        conn.send_frame(segs, done)

    async def _hello(self, conn: _ServerConn, req: Request) -> Response:
        """Authenticate the connection (once) from the credential in the header."""
        if conn.said_hello:
            raise ChainfsError(Code.EINVAL, "a connection presents its credential once")
        conn.said_hello = True
        try:
            cred = cpb.Credential.FromString(bytes(req.header))
        except Exception:  # DecodeError: a malformed credential is the caller's fault
            raise ChainfsError(Code.UNAUTHENTICATED, "malformed credential") from None
        if self.authenticator is None:
            # A server without authentication (no cluster secret) trusts every
            # caller: a client holding a token still works with it.
            return Response(MSG_HELLO, cpb.HelloReply().SerializeToString())
        who = await self.authenticator.authenticate(cred)
        conn.identity = who
        reply = cpb.HelloReply(
            user=who.name if who.is_user else "",
            uid=who.uid,
            gid=who.gid,
            admin=who.admin,
            node_id=who.node_id,
        )
        return Response(MSG_HELLO, reply.SerializeToString())

    def _finish(self, conn: _ServerConn, buf: PooledBuffer | None) -> None:
        if buf is not None:
            conn.give_back(buf)
        conn.request_finished()

    def _conn_closed(self, conn: _ServerConn, exc: BaseException | None) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            left = self._per_address[conn.address_key] - 1
            if left:
                self._per_address[conn.address_key] = left
            else:
                del self._per_address[conn.address_key]
        if exc is not None:
            if isinstance(exc, ChainfsError) and exc.code == Code.BAD_FRAME:
                self.stats["bad_frames"] += 1
            log.info("data plane connection %s closed: %s", conn.peer, exc)

    def _schedule_watchdog(self) -> None:
        assert self._loop is not None
        cfg = self.config
        period_ms = min(
            cfg.liveness_check_ms,
            max(min(cfg.frame_stall_timeout_ms, cfg.idle_timeout_ms) // 4, 50),
            max(cfg.pool_pressure_window_ms // 2, 50),
        )
        self._watchdog = self._loop.call_later(period_ms / 1000, self._check_connections)

    def _check_connections(self) -> None:
        """Close reset connections (see Connection.poke), frames that stalled, idle
        connections, and slow senders holding pool space others wait for."""
        now = time.monotonic()
        cfg = self.config
        limit_s = cfg.frame_stall_timeout_ms / 1000
        idle_s = cfg.idle_timeout_ms / 1000
        pressure = any(p.waiting for p in (self.pool, *self.pressure_pools))
        for conn in list(self._conns):
            conn.poke()
            if conn.closed:
                continue
            if conn.mid_frame and not conn.paused and now - conn.last_recv_monotonic > limit_s:
                conn.close(ChainfsError(Code.BAD_FRAME, f"data plane {conn.peer}: frame stalled"))
            elif conn.send_queue_frames and now - conn.last_send_monotonic > limit_s:
                # The peer stopped reading its replies: free what they hold.
                conn.close(ChainfsError(Code.UNAVAILABLE, f"data plane {conn.peer}: not reading"))
            elif self._too_slow(conn, now, pressure):
                self.stats["slow_senders_closed"] += 1
                conn.close(
                    ChainfsError(
                        Code.UNAVAILABLE,
                        f"data plane {conn.peer}: too slow while others wait for memory",
                    )
                )
            elif (
                not conn.inflight
                and not conn.mid_frame
                and not conn.send_queue_frames
                and now - max(conn.last_recv_monotonic, conn.last_send_monotonic) > idle_s
            ):
                self.stats["idle_closed"] += 1
                conn.close(None)
        self._schedule_watchdog()

    def _too_slow(self, conn: _ServerConn, now: float, pressure: bool) -> bool:
        """True for a connection holding pool space (a payload being received,
        or replies queued) that moved fewer bytes than the configured rate over
        the last window while other requests wait for memory."""
        if not conn.receiving_into_pool and not conn.send_queue_frames:
            conn.rate_mark = None
            return False
        moved = conn.bytes_received + conn.bytes_sent
        mark = conn.rate_mark
        if mark is None:
            conn.rate_mark = (now, moved)
            return False
        elapsed_s = now - mark[0]
        if elapsed_s < self.config.pool_pressure_window_ms / 1000:
            return False
        if (
            pressure
            and (moved - mark[1]) / elapsed_s < self.config.min_payload_bytes_per_s_under_pressure
        ):
            return True
        conn.rate_mark = (now, moved)
        return False

    async def stop(self) -> None:
        """Stop listening, close every connection, cancel running handlers."""
        loop = self._loop
        if loop is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for handle in self._accept_retry.values():
            handle.cancel()
        self._accept_retry.clear()
        for ls in self._listeners:
            loop.remove_reader(ls.fileno())
            ls.close()
        self._listeners.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
        for conn in list(self._conns):
            conn.close(None)
        tasks = [*self._tasks, *self._handshakes]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.pool.clear()
        self._loop = None
