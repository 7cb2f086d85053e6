"""FUSE handlers of advisory locks (fcntl, flock) and fallocate.

pyfuse3 does not route these requests: :mod:`chainfs.fuse_mount.kernel_bridge`
delivers them here. Locks are kept by meta under this mount's client id and
the kernel's lock owner, so they exclude processes of every mount and client
of the cluster, and go with this mount's lease if the mount process dies.
A blocking request (F_SETLKW, flock without LOCK_NB) polls meta with backoff
and answers EINTR when its caller is signalled. Closing a file drops the
caller's POSIX locks on it (flush), the last close of an open file its flock
(release); close(2) returns after meta forgot them.
"""

from __future__ import annotations

import asyncio
import errno
from collections import defaultdict

import pyfuse3

from chainfs.client import posix_io
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.common.rpc.meta_wire import FALLOC_FL_PUNCH_HOLE, LOCK_EOF
from chainfs.fuse_mount.file_ops import FileOps
from chainfs.fuse_mount.kernel_bridge import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    LOCK_EX,
    LOCK_NB,
    LOCK_SH,
    LOCK_UN,
    Caller,
    LockArgs,
)
from chainfs.fuse_mount.ops_base import log
from chainfs.proto import meta_pb2 as mt

_FLOCK_TYPES = {LOCK_SH: False, LOCK_EX: True, LOCK_UN: None}


class LockOps(FileOps):
    """Lock and fallocate handlers (a mixin of the mount's operations)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # (ino, lock owner, kind) meta may hold a lock for: a close asks meta only for these.
        self._held: set[tuple[int, int, int]] = set()
        self._dropping: defaultdict[int, list[asyncio.Task[None]]] = defaultdict(list)

    def _waiter(self, ino: int, owner: int) -> posix_io.LockWaiter:
        return posix_io.LockWaiter(self.io, ino, owner)

    async def _take(
        self, ino: int, owner: int, kind: int, exclusive: bool | None, start: int, length: int,
        wait: bool, pid: int,
    ) -> None:  # fmt: skip
        key = (ino, owner, kind)
        if exclusive is None and key not in self._held:
            return  # nothing of this owner to unlock
        rng = posix_io.lock_range(exclusive, start, length)
        kind_v = mt.LockKind.ValueType(kind)
        rsp = await self._waiter(ino, owner).lock(kind_v, rng, wait, pid=pid)
        if rsp.held:
            self._held.add(key)
        else:
            self._held.discard(key)

    # -- routed by kernel_bridge --------------------------------------------------
    async def getlk(self, ino: int, owner: int, lock: LockArgs, caller: Caller) -> LockArgs:
        rng = posix_io.lock_range(lock.type == F_WRLCK, lock.start, lock.length)
        got = await self._waiter(ino, owner).test(mt.POSIX, rng)
        if got is None:
            return LockArgs(F_UNLCK, lock.start, lock.length, 0)
        return LockArgs(F_WRLCK if got.exclusive else F_RDLCK, got.start, got.length, got.pid)

    async def setlk(self, ino: int, owner: int, lock: LockArgs, wait: bool, caller: Caller) -> None:
        if lock.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise pyfuse3.FUSEError(errno.EINVAL)
        exclusive = None if lock.type == F_UNLCK else lock.type == F_WRLCK
        await self._take(ino, owner, mt.POSIX, exclusive, lock.start, lock.length, wait, caller.pid)

    async def flock(self, ino: int, owner: int, op: int, caller: Caller) -> None:
        what = op & ~LOCK_NB
        if what not in _FLOCK_TYPES:
            raise pyfuse3.FUSEError(errno.EINVAL)
        wait = not op & LOCK_NB
        await self._take(ino, owner, mt.FLOCK, _FLOCK_TYPES[what], 0, 0, wait, caller.pid)

    async def fallocate(
        self, ino: int, fh: int, mode: int, offset: int, length: int, caller: Caller
    ) -> None:
        h, st = self._file(fh)
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        gids = self._groups.get(caller.pid) if caller.uid != 0 else ()
        user = UserInfo(caller.uid, caller.gid, gids)
        with self._changing_file(ino) as left:  # its length, mtime
            # Our buffered writes and length first: meta extends, and we punch, after them.
            await self._push(st)
            self._check_writes(st)
            await self._report_length(st, h.session, exact=False)
            inode = await self.meta.fallocate(ino, mode, offset, length, user=user)
            if mode & FALLOC_FL_PUNCH_HOLE:
                end = min(offset + length, inode.size)
                await posix_io.punch_hole(self.io, st.handle, offset, end)
            left.append(inode)
        st.size = max(st.size, inode.size)
        st.generation += 1  # read-ahead of the old bytes is stale
        self._versions[ino] = (inode.size, inode.mtime_ns)

    def closing(self, ino: int, fh: int, owner: int, posix: bool, flock: bool) -> None:
        kinds = [
            kind
            for kind, wanted in ((mt.POSIX, posix), (mt.FLOCK, flock))
            if wanted and (ino, owner, kind) in self._held
        ]
        if not kinds:
            return

        async def drop() -> None:
            everything = mt.LockRange(type=mt.UNLOCK, start=0, end=LOCK_EOF)
            for kind in kinds:
                await self._waiter(ino, owner).lock(kind, everything, False)
                self._held.discard((ino, owner, kind))

        self._dropping[fh].append(asyncio.get_running_loop().create_task(drop()))

    async def _dropped(self, fh: int) -> None:
        for task in self._dropping.pop(fh, []):
            try:
                await task
            except Exception as e:  # the close goes on; the lease drops them at the latest
                log.warning("dropping locks at close of handle %d: %s", fh, e)

    # -- closes wait for their locks to go ----------------------------------------
    async def flush(self, fh: int) -> None:
        await self._dropped(fh)
        await super().flush(fh)

    async def release(self, fh: int) -> None:
        await self._dropped(fh)
        await super().release(fh)
