"""Thin async client of the meta service.

``MetaClient(source, client_id)``: ``source`` is a RoutingCache (meta servers
are the META nodes of the routing info) or fixed meta addresses. Every call
goes to one meta server; when it is unreachable the call moves to another
with the SAME request id, so a mutating request that did run is answered from
meta's idempotency record instead of running twice. Failures raise
ChainfsError with the errno-valued code meta sent.

Transports: meta servers answer the same protobuf requests over gRPC and over
the framed data plane (about 8x less CPU per call on both sides, measured in
bench/meta_bench.py's notes). From the routing info a client uses the framed
address a META node advertises (``data_address``); static addresses are gRPC
``host:port`` or framed ``frame://host:port``.

Where to operate (``at``) is one of:
    "/a/b" or b"/a/b"       an absolute path
    (parent_ino, "name")    a name in a directory (FUSE style)
    ino (int)               the inode itself

Write opens start a session at meta; while any is open the client sends
keep-alives so meta does not take it for a vanished client.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import random
import stat as stat_mod
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from google.protobuf.message import DecodeError

from chainfs.common.background import cancel_and_wait
from chainfs.common.dataplane import DataClient, DataPlaneConfig
from chainfs.common.dataplane.sync_client import SyncDataClient, SyncRequest
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing, data_address

# The flag bits are part of this client's API (callers pass them as ``flags``).
from chainfs.common.rpc.meta_wire import (  # noqa: F401
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    WIRE_METHODS,
    XATTR_CREATE,
    XATTR_REPLACE,
)
from chainfs.common.rpc.mgmt_client import RoutingCache, env_credential
from chainfs.common.rpc.retry import Backoff, RetryPolicy
from chainfs.common.rpc.stat_coalescer import StatCoalescer
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb
from chainfs.proto import mgmt_pb2 as mp

if TYPE_CHECKING:  # gRPC is imported on first gRPC call only: framed clients survive fork()
    from chainfs.common.rpc.grpc_util import Stubs
    from chainfs.proto import meta_pb2_grpc as pbg

log = logging.getLogger(__name__)

T = TypeVar("T")
At = str | bytes | int | tuple[int, str | bytes]

DEFAULT_TIMEOUT_S = 30.0  # one call, failover and retries included
# One attempt on one server: a server that stopped answering (hung, or its host
# gone silent without resetting connections) is left for another after this.
# A slow attempt that did complete is not lost: the retry carries the same
# request id and gets meta's recorded answer.
DEFAULT_ATTEMPT_TIMEOUT_S = 5.0
META_RETRY = RetryPolicy(backoff_initial_s=0.02)
# Worth trying again (same request id): the server could not be reached or did
# not answer within the attempt timeout, or its KV transaction lost too many
# conflicts in a row.
_FAILOVER = frozenset({Code.UNAVAILABLE, Code.NOT_PRIMARY_META, Code.ETIMEDOUT})
_RETRY_SAME = frozenset({Code.TXN_CONFLICT, Code.TXN_TOO_OLD, Code.EAGAIN})
# An attempt from a caller's thread that ends so is asked again on the loop
# (same request id) instead of answering the caller: as above, or no socket
# could be had (all busy), the request was over a frame's bound, or the reply
# was malformed.
_ASK_ON_LOOP = _FAILOVER | _RETRY_SAME | {Code.EBUSY, Code.E2BIG, Code.BAD_FRAME}

FRAME_PREFIX = "frame://"  # a static address served over the framed data plane


_TYPE_BITS = {
    pb.FILE: stat_mod.S_IFREG,
    pb.DIRECTORY: stat_mod.S_IFDIR,
    pb.SYMLINK: stat_mod.S_IFLNK,
    pb.FIFO: stat_mod.S_IFIFO,
    pb.SOCKET: stat_mod.S_IFSOCK,
    pb.CHAR_DEVICE: stat_mod.S_IFCHR,
    pb.BLOCK_DEVICE: stat_mod.S_IFBLK,
}
# st_mode type bits -> inode type (mknod).
INODE_TYPE_OF_MODE = {bits: t for t, bits in _TYPE_BITS.items()}


@dataclass(frozen=True)
class UserInfo:
    """Whose permissions a call uses."""

    uid: int
    gid: int
    gids: tuple[int, ...] = ()

    @classmethod
    def current(cls) -> UserInfo:
        return cls(os.getuid(), os.getgid(), tuple(os.getgroups()))


@dataclass(frozen=True)
class OpenResult:
    inode: pb.Inode
    session_id: bytes  # empty unless opened for write
    created: bool
    # With created: the directory as the create left it (None in a retried
    # request's replayed answer, which does not keep it).
    parent: pb.Inode | None = None


def path_at(at: At) -> pb.PathAt:
    if isinstance(at, int):
        if at <= 0:
            raise ChainfsError(Code.EINVAL, f"bad inode id {at}")
        return pb.PathAt(parent=at)
    if isinstance(at, tuple):
        parent, name = at
        if parent <= 0:
            raise ChainfsError(Code.EINVAL, f"bad parent inode id {parent}")
        return pb.PathAt(parent=parent, path=os.fsencode(name))
    return pb.PathAt(path=os.fsencode(at))


# Paths per BatchStat call, in bytes: a quarter of meta's default request
# header bound (max_request_header_bytes, 1 MiB), whatever the path lengths.
BATCH_STAT_REQUEST_BYTES = 256 * 1024


def _by_size(ats: list[pb.PathAt], budget: int) -> list[list[pb.PathAt]]:
    """``ats`` cut in order into runs of at most ``budget`` path bytes (a run
    holds at least one)."""
    runs: list[list[pb.PathAt]] = [[]]
    used = 0
    for at in ats:
        size = len(at.path) + 16  # the path and its framing, parent id
        if runs[-1] and used + size > budget:
            runs.append([])
            used = 0
        runs[-1].append(at)
        used += size
    return runs


def naming_path(err: ChainfsError, request: Any) -> ChainfsError:
    """``err`` naming the absolute path the request was about (what the user gave),
    so that its text leads with that path rather than meta's inner names."""
    if err.filename is not None or "at" not in request.DESCRIPTOR.fields_by_name:
        return err
    at: pb.PathAt = request.at
    if at.parent or not at.path.startswith(b"/"):
        return err
    return ChainfsError(err.code, err.message, os.fsdecode(at.path))


