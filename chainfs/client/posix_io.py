"""fallocate and advisory locks for the file API and the FUSE mount.

fallocate: meta checks the mode and sets the length (see FallocateReq); a
punched hole is then dropped here: chunks wholly inside it are removed from
their chains, the partial chunks at its ends are overwritten with zeros. The
hole stops at the file's length (KEEP_SIZE: the length never changes).

Locks: meta keeps them (chainfs.meta_service.ops.locks); :class:`LockWaiter`
tries a lock and, when it is taken and the caller may wait, asks again with
doubling pauses (``lock_poll_initial_ms`` .. ``lock_poll_max_ms``) until it
is granted, the optional deadline passes (EAGAIN) or the waiting task is
cancelled (the caller sees EINTR where it came from a signal).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import time
from dataclasses import dataclass

from chainfs.client.chunk_io import ChunkIO, OpenHandle
from chainfs.client.layout import Layout, split
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import FALLOC_FL_PUNCH_HOLE, LOCK_EOF
from chainfs.proto import meta_pb2 as mt

# Owner numbers of the file API's locks: one per open file, unique in the process.
_owners = itertools.count(1)

LOCK_KINDS = {"posix": mt.POSIX, "flock": mt.FLOCK}


async def fallocate(
    io: ChunkIO, handle: OpenHandle, mode: int, offset: int, length: int
) -> mt.Inode:
    """fallocate(2) of an open file (``handle.size`` is updated)."""
    inode = await io.meta.fallocate(handle.inode, mode, offset, length)
    if mode & FALLOC_FL_PUNCH_HOLE:
        await punch_hole(io, handle, offset, min(offset + length, inode.size))
    handle.size = inode.size
    return inode


async def punch_hole(io: ChunkIO, handle: OpenHandle, start: int, end: int) -> None:
    """Make bytes [start, end) read as zeros."""
    if end <= start:
        return
    layout = handle.layout
    cs = layout.chunk_size
    first_whole, end_whole = -(-start // cs), end // cs
    if first_whole >= end_whole:  # inside one chunk, or across one boundary only
        await _zero(io, handle, layout, start, end)
        return
    await _zero(io, handle, layout, start, first_whole * cs)
    await _zero(io, handle, layout, end_whole * cs, end)
    sem = asyncio.Semaphore(io.config.storage.max_parallel_nodes)

    async def remove(chain: int) -> None:
        async with sem:
            await io.storage.remove_chunks(chain, handle.inode, first_whole, end_whole)

    await asyncio.gather(*(remove(c) for c in set(layout.chains)))


async def _zero(io: ChunkIO, handle: OpenHandle, layout: Layout, start: int, end: int) -> None:
    pieces = split(layout, start, end - start) if end > start else []
    await asyncio.gather(*(io.write_piece(handle, p, bytearray(p.length)) for p in pieces))


@dataclass(frozen=True)
class LockInfo:
    """A lock in the way (F_GETLK): its type, range and holder's pid."""

    exclusive: bool
    start: int
    length: int  # 0: to the end of the file
    pid: int


def lock_range(exclusive: bool | None, start: int, length: int) -> mt.LockRange:
    """fcntl's (start, length; 0 = to the end) as meta's half-open range;
    ``exclusive`` None is an unlock."""
    if start < 0 or length < 0:
        raise ChainfsError(Code.EINVAL, f"lock range start {start}, length {length}")
    type_ = mt.UNLOCK if exclusive is None else mt.WRITE if exclusive else mt.READ
    end = LOCK_EOF if length == 0 else start + length
    return mt.LockRange(type=type_, start=start, end=end)


def lock_info(conflict: mt.LockHolder) -> LockInfo:
    r = conflict.range
    length = 0 if r.end == LOCK_EOF else r.end - r.start
    return LockInfo(r.type == mt.WRITE, r.start, length, conflict.pid)


class LockWaiter:
    """Takes meta locks for one owner, waiting (polling) when asked to."""

    def __init__(self, io: ChunkIO, ino: int, owner: int | None = None) -> None:
        self.io = io
        self.ino = ino
        self.owner = next(_owners) if owner is None else owner
        self.kinds_used: set[mt.LockKind.ValueType] = set()

    async def lock(
        self,
        kind: mt.LockKind.ValueType,
        want: mt.LockRange,
        wait: bool,
        timeout_s: float | None = None,
        pid: int | None = None,
    ) -> mt.LockRsp:
        """One try, or (``wait``) tries until granted; EAGAIN when not granted."""
        pid = os.getpid() if pid is None else pid
        cfg = self.io.config
        pause_s = cfg.lock_poll_initial_ms / 1000
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            rsp = await self.io.meta.lock(self.ino, kind, want, self.owner, pid)
            if rsp.granted:
                self.kinds_used.add(kind)
                return rsp
            left = None if deadline is None else deadline - time.monotonic()
            if not wait or (left is not None and left <= 0):
                raise BlockingIOError(
                    errno.EAGAIN, f"inode {self.ino}: lock held by pid {rsp.conflict.pid}"
                )
            await asyncio.sleep(pause_s if left is None else min(pause_s, left))
            pause_s = min(pause_s * 2, cfg.lock_poll_max_ms / 1000)

    async def test(self, kind: mt.LockKind.ValueType, want: mt.LockRange) -> LockInfo | None:
        rsp = await self.io.meta.lock(self.ino, kind, want, self.owner, os.getpid(), test=True)
        return None if rsp.granted else lock_info(rsp.conflict)

    async def release_all(self) -> None:
        """Drop every lock this owner took (at close)."""
        everything = mt.LockRange(type=mt.UNLOCK, start=0, end=LOCK_EOF)
        for kind in sorted(self.kinds_used):
            await self.io.meta.lock(self.ino, kind, everything, self.owner)
        self.kinds_used.clear()
