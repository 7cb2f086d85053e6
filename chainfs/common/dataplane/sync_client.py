"""SyncDataClient: blocking request/reply from the calling thread, no event loop.

For a caller outside the event loop that wants one small answer now (a sync
KV-cache get of a value whose location is known): the hop onto the loop
thread and back costs more CPU than the request itself. Same frames, same
HELLO credential, same address rules (unix socket first, TCP fallback) as
:class:`~chainfs.common.dataplane.client.DataClient`; plain sockets only (a
client with TLS on does not make one).

Per peer address at most ``connections_per_peer`` sockets, each used by one
request at a time (the caller takes it exclusively, so any number of threads
may call); none free and the bound reached is EBUSY at once, never a wait:
the caller has the async path to fall back on. Every socket operation is
bounded by ``timeout_s`` (connect also by ``connect_timeout_ms``), and none
starts once ``timeout_s`` has passed since the request began.

A socket goes back to the pool only after a whole reply frame was read from
it; anything else (an error, a timeout, a malformed frame, a
KeyboardInterrupt in the middle) closes it, so a pooled socket never holds
part of an old reply. Pooled sockets idle longer than
``client_idle_timeout_ms`` are closed rather than reused (the server closes
idle ones itself), and once per that timeout a sweep closes them for every
peer, those no longer asked too (a restarted server's old address). A
request that loses its connection closes the peer's other free sockets: a
restarted server would fail each of them in turn. A peer that could not be
connected to is not tried again for ``timeout_s`` (each try would cost the
caller a failed connect).

After fork() the child never touches the parent's sockets: the first request
in a process other than the creator's forgets them (their file descriptors
are closed in the child only; the parent's connections stay intact) and
starts afresh.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from chainfs.common.dataplane.address import parse_address
from chainfs.common.dataplane.client import UNIX_UNUSABLE
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.dataplane.conn import as_byte_view, configure_socket
from chainfs.common.dataplane.frame import (
    FIXED_HEADER_SIZE,
    MAX_REQUEST_ID,
    MSG_HELLO,
    FrameHeader,
    decode_fixed,
    error_of_reply,
)
from chainfs.common.dataplane.server import build_segments
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb

# (msg_type, reply header) -> buffers for the payload (as DataClient's payload_sink).
SyncSink = Callable[[int, bytes], Sequence[memoryview]]


_NO_REPLY = ChainfsError(Code.EIO, "data plane: no reply read")  # replaced by every request's own

# Taken by the first thread of a fork()ed child to use a client (re-made in the child).
_fork_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SyncRequest(NamedTuple):
    """One request of :meth:`SyncDataClient.request_many` (as :meth:`~SyncDataClient.request`'s
    parameters)."""

    address: str
    msg_type: int
    header: bytes
    sink: SyncSink | None = None
    fallback: str | None = None


# Receive buffer of one socket: the fixed header, header message and a small
# payload usually arrive in one recv_into here (a larger payload's rest goes
# straight into the sink's buffers).
_STAGING_BYTES = 16 * 1024
# Buffers one recvmsg_into fills at most (well under Linux's IOV_MAX of 1024).
_IOV_MAX = 256


class _Conn:
    __slots__ = ("address", "next_id", "sock", "staging", "used_monotonic")

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.staging = memoryview(bytearray(_STAGING_BYTES))
        self.next_id = 1
        self.used_monotonic = time.monotonic()

    def request_id(self) -> int:
        rid = self.next_id
        self.next_id = 1 if rid == MAX_REQUEST_ID else rid + 1
        return rid


class _Deadline:
    """The end of one request: checked between socket operations, each of which
    is bounded by the socket's own timeout (set once per socket: changing it
    costs a system call)."""

    __slots__ = ("at", "timeout_s", "what")

    def __init__(self, timeout_s: float, what: str) -> None:
        self.at = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.what = what

    def check(self) -> None:
        if time.monotonic() >= self.at:
            raise ChainfsError(
                Code.ETIMEDOUT, f"data plane {self.what}: no reply within {self.timeout_s:.3f}s"
            )


class SyncDataClient:
    """Blocking data-plane requests over a bounded socket pool; see the module docstring."""

    def __init__(
        self,
        config: DataPlaneConfig,
        credential: cpb.Credential | None,
        connections_per_peer: int,
        timeout_s: float,
    ) -> None:
        config.validate()
        if connections_per_peer <= 0 or timeout_s <= 0:
            raise ValueError("a SyncDataClient needs connections_per_peer > 0 and timeout_s > 0")
        if config.effective_tls().enabled:
            raise ChainfsError(Code.EINVAL, "SyncDataClient speaks plain sockets only (TLS is on)")
        self.config = config
        self.connections_per_peer = connections_per_peer
        self.timeout_s = timeout_s
        self._hello = credential.SerializeToString() if credential is not None else b""
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Conn]] = {}  # address -> free sockets, last used last
        self._open: dict[str, int] = {}  # address -> sockets open (free + in use)
        self._down_until: dict[str, float] = {}  # address -> monotonic: not tried before
        self._next_sweep = 0.0  # monotonic: when _take next closes sockets idle too long
        # Last: a child's other threads wait for the whole reset (_forget_parents).
        self._pid = os.getpid()

    def _forget_parents(self) -> None:
        """In a fork()ed child, once, whichever of its threads comes first:
        forget the parent's pool (its lock may have been held at fork)."""
        if self._pid == os.getpid():
            return
        with _fork_lock:
            if self._pid != os.getpid():
                self._after_fork()

    def _after_fork(self) -> None:
        """In a fork()ed child: forget the parent's sockets (close only our descriptors)."""
        idle = self._idle
        self._reset()  # a new lock too: the parent's may have been held at fork
        for conns in idle.values():
            for c in conns:
                c.sock.close()

    # ---- the pool --------------------------------------------------------------

    def connection_count(self, address: str) -> int:
        """Sockets open to ``address`` (free and in use)."""
        return self._open.get(address, 0)

    def _take(self, address: str, fallback: str | None, deadline: _Deadline) -> _Conn:
        self._forget_parents()
        now = time.monotonic()
        idle_s = self.config.client_idle_timeout_ms / 1000
        stale: list[_Conn] = []
        swept: list[_Conn] = []
        c: _Conn | None = None
        with self._lock:
            if self._closed:
                raise ChainfsError(Code.UNAVAILABLE, "data plane client closed")
            if now >= self._next_sweep:
                # Peers no longer asked (a restarted server's old address) keep
                # their idle sockets until a sweep: one per idle timeout.
                self._next_sweep = now + idle_s
                swept = self._remove_idle(lambda other: other.used_monotonic <= now - idle_s)
            free = self._idle.get(address)
            while free and c is None:
                c = free.pop()  # the most recently used: the least likely to be stale
                if now - c.used_monotonic >= idle_s:
                    stale.append(c)
                    c = None
            self._open[address] = self._open.get(address, 0) - len(stale)
            if c is None:
                if self._down_until.get(address, 0.0) > now:
                    raise ChainfsError(Code.UNAVAILABLE, f"data plane peer {address} failed lately")
                if self._open[address] >= self.connections_per_peer:
                    raise ChainfsError(
                        Code.EBUSY,
                        f"data plane {address}: all {self.connections_per_peer} sync "
                        "connections in use",
                    )
                self._open[address] += 1
        try:
            for s in stale + swept:
                s.sock.close()
        except BaseException:  # a KeyboardInterrupt: the reservation must not leak
            if c is not None:
                self._give_back(c, True)
            else:
                with self._lock:
                    self._open[address] -= 1
            raise
        if c is not None:
            return c
        try:
            return self._connect(address, fallback, deadline)
        except BaseException as e:
            with self._lock:
                self._open[address] -= 1
                if isinstance(e, ChainfsError) and e.code == Code.UNAVAILABLE:
                    self._down_until[address] = time.monotonic() + self.timeout_s
            raise

    def _give_back(self, c: _Conn, reusable: bool) -> None:
        if reusable and self._pid == os.getpid():
            c.used_monotonic = time.monotonic()
            with self._lock:
                if not self._closed:
                    self._idle.setdefault(c.address, []).append(c)
                    return
                self._open[c.address] -= 1
        elif self._pid == os.getpid():
            with self._lock:
                self._open[c.address] -= 1
        c.sock.close()

    def _remove_idle(self, which: Callable[[_Conn], bool]) -> list[_Conn]:
        """Take the free sockets ``which`` selects out of the pool (under the
        lock); the caller closes them."""
        out: list[_Conn] = []
        for address, free in self._idle.items():
            gone = [c for c in free if which(c)]
            if gone:
                free[:] = [c for c in free if not which(c)]
                self._open[address] -= len(gone)
                out.extend(gone)
        return out

    def _peer_lost(self, address: str) -> None:
        """A request to ``address`` lost its connection: the peer's other free
        sockets are most likely dead too (a restarted server), so none is reused."""
        if self._pid != os.getpid():
            return
        with self._lock:
            gone = self._remove_idle(lambda c: c.address == address)
        for c in gone:
            c.sock.close()

    def close(self) -> None:
        """Close the free sockets; those in use close when their request ends."""
        self._forget_parents()
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
            for address, conns in idle.items():
                self._open[address] -= len(conns)
        for conns in idle.values():
            for c in conns:
                c.sock.close()

    # ---- connecting ------------------------------------------------------------

    def _connect(self, address: str, fallback: str | None, deadline: _Deadline) -> _Conn:
        try:
            try:
                sock = self._open_socket(address, deadline)
            except OSError as e:
                if isinstance(e, ChainfsError) or fallback is None or e.errno not in UNIX_UNUSABLE:
                    raise
                sock = self._open_socket(fallback, deadline)
        except ChainfsError:
            raise
        except OSError as e:
            raise ChainfsError(
                Code.UNAVAILABLE, f"data plane peer {address} unreachable: {e}"
            ) from None
        c = _Conn(sock, address)
        if self._hello:
            try:
                hdr, header = self._exchange(c, MSG_HELLO, self._hello, None, deadline)
            except BaseException:
                sock.close()
                raise
            if hdr.is_error:
                sock.close()
                raise error_of_reply(hdr.status, header)
        return c

    def _open_socket(self, address: str, deadline: _Deadline) -> socket.socket:
        family, sockaddr = parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            configure_socket(sock, self.config)
            deadline.check()
            sock.settimeout(min(self.timeout_s, self.config.connect_timeout_ms / 1000))
            sock.connect(sockaddr)
            sock.settimeout(self.timeout_s)  # each later operation's bound
        except BaseException:
            sock.close()
            raise
        return sock

    # ---- one request -----------------------------------------------------------

    def request(
        self,
        address: str,
        msg_type: int,
        header: bytes,
        sink: SyncSink | None = None,
        fallback: str | None = None,
    ) -> tuple[FrameHeader, bytes]:
        """Send one request frame (no payload) and read its reply: (fixed header,
        header message). A reply's payload goes into the buffers ``sink`` names
        (None: a reply with a payload is BAD_FRAME). An error reply raises its
        ChainfsError; see the module docstring for the rest. ``fallback``: the
        TCP address to use when the unix socket ``address`` cannot be connected."""
        if len(header) > self.config.max_request_header_bytes:
            raise ChainfsError(Code.E2BIG, f"request header of {len(header)} bytes")
        deadline = _Deadline(self.timeout_s, address)
        c = self._take(address, fallback, deadline)
        whole = False
        try:
            hdr, rsp_header = self._exchange(c, msg_type, header, sink, deadline)
            whole = True
        except ChainfsError as e:
            if e.code == Code.UNAVAILABLE:
                self._peer_lost(address)
            raise
        finally:
            # Only a socket whose reply was read to its end is reused; any
            # exception (a KeyboardInterrupt too) may have left part of one.
            self._give_back(c, whole)
        if hdr.is_error:
            raise error_of_reply(hdr.status, rsp_header)
        return hdr, rsp_header

    def request_many(
        self, requests: Sequence[SyncRequest]
    ) -> list[tuple[FrameHeader, bytes] | ChainfsError]:
        """Several requests at once, each on a socket of its own (two to one
        address take two): every frame is sent before any reply is read, so the
        peers serve them in parallel; then each reply is read in turn. Per
        request its (fixed header, header message) or the ChainfsError that
        :meth:`request` would raise; one failing leaves the others alone. All of
        them share one ``timeout_s`` from the start of the call."""
        deadline = _Deadline(self.timeout_s, requests[0].address if requests else "")
        out: list[tuple[FrameHeader, bytes] | ChainfsError] = []
        sent: list[tuple[int, _Conn, int]] = []  # (index, socket, request id)
        taken: list[_Conn] = []  # every socket taken, given back at the end
        whole: set[int] = set()  # id() of those whose reply was read to its end
        try:
            for r in requests:
                try:
                    if len(r.header) > self.config.max_request_header_bytes:
                        raise ChainfsError(Code.E2BIG, f"request header of {len(r.header)} bytes")
                    c = self._take(r.address, r.fallback, deadline)
                    taken.append(c)
                    sent.append((len(out), c, self._send(c, r.msg_type, r.header)))
                except ChainfsError as e:
                    out.append(e)
                else:
                    out.append(_NO_REPLY)
            for i, c, rid in sent:
                try:
                    hdr, rsp_header = self._receive(c, rid, requests[i].sink, deadline)
                except ChainfsError as e:
                    out[i] = e
                    if e.code == Code.UNAVAILABLE:
                        self._peer_lost(c.address)
                    continue
                whole.add(id(c))
                out[i] = error_of_reply(hdr.status, rsp_header) if hdr.is_error else (
                    hdr, rsp_header)  # fmt: skip
        finally:
            # Only a socket whose reply was read to its end is reused; anything
            # else (a send that failed, a KeyboardInterrupt anywhere) may have
            # left part of a request or a reply on it.
            for c in taken:
                self._give_back(c, id(c) in whole)
        return out

    def _exchange(
        self,
        c: _Conn,
        msg_type: int,
        header: bytes,
        sink: SyncSink | None,
        deadline: _Deadline,
    ) -> tuple[FrameHeader, bytes]:
        return self._receive(c, self._send(c, msg_type, header), sink, deadline)

    def _send(self, c: _Conn, msg_type: int, header: bytes) -> int:
        """Send one request frame (no payload) on ``c``; its request id."""
        rid = c.request_id()
        segs = build_segments(0, msg_type, rid, header, (), self.config.max_payload_bytes)
        try:
            for seg in segs:
                assert isinstance(seg, memoryview)
                c.sock.sendall(seg)
        except TimeoutError:
            raise ChainfsError(
                Code.ETIMEDOUT,
                f"data plane {c.address}: send not done within {self.timeout_s:.3f}s",
            ) from None
        except OSError as e:
            raise ChainfsError(Code.UNAVAILABLE, f"data plane {c.address}: {e}") from None
        return rid

    def _receive(
        self, c: _Conn, rid: int, sink: SyncSink | None, deadline: _Deadline
    ) -> tuple[FrameHeader, bytes]:
        """Read the reply to request ``rid`` from ``c`` to its end."""
        cfg = self.config
        sock = c.sock
        try:
            staging = c.staging
            have = self._recv_at_least(sock, staging, 0, FIXED_HEADER_SIZE, deadline)
            hdr = decode_fixed(staging, 0, cfg.max_header_bytes, cfg.max_payload_bytes)
            if not hdr.is_response or hdr.request_id != rid:
                raise ChainfsError(
                    Code.BAD_FRAME, f"data plane {c.address}: reply to request {hdr.request_id}"
                )
            end = FIXED_HEADER_SIZE + hdr.header_len
            if end <= len(staging):
                have = self._recv_at_least(sock, staging, have, end, deadline)
                rsp_header = bytes(staging[FIXED_HEADER_SIZE:end])
            else:
                big = memoryview(bytearray(hdr.header_len))
                got = have - FIXED_HEADER_SIZE
                big[:got] = staging[FIXED_HEADER_SIZE:have]
                self._recv_at_least(sock, big, got, hdr.header_len, deadline)
                rsp_header, have, end = bytes(big), 0, 0
            extra = have - end  # payload bytes that came with the header
            n = hdr.payload_len
            if extra > n:
                raise ChainfsError(Code.BAD_FRAME, f"data plane {c.address}: bytes after a reply")
            if n:
                if hdr.is_error or sink is None:
                    raise ChainfsError(
                        Code.BAD_FRAME, f"data plane {c.address}: unexpected reply payload"
                    )
                self._receive_payload(sock, sink(hdr.msg_type, rsp_header), staging[end:have], n,
                                      deadline)  # fmt: skip
        except TimeoutError:
            raise ChainfsError(
                Code.ETIMEDOUT, f"data plane {c.address}: no reply within {deadline.timeout_s:.3f}s"
            ) from None
        except ChainfsError:
            raise
        except OSError as e:
            raise ChainfsError(Code.UNAVAILABLE, f"data plane {c.address}: {e}") from None
        return hdr, rsp_header

    @staticmethod
    def _recv_at_least(
        sock: socket.socket, buf: memoryview, have: int, want: int, deadline: _Deadline
    ) -> int:
        """Receive into ``buf[have:]`` until at least ``want`` bytes are there; the count."""
        while have < want:
            deadline.check()
            n = sock.recv_into(buf[have:])
            if n == 0:
                raise ChainfsError(Code.UNAVAILABLE, "data plane: connection closed mid-reply")
            have += n
        return have

    def _receive_payload(
        self,
        sock: socket.socket,
        buffers: Sequence[memoryview],
        early: memoryview,
        n: int,
        deadline: _Deadline,
    ) -> None:
        """The ``n`` payload bytes into ``buffers`` in order: ``early`` (already
        received) copied, the rest received straight into them, many buffers
        per system call (a batched read's reply is many small values)."""
        views = [as_byte_view(b) for b in buffers]
        if sum(len(v) for v in views) < n or any(v.readonly for v in views):
            raise ChainfsError(Code.EINVAL, f"sink has no room for a {n}-byte payload")
        left = n
        rest: list[memoryview] = []  # what is still to receive, in order
        for v in views:
            if not left:
                break
            take = min(len(v), left)
            k = min(take, len(early))
            if k:
                v[:k] = early[:k]
                early = early[k:]
            if take > k:
                rest.append(v[k:take])
            left -= take
        first = 0
        while first < len(rest):
            deadline.check()
            got = sock.recvmsg_into(rest[first : first + _IOV_MAX])[0]
            if got == 0:
                raise ChainfsError(Code.UNAVAILABLE, "data plane: connection closed mid-reply")
            while got and got >= len(rest[first]):  # drop what is filled
                got -= len(rest[first])
                first += 1
            if got:
                rest[first] = rest[first][got:]
