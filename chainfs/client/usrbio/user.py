"""The user side of the shared-memory path: register buffers, submit batches, wait.

    agent = chainfs.usrbio.connect()                 # $CHAINFS_AGENT_SOCKET or the default
    buf = agent.register_buffer(64 << 20)            # memfd shared with the agent's workers
    t = agent.submit([("/data/a", 0, 1 << 20, buf, 0), ...])
    for c in agent.wait(t): ...                      # Completion(nbytes, errno, message)
    x = buf.tensor(torch.float16)                    # torch.frombuffer over the same memory

A buffer is a memfd mapped here and, after REGISTER (the fd travels with
SCM_RIGHTS), in every worker of the agent; the workers read file bytes
straight into it. A batch is split by bytes over the workers; its ticket
completes when every worker has answered. Requests and answers are small
frames on unix sockets (one per worker); the bytes never cross them.

Failure: when the agent dies, the call that notices raises ConnectionError
(ECONNRESET) and batches in flight are lost (their tickets raise the same);
the next call reconnects and registers the buffers again (they stay valid:
this process holds their memory). When this process dies, its sockets close
and the agent unmaps its buffers.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import mmap
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from chainfs.client.usrbio import wire
from chainfs.client.usrbio.config import AgentConfig, default_socket_path
from chainfs.client.usrbio.wire import Completion, Entry, Frame

_RECV_BYTES = 256 * 1024
_STAT_SUMS = (
    "connections",
    "buffers",
    "buffer_bytes",
    "batches",
    "reads",
    "bytes_read",
    "read_errors",
)


class ReadRequest(NamedTuple):
    """Read ``length`` bytes of ``file`` (a path or an inode number) at ``offset``
    into ``buffer`` at ``buffer_offset``."""

    file: str | int
    offset: int
    length: int
    buffer: SharedBuffer
    buffer_offset: int = 0


class SharedBuffer:
    """Memory shared with the agent's workers (a memfd mapped in both processes)."""

    def __init__(self, client: AgentClient, buffer_id: int, size: int) -> None:
        self.id = buffer_id
        self.size = size
        self._client = client
        self.fd = os.memfd_create(f"chainfs-usrbio-{buffer_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._mm)
        self.closed = False

    def numpy(self, dtype: Any = "uint8") -> Any:
        """A numpy array over the whole buffer (no copy)."""
        import numpy as np

        return np.frombuffer(self._mm, dtype=dtype)

    def tensor(self, dtype: Any = None) -> Any:
        """A CPU torch tensor over the whole buffer (no copy); uint8 unless ``dtype``."""
        import torch

        return torch.frombuffer(self._mm, dtype=dtype or torch.uint8)

    def close(self) -> None:
        """Unregister from the agent and unmap (arrays over it keep the memory alive)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._client._unregister(self)
        finally:
            self.view.release()
            os.close(self.fd)
            try:
                self._mm.close()
            except BufferError:  # numpy arrays / tensors still use it: unmapped with them
                pass

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<chainfs.usrbio.SharedBuffer id={self.id} size={self.size}>"


@dataclass
class Ticket:
    """A submitted batch: which entries went to which worker."""

    id: int
    entries: int
    parts: list[tuple[int, list[int]]]
    session: int  # the connection it was sent on


@dataclass
class _Session:
    """Sockets to every worker of one agent incarnation."""

    number: int
    socks: list[socket.socket]
    parsers: list[wire.FrameParser]
    stash: list[dict[tuple[int, int], Frame]] = field(default_factory=list)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def socket_error(path: str, e: OSError) -> ConnectionError:
    """The error a user gets when no agent answers at ``path``."""
    return ConnectionError(
        errno.ECONNREFUSED,
        f"no chainfs agent at {path} ({e.strerror or e}); start one with "
        "'chainfs agent --address HOST:PORT'",
    )


class AgentClient:
    """A connection to the I/O agent of this host (thread-safe)."""

    def __init__(self, path: str, config: AgentConfig) -> None:
        config.validate()
        self.path = path
        self.config = config
        self._send_lock = threading.Lock()  # taken before _recv_lock when both are needed
        self._recv_lock = threading.Lock()
        self._session: _Session | None = None
        self._sessions = itertools.count(1)
        self._buffer_ids = itertools.count(1)
        self._tickets = itertools.count(1)
        self._buffers: dict[int, SharedBuffer] = {}
        self._pid = os.getpid()
        self._closed = False
        with self._send_lock, self._recv_lock:
            self._connected()

    # -- connection --------------------------------------------------------------
    def _connected(self) -> _Session:
        """The live session, connecting (and registering every buffer) when there is none."""
        if self._closed:
            raise ValueError("I/O operation on a closed chainfs agent connection")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "a chainfs agent connection cannot cross fork(): connect in the child"
            )
        if self._session is None:
            self._session = self._connect()
        return self._session

    def _connect(self) -> _Session:
        timeout_s = self.config.reply_timeout_ms / 1000
        try:
            hello = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            hello.settimeout(timeout_s)
            with hello:
                hello.connect(self.path)
                hello.sendall(wire.frame(wire.HELLO, 0))
                info = json.loads(_recv_one(hello, self.config.max_frame_bytes).payload)
            socks = []
            for p in info["workers"]:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(s)
                s.settimeout(timeout_s)
                s.connect(p)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise socket_error(self.path, e) from None
        except OSError as e:
            raise ConnectionError(errno.ECONNRESET, f"chainfs agent at {self.path}: {e}") from None
        n = len(socks)
        parsers = [wire.FrameParser(self.config.max_frame_bytes) for _ in range(n)]
        session = _Session(next(self._sessions), socks, parsers, [{} for _ in range(n)])
        try:
            for buf in self._buffers.values():
                self._register_on(session, buf)
        except BaseException:
            session.close()
            raise
        return session

    def _broken(self, session: _Session, e: BaseException) -> ConnectionError:
        """Drop ``session``; the error to raise (the next call reconnects)."""
        session.close()
        if self._session is session:
            self._session = None
        return ConnectionError(
            errno.ECONNRESET,
            f"lost the chainfs agent at {self.path} ({e}); batches in flight are lost, "
            "the next call reconnects",
        )

    def _send(
        self, session: _Session, worker: int, data: bytes, fds: list[int] | None = None
    ) -> None:
        try:
            if fds:
                socket.send_fds(session.socks[worker], [data], fds)
            else:
                session.socks[worker].sendall(data)
        except OSError as e:
            raise self._broken(session, e) from None

    def _recv(self, session: _Session, worker: int, ftype: int, tag: int) -> Frame:
        """The answer of type ``ftype`` and tag ``tag`` from ``worker`` (others are kept)."""
        stash = session.stash[worker]
        while (ftype, tag) not in stash:
            try:
                data = session.socks[worker].recv(_RECV_BYTES)
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "connection closed by the agent")
                frames = session.parsers[worker].feed(data, [])
            except TimeoutError:
                raise self._broken(session, TimeoutError("no answer in time")) from None
            except OSError as e:
                raise self._broken(session, e) from None
            for f in frames:
                stash[(f.type, f.tag)] = f
        return stash.pop((ftype, tag))

    def _call_all(self, ftype: int, tag: int, payload: bytes = b"") -> list[Frame]:
        """Send one request to every worker and collect the answers (both locks held)."""
        session = self._connected()
        for w in range(len(session.socks)):
            self._send(session, w, wire.frame(ftype, tag, payload))
        return [self._recv(session, w, ftype, tag) for w in range(len(session.socks))]

    # -- buffers -----------------------------------------------------------------
    def register_buffer(self, size: int) -> SharedBuffer:
        """A new shared buffer of ``size`` bytes, registered with every worker."""
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"buffer size must be a positive int, not {size!r}")
        total = sum(b.size for b in self._buffers.values()) + size
        if (
            len(self._buffers) >= self.config.max_buffers
            or total > self.config.max_buffer_bytes_total
        ):
            raise OSError(errno.ENOBUFS, "shared buffers over the configured bound (AgentConfig)")
        with self._send_lock, self._recv_lock:
            session = self._connected()
            buf = SharedBuffer(self, next(self._buffer_ids), size)
            try:
                self._register_on(session, buf)
            except BaseException:
                buf.closed = True
                buf.view.release()
                buf._mm.close()
                os.close(buf.fd)
                raise
            self._buffers[buf.id] = buf
        return buf

    def _register_on(self, session: _Session, buf: SharedBuffer) -> None:
        for w in range(len(session.socks)):
            self._send(
                session, w, wire.frame(wire.REGISTER, buf.id, wire.SIZE.pack(buf.size)), [buf.fd]
            )
        for w in range(len(session.socks)):
            (status,) = wire.STATUS.unpack(self._recv(session, w, wire.REGISTER, buf.id).payload)
            if status:
                raise OSError(status, f"the chainfs agent refused a {buf.size}-byte buffer")

    def _unregister(self, buf: SharedBuffer) -> None:
        with self._send_lock, self._recv_lock:
            self._buffers.pop(buf.id, None)
            if self._session is None or self._closed:
                return  # nothing registered now
            for f in self._call_all(wire.UNREGISTER, buf.id):
                (status,) = wire.STATUS.unpack(f.payload)
                if status == errno.EBUSY:
                    raise OSError(status, "buffer still has reads in flight: wait for them first")

    # -- batches -----------------------------------------------------------------
    def submit(self, batch: Sequence[ReadRequest | tuple[Any, ...]]) -> Ticket:
        """Send a batch of reads; wait for it with :meth:`wait`."""
        entries = [self._entry(ReadRequest(*r)) for r in batch]
        if len(entries) > self.config.max_batch_entries:
            raise ValueError(
                f"{len(entries)} reads over max_batch_entries={self.config.max_batch_entries}"
            )
        with self._send_lock:
            session = self._connected()
            parts = _split([e.length for e in entries], len(session.socks))
            ticket = Ticket(next(self._tickets), len(entries), parts, session.number)
            frames = [
                wire.frame(wire.BATCH, ticket.id, wire.encode_batch([entries[i] for i in idx]))
                for _w, idx in parts
            ]
            if any(len(f) > self.config.max_frame_bytes for f in frames):
                raise ValueError("batch too large for one frame: fewer reads or shorter paths")
            for (w, _idx), f in zip(parts, frames, strict=True):
                self._send(session, w, f)
        return ticket

    def _entry(self, r: ReadRequest) -> Entry:
        buf = r.buffer
        if not isinstance(buf, SharedBuffer) or buf._client is not self or buf.closed:
            raise ValueError("a read's buffer must be an open SharedBuffer of this connection")
        if min(r.offset, r.length, r.buffer_offset) < 0:
            raise ValueError(f"negative offset or length in {r[:3]}")
        if r.buffer_offset + r.length > buf.size:
            raise ValueError(
                f"read of {r.length} bytes at {r.buffer_offset} overruns a {buf.size}-byte buffer"
            )
        if isinstance(r.file, int):
            if r.file <= 0:
                raise ValueError(f"bad inode number {r.file}")
            return Entry(buf.id, r.buffer_offset, r.offset, r.length, r.file, b"")
        path = os.fsencode(r.file)
        if not path.startswith(b"/") or len(path) > wire.MAX_PATH_BYTES:
            raise ValueError(
                f"chainfs paths are absolute and at most {wire.MAX_PATH_BYTES} bytes: {r.file!r}"
            )
        return Entry(buf.id, r.buffer_offset, r.offset, r.length, 0, path)

    def wait(self, ticket: Ticket, timeout_s: float | None = None) -> list[Completion]:
        """The batch's results in request order (a failed read has its errno)."""
        with self._recv_lock:
            session = self._session
            if session is None or session.number != ticket.session:
                raise ConnectionError(
                    errno.ECONNRESET,
                    f"the connection to the chainfs agent at {self.path} was lost before "
                    "this batch completed; submit it again",
                )
            results: list[Completion] = [Completion(0)] * ticket.entries
            for w, idx in ticket.parts:
                if timeout_s is not None:
                    session.socks[w].settimeout(timeout_s)
                try:
                    f = self._recv(session, w, wire.BATCH, ticket.id)
                finally:
                    if timeout_s is not None and self._session is session:
                        session.socks[w].settimeout(self.config.reply_timeout_ms / 1000)
                got = wire.decode_results(f.payload)
                if len(got) != len(idx):
                    raise self._broken(session, ValueError("answer does not match the batch"))
                for i, c in zip(idx, got, strict=True):
                    results[i] = c
        return results

    def read(self, batch: Sequence[ReadRequest | tuple[Any, ...]]) -> list[Completion]:
        """submit + wait."""
        return self.wait(self.submit(batch))

    async def wait_async(self, ticket: Ticket, timeout_s: float | None = None) -> list[Completion]:
        """:meth:`wait` for coroutines (waits in a thread; the event loop keeps running)."""
        return await asyncio.to_thread(self.wait, ticket, timeout_s)

    async def read_async(self, batch: Sequence[ReadRequest | tuple[Any, ...]]) -> list[Completion]:
        return await self.wait_async(self.submit(batch))

    def read_ranges_into(
        self,
        ranges: Sequence[tuple[str | int, int, int]],
        buffer: SharedBuffer,
        buffer_offset: int = 0,
    ) -> list[memoryview]:
        """Read (file, offset, length) ranges one after another into ``buffer``;
        views of what each read (short at end of file). OSError of the first failure."""
        reqs: list[ReadRequest] = []
        at = buffer_offset
        for file, offset, length in ranges:
            if length is None or length < 0:
                raise ValueError("read_ranges_into needs a length for every range")
            reqs.append(ReadRequest(file, offset, length, buffer, at))
            at += length
        results = self.read(reqs)
        for req, c in zip(reqs, results, strict=True):
            if not c.ok:
                raise c.error(str(req.file))
        return [
            buffer.view[r.buffer_offset : r.buffer_offset + c.nbytes]
            for r, c in zip(reqs, results, strict=True)
        ]

    # -- stats and close ---------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The agent's counters: per worker, and summed (``buffers``, ``buffer_bytes``, ...)."""
        with self._send_lock, self._recv_lock:
            workers = [json.loads(f.payload) for f in self._call_all(wire.STATS, 0)]
        out: dict[str, Any] = {k: sum(w[k] for w in workers) for k in _STAT_SUMS}
        out["workers"] = workers
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the sockets (the agent unmaps this connection's buffers) and the buffers."""
        with self._send_lock, self._recv_lock:
            if self._closed:
                return
            self._closed = True
            if self._session is not None:
                self._session.close()
                self._session = None
        for buf in list(self._buffers.values()):
            buf.close()
        self._buffers.clear()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<chainfs.usrbio.AgentClient {self.path!r} buffers={len(self._buffers)}>"


def _recv_one(sock: socket.socket, max_frame_bytes: int) -> Frame:
    parser = wire.FrameParser(max_frame_bytes)
    while True:
        data = sock.recv(_RECV_BYTES)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed by the agent")
        frames = parser.feed(data, [])
        if frames:
            return frames[0]


def _split(lengths: list[int], workers: int) -> list[tuple[int, list[int]]]:
    """Contiguous runs of entries, about the same bytes each, one run per worker."""
    total = sum(lengths)
    parts: list[tuple[int, list[int]]] = []
    run: list[int] = []
    done = 0
    w = 0
    for i, n in enumerate(lengths):
        run.append(i)
        done += n
        if w < workers - 1 and done * workers >= total * (w + 1):
            parts.append((w, run))
            run, w = [], w + 1
    if run or not parts:
        parts.append((w, run))
    return parts


def connect(socket: str | None = None, config: AgentConfig | None = None) -> AgentClient:
    """Connect to this host's agent at ``socket`` (default $CHAINFS_AGENT_SOCKET or
    a per-user runtime path); ConnectionError (ECONNREFUSED) when none answers."""
    return AgentClient(socket or default_socket_path(), config or AgentConfig())
