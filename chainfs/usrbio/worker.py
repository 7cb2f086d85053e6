"""One worker process of the I/O agent: its own cluster connection, reads into users' shared memory.

A user connects to every worker's socket, registers its shared buffers (a
memfd each, passed with SCM_RIGHTS and mapped here) and sends batches of
reads. The worker looks the files up in one meta batch, then reads every
piece with the chunk engine straight into the mapped buffer (no copy through
this process or the user's) and answers with one result per read. A closed
connection (the user exited or died) unmaps its buffers, so their memory
returns to the system once the user's own mapping is gone too.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from chainfs.client.aio_fs import AsyncFileSystem
from chainfs.client.chunk_io import ChunkIO, ReadWork
from chainfs.client.layout import layout_of, normpath, split
from chainfs.client.usrbio import wire
from chainfs.client.usrbio.config import AgentConfig
from chainfs.client.usrbio.wire import Completion, Entry, Frame, FrameError
from chainfs.common.auth.capability import READ
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.process import run_service
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as mt

log = logging.getLogger(__name__)

_RECV_BYTES = 256 * 1024  # one recvmsg; frames larger than this arrive in several
_MAX_FDS_PER_RECV = 16


@dataclass
class _Buffer:
    mm: mmap.mmap
    view: memoryview
    pins: int = 0  # batches reading into it now

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:  # a cancelled read still holds a slice: unmapped when it drops it
            log.warning("shared buffer still referenced at close; unmapped when released")


@dataclass(eq=False)  # a connection is itself: hashed by identity
class _Conn:
    sock: socket.socket
    parser: wire.FrameParser
    user: UserInfo
    buffers: dict[int, _Buffer] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    paused: bool = False
    closed: bool = False

    @property
    def buffer_bytes(self) -> int:
        return sum(len(b.view) for b in self.buffers.values())


@dataclass
class _Counters:
    batches: int = 0
    reads: int = 0
    bytes_read: int = 0
    read_errors: int = 0


class Worker:
    """Serves user connections on one unix socket with one cluster connection."""

    def __init__(self, index: int, fs: AsyncFileSystem, config: AgentConfig) -> None:
        self.index = index
        self.fs = fs
        self.config = config
        self._conns: set[_Conn] = set()
        self._counts = _Counters()
        self._releases: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    @property
    def io(self) -> ChunkIO:
        return self.fs.io

    def stats(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "pid": os.getpid(),
            "connections": len(self._conns),
            "buffers": sum(len(c.buffers) for c in self._conns),
            "buffer_bytes": sum(c.buffer_bytes for c in self._conns),
            **self._counts.__dict__,
        }

    # -- connections -----------------------------------------------------------
    def listen(self, path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(128)
        lsock.setblocking(False)
        self._loop.add_reader(lsock.fileno(), self._accept, lsock)
        return lsock

    def _accept(self, lsock: socket.socket) -> None:
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._conns) >= self.config.max_connections:
            log.warning(
                "worker %d: %d connections, refusing one more", self.index, len(self._conns)
            )
            sock.close()
            return
        sock.setblocking(False)
        _pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        conn = _Conn(sock, wire.FrameParser(self.config.max_frame_bytes), UserInfo(uid, gid))
        self._conns.add(conn)
        self._loop.add_reader(sock.fileno(), self._readable, conn)

    def _readable(self, conn: _Conn) -> None:
        fds = array.array("i")
        try:
            data, anc, _flags, _addr = conn.sock.recvmsg(
                _RECV_BYTES, socket.CMSG_SPACE(_MAX_FDS_PER_RECV * fds.itemsize)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        try:
            if not data:
                raise FrameError(errno.ECONNRESET, "closed by the user")
            frames = conn.parser.feed(data, list(fds))
        except FrameError as e:
            for fd in fds:
                os.close(fd)
            self._drop(conn, str(e))
            return
        for f in frames:
            self._start(conn, f)

    def _start(self, conn: _Conn, f: Frame) -> None:
        task = asyncio.ensure_future(self._serve(conn, f))
        conn.tasks.add(task)
        task.add_done_callback(lambda t: self._done(conn, t))
        if len(conn.tasks) >= self.config.max_inflight_batches and not conn.paused:
            conn.paused = True  # back-pressure: read no more of this socket for now
            self._loop.remove_reader(conn.sock.fileno())

    def _done(self, conn: _Conn, task: asyncio.Task[None]) -> None:
        conn.tasks.discard(task)
        if conn.paused and not conn.closed and len(conn.tasks) < self.config.max_inflight_batches:
            conn.paused = False
            self._loop.add_reader(conn.sock.fileno(), self._readable, conn)

    def _drop(self, conn: _Conn, why: str) -> None:
        """Forget a connection: stop its batches, unmap its buffers."""
        if conn.closed:
            return
        conn.closed = True
        log.info("worker %d: connection closed (%s)", self.index, why)
        if not conn.paused:
            self._loop.remove_reader(conn.sock.fileno())
        for t in list(conn.tasks):
            t.cancel()
        conn.parser.close_fds()
        task = asyncio.ensure_future(self._release(conn))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, conn: _Conn) -> None:
        if conn.tasks:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        for buf in conn.buffers.values():
            buf.close()
        conn.buffers.clear()
        conn.sock.close()
        self._conns.discard(conn)

    async def close(self) -> None:
        """Drop every connection and wait until their buffers are unmapped."""
        for conn in list(self._conns):
            self._drop(conn, "worker stopping")
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)

    async def _send(self, conn: _Conn, data: bytes) -> None:
        async with conn.send_lock:  # frames of concurrent answers must not interleave
            await self._loop.sock_sendall(conn.sock, data)

    # -- requests --------------------------------------------------------------
    async def _serve(self, conn: _Conn, f: Frame) -> None:
        try:
            if f.type == wire.BATCH:
                entries = wire.decode_batch(f.payload, self.config.max_batch_entries)
                results = await self._read_batch(conn, entries)
                payload = wire.encode_results(results)
            elif f.type == wire.REGISTER:
                payload = wire.STATUS.pack(self._register(conn, f))
            elif f.type == wire.UNREGISTER:
                payload = wire.STATUS.pack(self._unregister(conn, f.tag))
            elif f.type == wire.STATS:
                payload = wire.json_payload(self.stats())
            else:
                raise FrameError(errno.EPROTO, f"unknown frame type {f.type}")
            await self._send(conn, wire.frame(f.type, f.tag, payload))
        except FrameError as e:
            self._drop(conn, str(e))
        except OSError as e:  # the socket broke while answering
            self._drop(conn, f"send failed: {e}")
        except Exception as e:  # a bug here: the user gets a reset now, not a timeout later
            log.exception("worker %d: request of type %d failed", self.index, f.type)
            self._drop(conn, f"internal error: {e!r}")

    def _register(self, conn: _Conn, f: Frame) -> int:
        fd = f.fds[0] if f.fds else -1
        try:
            if fd < 0 or len(f.payload) != wire.SIZE.size:
                return errno.EINVAL
            (size,) = wire.SIZE.unpack(f.payload)
            if f.tag in conn.buffers:
                return errno.EEXIST
            if len(conn.buffers) >= self.config.max_buffers:
                return errno.ENOBUFS
            if size <= 0 or conn.buffer_bytes + size > self.config.max_buffer_bytes_total:
                return errno.ENOBUFS if size > 0 else errno.EINVAL
            if os.fstat(fd).st_size < size:
                return errno.EINVAL
            mm = mmap.mmap(fd, size)
        except OSError as e:
            return e.errno or errno.EIO
        finally:
            if fd >= 0:
                os.close(fd)  # the mapping keeps the memory
        conn.buffers[f.tag] = _Buffer(mm, memoryview(mm))
        return 0

    def _unregister(self, conn: _Conn, buffer_id: int) -> int:
        buf = conn.buffers.get(buffer_id)
        if buf is None:
            return errno.ENOENT
        if buf.pins:
            return errno.EBUSY
        del conn.buffers[buffer_id]
        buf.close()
        return 0

    async def _read_batch(self, conn: _Conn, entries: list[Entry]) -> list[Completion]:
        """Read every entry into its buffer; one result per entry, in order."""
        self._counts.batches += 1
        results: list[Completion | None] = [self._check(conn, e) for e in entries]
        inodes = await self._lookup(conn, entries, results)
        per_entry: dict[int, list[ReadWork]] = {}
        for i, e in enumerate(entries):
            if results[i] is None:
                results[i], per_entry[i] = self._plan(conn, e, inodes[_target(e)])
        pinned = [conn.buffers[entries[i].buffer_id] for i in per_entry]
        for b in pinned:
            b.pins += 1
        try:
            await self._read(per_entry, results)
        finally:
            for b in pinned:
                b.pins -= 1
        done = [r for r in results if r is not None]
        assert len(done) == len(entries)
        self._counts.reads += len(done)
        self._counts.bytes_read += sum(r.nbytes for r in done)
        self._counts.read_errors += sum(1 for r in done if not r.ok)
        return done

    def _check(self, conn: _Conn, e: Entry) -> Completion | None:
        """The entry's failure when it is malformed (checked again here: users are not trusted)."""
        buf = conn.buffers.get(e.buffer_id)
        if buf is None:
            return Completion(0, errno.EBADF, f"buffer {e.buffer_id} is not registered")
        if e.buffer_offset + e.length > len(buf.view):
            return Completion(0, errno.EINVAL, "read runs past the end of its buffer")
        if not e.inode and not e.path:
            return Completion(0, errno.EINVAL, "neither a path nor an inode")
        return None

    async def _lookup(
        self, conn: _Conn, entries: list[Entry], results: list[Completion | None]
    ) -> dict[int | str, mt.Inode | OSError]:
        """Each named file's inode (or its error), in batches of meta's bound."""
        out: dict[int | str, mt.Inode | OSError] = {}
        todo: list[int | str] = []
        for e, r in zip(entries, results, strict=True):
            key = _target(e)
            if r is not None or key in out or key in todo:
                continue
            if isinstance(key, str):
                try:
                    normpath(key)
                except (OSError, ValueError) as err:
                    out[key] = err if isinstance(err, OSError) else OSError(errno.EINVAL, str(err))
                    continue
            todo.append(key)
        step = self.io.config.batch_stat_paths
        for lo in range(0, len(todo), step):
            keys = todo[lo : lo + step]
            ats = [k if isinstance(k, int) else normpath(k) for k in keys]
            try:
                # As the user: meta grants READ capabilities only for what they may read.
                got = await self.io.meta.batch_stat_caps(ats, user=conn.user, want_capability=READ)
                found: list[Any] = [self._granted(r) for r in got]
            except OSError as err:  # meta unreachable: every read of this step fails with it
                found = [err] * len(keys)
            out.update(zip(keys, found, strict=True))
        return out

    def _granted(
        self, found: tuple[mt.Inode, cpb.Capability | None] | ChainfsError
    ) -> mt.Inode | OSError:
        """The inode, or EACCES for a regular file meta granted this user no READ
        capability for (in a cluster that signs them; storage would refuse the read)."""
        if isinstance(found, ChainfsError):
            return found
        inode, cap = found
        if cap is None and inode.type == mt.FILE and self.io.caps_signed:
            return ChainfsError(Code.EACCES, f"no read permission on inode {inode.ino}")
        return inode

    @staticmethod
    def _plan(
        conn: _Conn, e: Entry, inode: mt.Inode | OSError
    ) -> tuple[Completion, list[ReadWork]]:
        """The entry's result if its pieces read well, and those pieces."""
        if isinstance(inode, OSError):
            return _failed(inode), []
        if inode.type == mt.DIRECTORY:
            return Completion(0, errno.EISDIR, "is a directory"), []
        if inode.type != mt.FILE:
            return Completion(0, errno.EINVAL, "not a regular file"), []
        n = max(0, min(e.length, inode.size - e.offset))
        if n == 0:
            return Completion(0), []
        view = conn.buffers[e.buffer_id].view
        dest = view[e.buffer_offset : e.buffer_offset + n]
        try:
            layout = layout_of(inode)
        except OSError as err:
            return _failed(err), []
        return Completion(n), [(inode.ino, layout, p, dest) for p in split(layout, e.offset, n)]

    async def _read(
        self, per_entry: dict[int, list[ReadWork]], results: list[Completion | None]
    ) -> None:
        """All pieces in one parallel call; after a failure, entry by entry to tell which."""
        try:
            await self.io.read_pieces([w for work in per_entry.values() for w in work])
            return
        except OSError:
            pass
        indices = list(per_entry)
        outcomes = await asyncio.gather(
            *(self.io.read_pieces(per_entry[i]) for i in indices), return_exceptions=True
        )
        for i, outcome in zip(indices, outcomes, strict=True):
            if isinstance(outcome, OSError):
                results[i] = _failed(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome


def _target(e: Entry) -> int | str:
    return e.inode if e.inode else os.fsdecode(e.path)


def _failed(err: OSError) -> Completion:
    message = getattr(err, "message", None) or err.strerror or str(err)
    return Completion(0, err.errno or errno.EIO, message)


# -- the worker process ----------------------------------------------------------
def worker_main(
    index: int, address: str, path: str, config: AgentConfig, parent: Connection
) -> None:
    """Entry point of a worker process (spawned by the agent)."""
    logging.basicConfig(level=logging.INFO, format=f"agent worker {index}: %(message)s")
    run_service(lambda stop: _run(index, address, path, config, parent, stop))


async def _run(
    index: int,
    address: str,
    path: str,
    config: AgentConfig,
    parent: Connection,
    stop: asyncio.Event,
) -> None:
    try:
        fs = await AsyncFileSystem.connect(address)
    except (OSError, ValueError) as e:
        parent.send(("error", f"worker {index} cannot connect to {address}: {e}"))
        return
    worker = Worker(index, fs, config)
    lsock = worker.listen(path)
    loop = asyncio.get_running_loop()
    # The agent holds the other end of this pipe: when it dies, so do we.
    on_parent: Callable[[], None] = stop.set
    loop.add_reader(parent.fileno(), on_parent)
    parent.send(("ready", os.getpid()))
    try:
        await stop.wait()
    finally:
        loop.remove_reader(parent.fileno())
        loop.remove_reader(lsock.fileno())
        lsock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await worker.close()
        await fs.close()