def type_bits(type_: pb.InodeType.ValueType) -> int:
    """The st_mode type bits (S_IFREG, S_IFIFO, ...) of an inode type."""
    return _TYPE_BITS.get(type_, 0)


def mode_bits(inode: pb.Inode) -> int:
    """st_mode: type bits | permission bits."""
    return type_bits(inode.type) | inode.mode


def to_stat_result(inode: pb.Inode, dev: int = 0) -> os.stat_result:
    """An ``os.stat_result`` for an inode (st_blocks in 512-byte units)."""
    blksize = inode.layout.chunk_size if inode.type == pb.FILE and inode.layout.chunk_size else 4096
    return os.stat_result(
        (
            mode_bits(inode),
            inode.ino,
            dev,
            inode.nlink,
            inode.uid,
            inode.gid,
            inode.size,
            inode.atime_ns // 1_000_000_000,
            inode.mtime_ns // 1_000_000_000,
            inode.ctime_ns // 1_000_000_000,
        ),
        {
            "st_atime": inode.atime_ns / 1e9,
            "st_mtime": inode.mtime_ns / 1e9,
            "st_ctime": inode.ctime_ns / 1e9,
            "st_atime_ns": inode.atime_ns,
            "st_mtime_ns": inode.mtime_ns,
            "st_ctime_ns": inode.ctime_ns,
            "st_blksize": blksize,
            "st_blocks": (inode.size + 511) // 512,
            "st_rdev": inode.rdev,
        },
    )


@dataclass(frozen=True)
class CallerThread:
    """How meta calls leave a caller's thread while :func:`run_in_caller` runs
    a coroutine there: one attempt over ``sync``'s blocking sockets, else
    ``on_loop`` (runs a coroutine on the client's event loop and waits).
    ``soon`` has the loop run a function without waiting for it (what a call
    leaves to the loop: the keep-alives of a session it opened)."""

    sync: SyncDataClient
    on_loop: Callable[[Coroutine[Any, Any, Any]], Any]
    soon: Callable[[Callable[[], None]], None]


@dataclass(frozen=True)
class _Attempted:
    """How an attempt from a caller's thread ended, for the loop's call that
    goes on: the server that did not answer (None: it did, asking to retry),
    the error, and the call's deadline (time.monotonic())."""

    silent: str | None
    error: ChainfsError
    deadline: float


_in_caller: contextvars.ContextVar[CallerThread | None] = contextvars.ContextVar(
    "chainfs_meta_in_caller", default=None
)


A = TypeVar("A")


def _to_loop(hand: Callable[[A], T], work: A) -> T:
    """``hand(work)`` with run_in_caller's mark cleared: what it starts on the
    loop copies this thread's context, and there every call must take the loop
    path (a caller-thread attempt would block the loop, its fallback fail)."""
    token = _in_caller.set(None)
    try:
        return hand(work)
    finally:
        _in_caller.reset(token)


def run_in_caller(coro: Coroutine[Any, Any, T], caller: CallerThread) -> T:
    """Run ``coro`` to its end in this thread, every :meth:`MetaClient.call` it
    makes sent from here: for a small call, the hop onto the client's loop
    thread and back costs more CPU than the call itself.

    ``coro`` may await only MetaClient calls (here they return without
    suspending, blocking this thread instead). One that suspends (a future, a
    sleep, a task) cannot run here: it is closed and RuntimeError raised, a
    bug in the caller's choice of coroutine."""
    token = _in_caller.set(caller)
    try:
        try:
            waited = coro.send(None)
        except StopIteration as done:
            return cast(T, done.value)
        coro.close()
        raise RuntimeError(f"{coro!r} awaited {waited!r}: it cannot run in the calling thread")
    finally:
        _in_caller.reset(token)


class MetaClient:
    """Calls meta servers; one async method per namespace operation."""

    def __init__(
        self,
        source: RoutingCache | str | Sequence[str],
        client_id: bytes | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user: UserInfo | None = None,
        transport: str = "auto",
        dataplane: DataPlaneConfig | None = None,
        attempt_timeout_s: float = DEFAULT_ATTEMPT_TIMEOUT_S,
        retry: RetryPolicy = META_RETRY,
        credential: cpb.Credential | None = None,
        stat_coalesce_inflight: int = 0,
        stat_batch_max: int = 64,
    ) -> None:
        """``transport``: "auto" (framed where a server offers it), "grpc" or "frame".
        ``stat_coalesce_inflight``: once this many stats are in flight, further
        ones wait and go together in one BatchStat of up to ``stat_batch_max``
        paths (0: each stat is its own call; chainfs.common.rpc.stat_coalescer).
        ``credential``: the user's token; a server with authentication takes the
        caller's uid/gid from it (``user`` then matters only to an impersonating
        token, a multi-user mount's). None = $CHAINFS_TOKEN[_FILE]; empty = none."""
        if transport not in ("auto", "grpc", "frame"):
            raise ChainfsError(Code.EINVAL, f"transport must be auto, grpc or frame: {transport!r}")
        if timeout_s <= 0 or attempt_timeout_s <= 0:
            raise ChainfsError(
                Code.EINVAL, f"timeouts must be > 0, not {timeout_s}, {attempt_timeout_s}"
            )
        self.attempt_timeout_s = attempt_timeout_s
        self.retry = retry
        self.credential = credential if credential is not None else env_credential()
        self.client_id = bytes(client_id) if client_id is not None else os.urandom(16)
        if len(self.client_id) != 16:
            raise ChainfsError(Code.EINVAL, "client_id must be 16 bytes")
        self.timeout_s = timeout_s
        self.user = user or UserInfo.current()
        # Called with every capability a reply carries (open, stat with want_capability):
        # the client's chunk I/O keeps them for its storage requests.
        self.on_capability: Callable[[cpb.Capability], None] | None = None
        # Called with the method name as each call starts (before its request is
        # queued): the client's chunk I/O sends its queued session ends along.
        self.before_call: Callable[[str], None] | None = None
        # The same from a caller's thread (run_in_caller): ends_along gives the
        # sessions to end in the same send as the call; ends_unsent takes back
        # those that got no answer (the loop's sender ends them).
        self.ends_along: Callable[[], list[tuple[int, bytes]]] | None = None
        self.ends_unsent: Callable[[list[tuple[int, bytes]]], None] | None = None
        self._routing: RoutingCache | None = None
        self._static: list[str] = []
        if isinstance(source, RoutingCache):
            self._routing = source
        else:
            items = source.split(",") if isinstance(source, str) else list(source)
            self._static = [a.strip() for a in items if a.strip()]
            if not self._static:
                raise ChainfsError(Code.EINVAL, "no meta server address given")
        # Request ids: time-seeded, so a restarted process reusing a client id
        # does not collide with the answers meta kept for its predecessor.
        self._ids = itertools.count(time.time_ns() // 1000)
        self.transport = transport
        self._dp_config = dataplane
        self._dp: DataClient | None = None
        # A meta server on this host is reached through its unix socket (cheaper
        # than loopback TCP); "unix:/path" -> its TCP address, for the fallback.
        self.prefer_unix_socket = True
        self._unix_fallbacks: dict[str, str] = {}
        self._stubs: Stubs[pbg.MetaStub] | None = None  # made on the first gRPC call
        if stat_coalesce_inflight < 0 or stat_batch_max <= 0:
            raise ChainfsError(
                Code.EINVAL,
                f"stat_coalesce_inflight must be >= 0 and stat_batch_max > 0, not "
                f"{stat_coalesce_inflight}, {stat_batch_max}",
            )
        self.stat_coalescer = (
            StatCoalescer(
                self._stat_one,
                self.batch_stat,
                stat_coalesce_inflight,
                stat_batch_max,
                max_waiting=4 * stat_batch_max,
            )
            if stat_coalesce_inflight
            else None
        )
        self._current: str | None = None
        # The addresses of the last routing seen, with what they were worked out from.
        self._addresses_key: tuple[Routing, str, bool] | None = None
        self._addresses_of: list[str] = []
        self._sessions: set[tuple[int, bytes]] = set()
        self._keepalive_s = 10.0
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- plumbing -----------------------------------------------------------
    def request_info(self, user: UserInfo | None = None) -> cpb.RequestInfo:
        u = user or self.user
        return cpb.RequestInfo(
            client_id=self.client_id,
            request_id=next(self._ids),
            uid=u.uid,
            gid=u.gid,
            gids=list(u.gids),
        )

    async def _addresses(self, refresh: bool) -> list[str]:
        """The meta servers to try (not to be changed by the caller)."""
        if self._routing is None:
            return self._static
        routing = self._routing.current
        if refresh or routing is None:
            routing = await (self._routing.refresh() if refresh else self._routing.get())
        # A routing version is one immutable Routing: its addresses are worked
        # out once, not per call (nodes_of_type builds a list over every node).
        key = (routing, self.transport, self.prefer_unix_socket)
        if key != self._addresses_key:
            self._addresses_of = self._addresses_in(routing)
            self._addresses_key = key
        return self._addresses_of

    def _addresses_in(self, routing: Routing) -> list[str]:
        out = []
        for n in routing.nodes_of_type(mp.META):
            if n.data_address and self.transport != "grpc":
                address = data_address(n, self.prefer_unix_socket)
                if address != n.data_address:
                    # A same-host meta's unix socket; TCP when this process may not use it.
                    self._unix_fallbacks[address] = n.data_address
                out.append(FRAME_PREFIX + address)
            elif n.rpc_address and self.transport != "frame":
                out.append(n.rpc_address)
        return out

    async def _invoke(self, addr: str, method: str, request: Any, timeout_s: float) -> Any:
        if not addr.startswith(FRAME_PREFIX):
            from chainfs.common.rpc import grpc_util

            return await grpc_util.call(getattr(self._stub(addr), method), request, timeout_s, addr)
        if self._closed:
            raise ChainfsError(Code.EBADF, "MetaClient is closed")
        if self._dp is None:
            self._dp = DataClient(self._dp_config, self.credential)
            self._dp.unix_fallbacks = self._unix_fallbacks
        w = WIRE_METHODS[method]
        reply = await self._dp.request(
            addr[len(FRAME_PREFIX) :], w.msg_type, request.SerializeToString(), timeout_s=timeout_s
        )
        return w.response.FromString(bytes(reply.header))

    def sync_client(self, connections_per_server: int, timeout_s: float) -> SyncDataClient | None:
        """Blocking sockets for calls from callers' threads (:func:`run_in_caller`),
        with this client's credential and frame bounds; None when they cannot
        be had (TLS on: they are plain)."""
        config = self._dp_config or DataPlaneConfig()
        if config.effective_tls().enabled:
            return None
        return SyncDataClient(config, self.credential, connections_per_server, timeout_s)

    def _stub(self, address: str) -> pbg.MetaStub:
        if self._stubs is None:
            from chainfs.common.rpc import grpc_util
            from chainfs.proto import meta_pb2_grpc

            self._stubs = grpc_util.Stubs(meta_pb2_grpc.MetaStub, "MetaClient", self.credential)
            self._stubs.closed = self._closed
        return self._stubs.get(address)

    async def call(self, method: str, request: Any) -> Any:
        """Send ``request`` to a meta server, failing over and retrying (same
        request id) until the client timeout. Under :func:`run_in_caller`, the
        first attempt is made from the calling thread."""
        caller = _in_caller.get()
        if caller is not None:
            return self._call_in_caller(caller, method, request)
        return await self._call_on_loop(method, request)

    def _call_in_caller(self, caller: CallerThread, method: str, request: Any) -> Any:
        """One attempt from this thread at the server calls go to now; when it
        gets no answer to give the caller, :meth:`call` on the loop with the same
        request (same request id: a change the attempt did make is answered from
        meta's idempotency record, not made twice), the silent server tried last."""
        tried = self._current
        deadline = time.monotonic() + self.timeout_s  # the whole call's, as on the loop
        try:
            rsp = self._attempt_now(caller.sync, method, request, self._ends_along())
        except ChainfsError as e:
            if e.code not in _ASK_ON_LOOP:
                raise naming_path(e, request) from None
            log.debug("meta %s from the calling thread at %s: %s", method, tried, e)
            silent = tried if e.code in _FAILOVER else None
            return _to_loop(
                caller.on_loop, self._call_on_loop(method, request, _Attempted(silent, e, deadline))
            )
        if rsp is None:
            return _to_loop(caller.on_loop, self._call_on_loop(method, request))
        return rsp

    def _ends_along(self) -> list[tuple[int, bytes]]:
        return self.ends_along() if self.ends_along is not None else []

    def _attempt_now(
        self,
        sync: SyncDataClient,
        method: str,
        request: Any,
        ends: list[tuple[int, bytes]] | None = None,
    ) -> Any | None:
        """One attempt over ``sync`` at the framed server calls go to now (the one
        the last call chose); None when there is none yet. Raises the
        ChainfsError the attempt ended with (a malformed reply is BAD_FRAME).
        ``ends``: sessions to end in the same send (an EndSessions request of its
        own, on a second socket); what that does not end goes to ends_unsent."""
        addr = self._current
        if addr is None or not addr.startswith(FRAME_PREFIX) or self._closed:
            self._unsent(ends)
            return None
        address = addr[len(FRAME_PREFIX) :]
        w = WIRE_METHODS[method]
        fallback = self._unix_fallbacks.get(address)
        body = request.SerializeToString()
        if not ends:
            _, header = sync.request(address, w.msg_type, body, fallback=fallback)
        else:
            header = self._with_ends(sync, address, fallback, w.msg_type, body, ends)
        try:
            return w.response.FromString(header)
        except DecodeError as e:
            raise ChainfsError(Code.BAD_FRAME, f"meta {method} reply from {address}: {e}") from None

    def _with_ends(
        self,
        sync: SyncDataClient,
        address: str,
        fallback: str | None,
        msg_type: int,
        body: bytes,
        ends: list[tuple[int, bytes]],
    ) -> bytes:
        """A call's request and an EndSessions request sent together; the call's
        reply header (its error raised, as ``SyncDataClient.request`` does)."""
        end_req = pb.EndSessionsReq(
            req=self.request_info(),
            sessions=[pb.SessionRef(ino=ino, session_id=sid) for ino, sid in ends],
        )
        ended = False
        try:
            call, end = sync.request_many(
                [
                    SyncRequest(address, msg_type, body, None, fallback),
                    SyncRequest(
                        address,
                        WIRE_METHODS["EndSessions"].msg_type,
                        end_req.SerializeToString(),
                        None,
                        fallback,
                    ),
                ]
            )
            ended = not isinstance(end, ChainfsError)
            if not ended:
                log.debug("ending %d sessions along a call at %s: %s", len(ends), address, end)
        finally:
            if ended:
                self._sessions.difference_update(ends)
            else:
                self._unsent(ends)
        if isinstance(call, ChainfsError):
            raise call
        return call[1]

    def _unsent(self, ends: list[tuple[int, bytes]] | None) -> None:
        if ends and self.ends_unsent is not None:
            self.ends_unsent(ends)

    async def _call_on_loop(
        self, method: str, request: Any, attempted: _Attempted | None = None
    ) -> Any:
        """:meth:`call` on the event loop; ``attempted``: how an attempt from a
        caller's thread ended (its server asked last in the first round, the
        call's deadline kept)."""
        if self.before_call is not None:
            self.before_call(method)
        last: ChainfsError | None = None
        tried: str | None = None
        if attempted is None:
            backoff = Backoff(self.retry, self.timeout_s)
        else:
            backoff = Backoff(self.retry, attempted.deadline - time.monotonic())
            last, tried = attempted.error, attempted.silent
        refresh = False
        while True:
            try:
                addresses = await self._addresses(refresh)
            except ChainfsError as e:
                # mgmtd unreachable (its own failover): go on with the cached list.
                if not refresh or e.code not in (Code.UNAVAILABLE, Code.ETIMEDOUT):
                    raise
                last = e
                addresses = await self._addresses(False)
            if not addresses:
                last = ChainfsError(Code.UNAVAILABLE, "no meta server in the routing info")
            elif self._current not in addresses:
                self._current = random.choice(addresses)
            order = [self._current] + [a for a in addresses if a != self._current]
            if tried is not None and len(order) > 1 and order[0] == tried:
                order.append(order.pop(0))
            tried = None
            for addr in order if addresses else []:
                assert addr is not None
                remaining = backoff.remaining_s()
                if remaining <= 0:
                    break
                try:
                    rsp = await self._invoke(
                        addr, method, request, min(remaining, self.attempt_timeout_s)
                    )
                    self._current = addr
                    return rsp
                except ChainfsError as e:
                    if e.code in _FAILOVER:
                        last = e
                        continue
                    if e.code in _RETRY_SAME:
                        last = e
                        self._current = addr
                        break
                    raise naming_path(e, request) from None
            if not await backoff.wait():
                assert last is not None
                raise ChainfsError(
                    last.code, f"meta call {method} gave up after {self.timeout_s}s: {last.message}"
                )
            refresh = self._routing is not None

    # -- lookups ------------------------------------------------------------
    async def stat(self, at: At, follow: bool = True, user: UserInfo | None = None) -> pb.Inode:
        if self.stat_coalescer is not None and _in_caller.get() is None:
            # shares a BatchStat with others in flight (on the loop)
            return await self.stat_coalescer.stat(at, follow, user or self.user)
        return await self._stat_one(at, follow, user)

    async def _stat_one(self, at: At, follow: bool, user: UserInfo | None) -> pb.Inode:
        req = pb.StatReq(req=self.request_info(user), at=path_at(at), follow=follow)
        rsp: pb.StatRsp = await self.call("Stat", req)
        return rsp.inode

    async def lstat(self, at: At, user: UserInfo | None = None) -> pb.Inode:
        return await self.stat(at, follow=False, user=user)

    async def lookup(
        self, parent: int, name: str | bytes, user: UserInfo | None = None
    ) -> pb.Inode:
        return await self.stat((parent, name), follow=False, user=user)

    async def batch_stat(
        self,
        ats: Sequence[At],
        follow: bool = True,
        user: UserInfo | None = None,
        want_capability: int = 0,
    ) -> list[pb.Inode | ChainfsError]:
        """Inodes in request order; a failed one is its ChainfsError. With
        ``want_capability`` (CapRight bits), the capabilities meta grants for
        regular files go to ``on_capability``."""
        got = await self.batch_stat_caps(ats, follow, user, want_capability)
        return [r if isinstance(r, ChainfsError) else r[0] for r in got]

    async def batch_stat_caps(
        self,
        ats: Sequence[At],
        follow: bool = True,
        user: UserInfo | None = None,
        want_capability: int = 0,
    ) -> list[tuple[pb.Inode, cpb.Capability | None] | ChainfsError]:
        """As batch_stat, with each inode the capability meta granted (None: none).

        Long paths make a long request: it goes as several calls, each at most
        BATCH_STAT_REQUEST_BYTES of paths, under meta's request header bound."""
        results: list[pb.StatResult] = []
        for part in _by_size([path_at(a) for a in ats], BATCH_STAT_REQUEST_BYTES):
            req = pb.BatchStatReq(
                req=self.request_info(user),
                ats=part,
                follow=follow,
                want_capability=want_capability,
            )
            rsp: pb.BatchStatRsp = await self.call("BatchStat", req)
            results.extend(rsp.results)
        return self._stat_results(results)

    def batch_stat_now(
        self, sync: SyncDataClient, ats: Sequence[At], want_capability: int = 0
    ) -> list[tuple[pb.Inode, cpb.Capability | None] | ChainfsError] | None:
        """As :meth:`batch_stat_caps` with ``follow=False``, from the calling thread
        over ``sync``'s blocking sockets: one attempt at the meta server calls go
        to now (the one the last call chose), no retry, no failover. None when
        there is no such framed server yet, the request is over one call's
        bound, or the attempt failed in any way (then ask :meth:`batch_stat_caps`
        on the loop: a stat changes nothing, so asking again is safe)."""
        paths = [path_at(a) for a in ats]
        if sum(len(p.path) + 16 for p in paths) > BATCH_STAT_REQUEST_BYTES:
            return None
        req = pb.BatchStatReq(
            req=self.request_info(), ats=paths, follow=False, want_capability=want_capability
        )
        try:
            rsp: pb.BatchStatRsp | None = self._attempt_now(sync, "BatchStat", req)
        except ChainfsError as e:
            log.debug("BatchStat from the calling thread: %s", e)
            return None
        if rsp is None or len(rsp.results) != len(paths):
            return None
        return self._stat_results(rsp.results)

    def _stat_results(
        self, results: Iterable[pb.StatResult]
    ) -> list[tuple[pb.Inode, cpb.Capability | None] | ChainfsError]:
        out: list[tuple[pb.Inode, cpb.Capability | None] | ChainfsError] = []
        for r in results:
            if r.code:
                out.append(ChainfsError(r.code, r.message))
            elif r.HasField("capability"):
                self._got_capability(r.capability)
                out.append((r.inode, r.capability))
            else:
                out.append((r.inode, None))
        return out

    def _got_capability(self, cap: cpb.Capability) -> None:
        if self.on_capability is not None:
            self.on_capability(cap)

    async def readlink_bytes(self, at: At, user: UserInfo | None = None) -> bytes:
        req = pb.ReadlinkReq(req=self.request_info(user), at=path_at(at))
        rsp: pb.ReadlinkRsp = await self.call("Readlink", req)
        return rsp.target

    async def readlink(self, at: At, user: UserInfo | None = None) -> str:
        return os.fsdecode(await self.readlink_bytes(at, user))

    async def readdir(
        self,
        at: At,
        after: str | bytes = b"",
        limit: int = 0,
        with_attrs: bool = False,
        user: UserInfo | None = None,
    ) -> pb.ReaddirRsp:
        """One page of entries after the name ``after`` (``more`` says if others follow)."""
        req = pb.ReaddirReq(
            req=self.request_info(user),
            at=path_at(at),
            after=os.fsencode(after),
            limit=limit,
            with_attrs=with_attrs,
        )
        rsp: pb.ReaddirRsp = await self.call("Readdir", req)
        return rsp

    async def iterdir(
        self, at: At, with_attrs: bool = False, page: int = 0, user: UserInfo | None = None
    ) -> AsyncIterator[pb.DirEntry]:
        """Every entry, page by page (a page is consistent; the listing as a whole is not)."""
        after = b""
        while True:
            rsp = await self.readdir(at, after, page, with_attrs, user)
            for e in rsp.entries:
                yield e
            if not rsp.more or not rsp.entries:
                return
            after = rsp.entries[-1].name

    async def listdir(self, at: At, user: UserInfo | None = None) -> list[str]:
        return [os.fsdecode(e.name) async for e in self.iterdir(at, user=user)]

    async def statfs(self, user: UserInfo | None = None) -> pb.StatFsRsp:
        rsp: pb.StatFsRsp = await self.call("StatFs", pb.StatFsReq(req=self.request_info(user)))
        return rsp

    # -- files --------------------------------------------------------------
    async def open(
        self,
        at: At,
        *,
        read: bool = True,
        write: bool = False,
        create: bool = False,
        exclusive: bool = False,
        truncate: bool = False,
        nofollow: bool = False,
        mode: int = 0o666,
        user: UserInfo | None = None,
        session: bool = False,
    ) -> OpenResult:
        """open(2). A write open returns a session id for sync/close; so does a
        read open with ``session`` (meta then keeps the file while it is open)."""
        req = pb.OpenReq(
            req=self.request_info(user),
            at=path_at(at),
            read=read,
            write=write,
            create=create,
            exclusive=exclusive,
            truncate=truncate,
            nofollow=nofollow,
            mode=mode,
            session=session,
        )
        rsp: pb.OpenRsp = await self.call("Open", req)
        if rsp.HasField("capability"):
            self._got_capability(rsp.capability)
        if rsp.session_id:
            self._track(rsp.inode.ino, rsp.session_id, rsp.session_timeout_ms)
        parent = rsp.parent if rsp.HasField("parent") else None
        return OpenResult(rsp.inode, rsp.session_id, rsp.created, parent)

    async def create(
        self,
        at: At,
        mode: int = 0o666,
        exclusive: bool = False,
        truncate: bool = False,
        write: bool = True,
        user: UserInfo | None = None,
    ) -> OpenResult:
        """Create (or open) a file; ``exclusive`` is O_EXCL."""
        return await self.open(
            at,
            read=False,
            write=write,
            create=True,
            exclusive=exclusive,
            truncate=truncate,
            mode=mode,
            user=user,
        )

    async def sync(
        self,
        ino: int,
        session_id: bytes = b"",
        length_hint: int = 0,
        exact: bool = True,
        wrote: bool = True,
    ) -> pb.Inode:
        """Report the length written so far; ``exact`` (fsync) has meta ask storage."""
        req = pb.SyncReq(
            req=self.request_info(),
            ino=ino,
            session_id=session_id,
            length_hint=length_hint,
            exact=exact,
            wrote=wrote,
        )
        rsp: pb.SyncRsp = await self.call("Sync", req)
        return rsp.inode

    async def close(
        self, ino: int, session_id: bytes = b"", length_hint: int = 0, wrote: bool = False
    ) -> pb.Inode | None:
        """Close a file: ends its write session and fixes its length (meta asks
        storage when ``wrote``). None if the file is gone. (Shut the client
        down with :meth:`aclose`.)"""
        req = pb.CloseReq(
            req=self.request_info(),
            ino=ino,
            session_id=session_id,
            length_hint=length_hint,
            wrote=wrote,
        )
        try:
            rsp: pb.CloseRsp = await self.call("Close", req)
        finally:
            self._sessions.discard((ino, session_id))
        return rsp.inode if rsp.HasField("inode") else None

    async def close_publish(
        self,
        ino: int,
        session_id: bytes,
        length: int,
        src: At,
        dst: At,
        flags: int = RENAME_NOREPLACE,
    ) -> pb.CloseRsp:
        """Close a file this client wrote all of (``length`` bytes, every write
        acknowledged: meta does not ask storage) and rename it from ``src`` to
        ``dst`` in the same commit (``flags``: RENAME_NOREPLACE or 0 to replace).
        The close commits even when the rename is refused: ``rsp.rename.code``
        is 0 when the file took its new name, else the error code."""
        req = pb.CloseReq(
            req=self.request_info(),
            ino=ino,
            session_id=session_id,
            length_hint=length,
            wrote=True,
            length_known=True,
            rename_src=path_at(src),
            rename_dst=path_at(dst),
            rename_flags=flags,
        )
        try:
            rsp: pb.CloseRsp = await self.call("Close", req)
        finally:
            self._sessions.discard((ino, session_id))
        return rsp

    async def end_sessions(self, sessions: list[tuple[int, bytes]]) -> None:
        """End sessions that report nothing (no length, no writes), in one call."""
        req = pb.EndSessionsReq(
            req=self.request_info(),
            sessions=[pb.SessionRef(ino=ino, session_id=sid) for ino, sid in sessions],
        )
        try:
            await self.call("EndSessions", req)
        finally:
            self._sessions.difference_update(sessions)

    async def keepalive(self) -> int:
        """Tell meta this client is alive; returns the session timeout in ms."""
        rsp: pb.KeepAliveRsp = await self.call(
            "KeepAlive", pb.KeepAliveReq(req=self.request_info())
        )
        return rsp.session_timeout_ms

    def _track(self, ino: int, session_id: bytes, timeout_ms: int) -> None:
        self._sessions.add((ino, session_id))
        if timeout_ms:
            self._keepalive_s = max(timeout_ms / 3000, 0.05)
        caller = _in_caller.get()
        if caller is None:
            self._start_keepalive()
        elif self._keepalive_task is None or self._keepalive_task.done():
            _to_loop(caller.soon, self._start_keepalive)  # the task lives on the loop

    def _start_keepalive(self) -> None:
        if self._keepalive_task is None or self._keepalive_task.done():
            self._keepalive_task = asyncio.get_running_loop().create_task(self._keepalive_loop())

    async def _keepalive_loop(self) -> None:
        while self._sessions and not self._closed:
            await asyncio.sleep(self._keepalive_s)
            if not self._sessions:
                return
            try:
                await self.keepalive()
            except ChainfsError as e:
                log.warning("meta keep-alive failed: %s", e)

    # -- namespace changes --------------------------------------------------
    # Each change has a ``*_reply`` form returning meta's whole answer: with the
    # changed directories' attributes as the change left them (``parent``;
    # rename: ``src_parent``, ``dst_parent``, ``replaced``), absent when the
    # answer is a replay for a retried request.
    async def mkdir_reply(
        self,
        at: At,
        mode: int = 0o777,
        parents: bool = False,
        parents_mode: int = 0,
        user: UserInfo | None = None,
    ) -> pb.MkdirRsp:
        """mkdir; ``parents`` is mkdir -p (missing ancestors made, existing directory fine)."""
        req = pb.MkdirReq(
            req=self.request_info(user),
            at=path_at(at),
            mode=mode,
            parents=parents,
            parents_mode=parents_mode,
        )
        rsp: pb.MkdirRsp = await self.call("Mkdir", req)
        return rsp

    async def mkdir(
        self,
        at: At,
        mode: int = 0o777,
        parents: bool = False,
        parents_mode: int = 0,
        user: UserInfo | None = None,
    ) -> pb.Inode:
        """mkdir; ``parents`` is mkdir -p (missing ancestors made, existing directory fine)."""
        return (await self.mkdir_reply(at, mode, parents, parents_mode, user)).inode

    async def unlink_reply(self, at: At, user: UserInfo | None = None) -> pb.UnlinkRsp:
        req = pb.UnlinkReq(req=self.request_info(user), at=path_at(at))
        rsp: pb.UnlinkRsp = await self.call("Unlink", req)
        return rsp

    async def unlink(self, at: At, user: UserInfo | None = None) -> None:
        await self.unlink_reply(at, user)

    remove = unlink

    async def rmdir_reply(self, at: At, user: UserInfo | None = None) -> pb.RmdirRsp:
        req = pb.RmdirReq(req=self.request_info(user), at=path_at(at))
        rsp: pb.RmdirRsp = await self.call("Rmdir", req)
        return rsp

    async def rmdir(self, at: At, user: UserInfo | None = None) -> None:
        await self.rmdir_reply(at, user)

    async def rename_reply(
        self, src: At, dst: At, flags: int = 0, user: UserInfo | None = None
    ) -> pb.RenameRsp:
        """rename(2)/renameat2: flags RENAME_NOREPLACE, RENAME_EXCHANGE."""
        req = pb.RenameReq(
            req=self.request_info(user), src=path_at(src), dst=path_at(dst), flags=flags
        )
        rsp: pb.RenameRsp = await self.call("Rename", req)
        return rsp

    async def rename(
        self, src: At, dst: At, flags: int = 0, user: UserInfo | None = None
    ) -> pb.Inode:
        """rename(2)/renameat2: flags RENAME_NOREPLACE, RENAME_EXCHANGE."""
        return (await self.rename_reply(src, dst, flags, user)).inode

    async def link_reply(self, target: At, at: At, user: UserInfo | None = None) -> pb.LinkRsp:
        """Hard link: a new name ``at`` for the existing ``target``."""
        req = pb.LinkReq(req=self.request_info(user), target=path_at(target), at=path_at(at))
        rsp: pb.LinkRsp = await self.call("Link", req)
        return rsp

    async def link(self, target: At, at: At, user: UserInfo | None = None) -> pb.Inode:
        """Hard link: a new name ``at`` for the existing ``target``."""
        return (await self.link_reply(target, at, user)).inode

    async def symlink_reply(
        self, target: str | bytes, at: At, user: UserInfo | None = None
    ) -> pb.SymlinkRsp:
        """A symlink named ``at`` pointing at ``target`` (os.symlink argument order)."""
        req = pb.SymlinkReq(req=self.request_info(user), at=path_at(at), target=os.fsencode(target))
        rsp: pb.SymlinkRsp = await self.call("Symlink", req)
        return rsp

    async def symlink(self, target: str | bytes, at: At, user: UserInfo | None = None) -> pb.Inode:
        """A symlink named ``at`` pointing at ``target`` (os.symlink argument order)."""
        return (await self.symlink_reply(target, at, user)).inode

    # -- attributes ---------------------------------------------------------
    async def setattr(
        self,
        at: At,
        *,
        follow: bool = True,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        atime_now: bool = False,
        mtime_now: bool = False,
        user: UserInfo | None = None,
        kill_priv: bool = False,
    ) -> pb.Inode:
        """``kill_priv``: ``mode`` is a kernel's setuid/setgid drop (see SetAttrReq)."""
        req = pb.SetAttrReq(
            req=self.request_info(user),
            at=path_at(at),
            follow=follow,
            atime_now=atime_now,
            mtime_now=mtime_now,
            kill_priv=kill_priv,
        )
        for name, value in (
            ("mode", mode),
            ("uid", uid),
            ("gid", gid),
            ("size", size),
            ("atime_ns", atime_ns),
            ("mtime_ns", mtime_ns),
        ):
            if value is not None:
                if value < 0 and name not in ("atime_ns", "mtime_ns"):
                    raise ChainfsError(Code.EINVAL, f"negative {name} {value}")
                setattr(req, name, value)
        rsp: pb.SetAttrRsp = await self.call("SetAttr", req)
        return rsp.inode

    async def truncate(self, at: At, size: int, user: UserInfo | None = None) -> pb.Inode:
        return await self.setattr(at, size=size, user=user)

    async def chmod(
        self, at: At, mode: int, follow: bool = True, user: UserInfo | None = None
    ) -> pb.Inode:
        return await self.setattr(at, mode=mode, follow=follow, user=user)

    async def chown(
        self,
        at: At,
        uid: int | None,
        gid: int | None,
        follow: bool = True,
        user: UserInfo | None = None,
    ) -> pb.Inode:
        """chown; None or -1 leaves that id unchanged (os.chown convention)."""
        return await self.setattr(
            at,
            uid=None if uid is None or uid == -1 else uid,
            gid=None if gid is None or gid == -1 else gid,
            follow=follow,
            user=user,
        )

    async def utime(
        self,
        at: At,
        times_ns: tuple[int, int] | None = None,
        follow: bool = True,
        user: UserInfo | None = None,
    ) -> pb.Inode:
        """os.utime: (atime_ns, mtime_ns), or None for now."""
        if times_ns is None:
            return await self.setattr(at, atime_now=True, mtime_now=True, follow=follow, user=user)
        return await self.setattr(
            at, atime_ns=times_ns[0], mtime_ns=times_ns[1], follow=follow, user=user
        )

    async def getxattr(
        self, at: At, name: str | bytes, follow: bool = True, user: UserInfo | None = None
    ) -> bytes:
        req = pb.GetXattrReq(
            req=self.request_info(user), at=path_at(at), name=os.fsencode(name), follow=follow
        )
        rsp: pb.GetXattrRsp = await self.call("GetXattr", req)
        return rsp.value

    async def setxattr(
        self,
        at: At,
        name: str | bytes,
        value: bytes,
        flags: int = 0,
        follow: bool = True,
        user: UserInfo | None = None,
    ) -> None:
        req = pb.SetXattrReq(
            req=self.request_info(user),
            at=path_at(at),
            name=os.fsencode(name),
            value=bytes(value),
            flags=flags,
            follow=follow,
        )
        await self.call("SetXattr", req)

    async def listxattr(
        self, at: At, follow: bool = True, user: UserInfo | None = None
    ) -> list[str]:
        req = pb.ListXattrReq(req=self.request_info(user), at=path_at(at), follow=follow)
        rsp: pb.ListXattrRsp = await self.call("ListXattr", req)
        return [os.fsdecode(n) for n in rsp.names]

    async def removexattr(
        self, at: At, name: str | bytes, follow: bool = True, user: UserInfo | None = None
    ) -> None:
        req = pb.RemoveXattrReq(
            req=self.request_info(user), at=path_at(at), name=os.fsencode(name), follow=follow
        )
        await self.call("RemoveXattr", req)

    async def set_layout(
        self,
        at: At,
        chunk_size: int = 0,
        stripe: int = 0,
        chains: Sequence[int] = (),
        user: UserInfo | None = None,
    ) -> pb.Inode:
        """Default layout of new files under a directory (0 / empty: unchanged)."""
        layout = pb.Layout(chunk_size=chunk_size, stripe=stripe, chains=list(chains))
        req = pb.SetLayoutReq(req=self.request_info(user), at=path_at(at), layout=layout)
        rsp: pb.SetLayoutRsp = await self.call("SetLayout", req)
        return rsp.inode

    async def get_layout(self, at: At, user: UserInfo | None = None) -> pb.Layout:
        return (await self.stat(at, user=user)).layout

    # -- special files, fallocate, locks (meta_service/ops/special.py, locks.py) --
    async def mknod(
        self, at: At, mode: int, rdev: int = 0, user: UserInfo | None = None
    ) -> pb.Inode:
        """mknod(2): ``mode`` holds the type bits (S_IFIFO, S_IFSOCK, S_IFCHR,
        S_IFBLK, S_IFREG or none for a regular file) and the permission bits."""
        return (await self.mknod_reply(at, mode, rdev, user)).inode

    async def mknod_reply(
        self, at: At, mode: int, rdev: int = 0, user: UserInfo | None = None
    ) -> pb.MknodRsp:
        """mknod with meta's whole answer (the new inode and its directory)."""
        type_ = INODE_TYPE_OF_MODE.get(stat_mod.S_IFMT(mode) or stat_mod.S_IFREG)
        if type_ is None or type_ in (pb.DIRECTORY, pb.SYMLINK):
            raise ChainfsError(Code.EINVAL, f"mknod of file type {stat_mod.S_IFMT(mode):#o}")
        req = pb.MknodReq(
            req=self.request_info(user),
            at=path_at(at),
            type=type_,
            mode=stat_mod.S_IMODE(mode),
            rdev=rdev,
        )
        rsp: pb.MknodRsp = await self.call("Mknod", req)
        return rsp

    async def fallocate(
        self, at: At, mode: int, offset: int, length: int, user: UserInfo | None = None
    ) -> pb.Inode:
        """The metadata side of fallocate(2) (see FallocateReq)."""
        if offset < 0 or length <= 0:
            raise ChainfsError(Code.EINVAL, f"fallocate offset {offset}, length {length}")
        req = pb.FallocateReq(
            req=self.request_info(user), at=path_at(at), mode=mode, offset=offset, length=length
        )
        rsp: pb.FallocateRsp = await self.call("Fallocate", req)
        return rsp.inode

    async def lock(
        self,
        ino: int,
        kind: pb.LockKind.ValueType,
        range_: pb.LockRange,
        owner: int,
        pid: int = 0,
        test: bool = False,
        user: UserInfo | None = None,
    ) -> pb.LockRsp:
        """One try at a lock (or unlock, or with ``test`` F_GETLK); never waits.
        While this client holds locks it keeps its lease alive, as for sessions."""
        req = pb.LockReq(
            req=self.request_info(user),
            ino=ino,
            kind=kind,
            range=range_,
            owner=owner,
            pid=pid,
            test=test,
        )
        rsp: pb.LockRsp = await self.call("Lock", req)
        if not test and rsp.granted:
            token = (ino, b"lock:%d:%d" % (kind, owner))
            if rsp.held:
                self._track(*token, rsp.session_timeout_ms)
            else:
                self._sessions.discard(token)
        return rsp

    # -- lifetime -----------------------------------------------------------
    async def aclose(self) -> None:
        self._closed = True
        if self.stat_coalescer is not None:
            await self.stat_coalescer.close()
        task, self._keepalive_task = self._keepalive_task, None
        await cancel_and_wait(task)
        if self._stubs is not None:
            await self._stubs.close()
        dp, self._dp = self._dp, None
        if dp is not None:
            await dp.close()

    async def __aenter__(self) -> MetaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
