"""FUSE operations (pyfuse3, low-level, inode-based) over the chainfs client.

FUSE inode numbers are chainfs inode ids (root 1 = FUSE_ROOT_ID), so every
request maps onto one inode-based meta call made with the caller's uid/gid
(meta checks permissions). File bytes go through the client's chunk I/O:
reads straight into the reply buffer, split at chunk boundaries and fetched
in parallel; writes into one write-back AsyncFile per inode (chunk-sized
runs, several in flight). close(2) (FUSE flush) pushes buffered data and
reports the length to meta, so a client that opens the file after our close
sees it whole (close-to-open). The kernel page cache is kept across opens
when meta says the file did not change meanwhile.

Every handler answers: chainfs errors become their errno, anything
unexpected is logged and answered EIO, and a request stuck on an
unreachable cluster is answered EIO after ``cluster_timeout_ms`` (plus a
margin). Operations pyfuse3 does not route here (fallocate, ioctl,
copy_file_range, lseek, locks) are answered ENOSYS by libfuse, which the
kernel turns into EOPNOTSUPP or its local fallback.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from chainfs.client.aio_fs import AsyncFileSystem, layout_of
from chainfs.client.file import AsyncFile, Mode, OpenHandle
from chainfs.common.dataplane.buffers import BufferPool
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import MetaClient, UserInfo, mode_bits
from chainfs.common.units import MiB as _MiB
from chainfs.fuse_mount.config import MountConfig
from chainfs.fuse_mount.readahead import ReadAhead
from chainfs.fuse_mount.state import (
    DirHandle,
    DirNames,
    FileHandle,
    GroupsCache,
    OpenInode,
    permitted,
)
from chainfs.proto import meta_pb2 as mt

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

ROOT_INO = 1
# Positions in a directory listing: 1 ".", 2 "..", 3 + k the k-th entry.
_FIRST_ENTRY_POS = 3
# Explicit times this close to now come from utimensat(UTIME_NOW) (pyfuse3
# turns NOW into a timestamp); meta lets any writer set "now", only the owner
# an explicit time.
_NOW_SLACK_NS = 200_000_000
# Margin on top of the client's own timeouts before a request is cut short.
_GUARD_MARGIN_S = 5.0
_CAPS = b"security.capability"
# Name lists kept for negative lookups: directories of at most this many
# entries, at most this many directories (least recently used dropped).
_NAMES_MAX_ENTRIES = 1024
_NAMES_MAX_DIRS = 512
# Read replies: the kernel asks at most 1 MiB per request (FUSE max_pages).
_MAX_READ_BYTES = _MiB
_RENAME_FLAGS = pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE
_WRITE_MODE = Mode(
    readable=False,
    writable=True,
    append=False,
    create=False,
    truncate=False,
    exclusive=False,
    binary=True,
)
# Failures that say something is wrong with the cluster or the mount are
# logged as warnings; every other errno is the caller's business (debug).
_ALARMING_ERRNOS = frozenset(
    {errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EPROTO, errno.ENOSYS, errno.EBADF}
)
# Errnos that mean "the cluster could not do it right now" (unreachable, no
# serving replica, conflicts after the client's retries) become EIO: EAGAIN
# from a blocking file read or write is not something programs expect (Python
# even takes it for "no data yet" and returns nothing).
_UNREACHABLE_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.EPIPE,
        errno.EAGAIN,
    }
)


def _op(
    fn: Callable[Concatenate[ChainfsOperations, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[ChainfsOperations, P], Coroutine[Any, Any, T]]:
    """Answer every request: errno for known failures, EIO (logged) for the rest."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: ChainfsOperations, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            async with asyncio.timeout(self.guard_s):
                return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except TimeoutError:
            log.warning("%s%r: no answer in %.1fs: EIO", name, args[:2], self.guard_s)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:  # ChainfsError included: its errno is the mapped one
            code = e.errno or errno.EIO
            level = logging.WARNING if code in _ALARMING_ERRNOS else logging.DEBUG
            log.log(level, "%s%r: %s", name, args[:2], e)
            raise pyfuse3.FUSEError(errno.EIO if code in _UNREACHABLE_ERRNOS else code) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the mount is shutting down
            # Something we awaited was cancelled, not this request: answer it,
            # or the caller would wait forever.
            log.error("%s%r: an awaited operation was cancelled: EIO", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%r failed unexpectedly: EIO", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class ChainfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers for one mount."""

    supports_dot_lookup = True

    def __init__(self, fs: AsyncFileSystem, config: MountConfig) -> None:
        super().__init__()
        self.fs = fs
        self.config = config
        self.meta: MetaClient = fs._meta
        self.enable_writeback_cache = config.writeback_cache
        self._attr_timeout_s = config.attr_timeout_ms / 1000
        self._entry_timeout_s = config.entry_timeout_ms / 1000
        self._negative_timeout_s = config.negative_timeout_ms / 1000
        self.guard_s = (
            max(config.cluster_timeout_ms, fs.config.meta_timeout_ms) / 1000 + _GUARD_MARGIN_S
        )
        self._page = config.readdir_page_entries
        self._groups = GroupsCache()
        self._lookups: dict[int, int] = {}  # kernel lookup counts
        self._versions: dict[int, tuple[int, int]] = {}  # ino -> (size, mtime_ns) cached by kernel
        self._open: dict[int, OpenInode] = {}
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._names: collections.OrderedDict[int, DirNames] = collections.OrderedDict()
        self._mutations = 0  # namespace changes made through this mount, ever
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None  # (expires, answer)
        # Reply buffers of reads, reused (a fresh 1 MiB buffer costs 256 page faults);
        # room for every concurrent request, twice over.
        room = 2 * config.max_requests * _MAX_READ_BYTES
        self._read_buffers = BufferPool(room, room // 2)
        budget = config.readahead_budget_bytes
        self._readahead_buffers = BufferPool(budget, budget // 2) if budget else None
        self.on_init: Callable[[], None] | None = None  # run once the kernel handshake is done

    # -- helpers ---------------------------------------------------------------
    def init(self) -> None:
        if self.on_init is not None:
            # After this handler returns libfuse answers the kernel's INIT;
            # settings that INIT would overwrite are applied after it.
            asyncio.get_running_loop().call_soon(self.on_init)

    def _user(self, ctx: pyfuse3.RequestContext) -> UserInfo:
        gids = self._groups.get(ctx.pid) if ctx.uid != 0 else ()
        return UserInfo(ctx.uid, ctx.gid, gids)

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _remember(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def _entry(
        self, inode: mt.Inode, entry_timeout: float | None = None
    ) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = 0
        e.entry_timeout = self._entry_timeout_s if entry_timeout is None else entry_timeout
        e.attr_timeout = self._attr_timeout_s
        e.st_mode = mode_bits(inode)
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        size, mtime_ns, ctime_ns = inode.size, inode.mtime_ns, inode.ctime_ns
        st = self._open.get(inode.ino)
        if st is not None and inode.type == mt.FILE:
            st.size = max(st.size, inode.size)
            size = st.known_size()
            if st.dirty:
                mtime_ns = max(mtime_ns, st.write_mtime_ns)
                ctime_ns = max(ctime_ns, st.write_mtime_ns)
        e.st_size = size
        e.st_blocks = (size + 511) // 512
        chunk = inode.layout.chunk_size if inode.type == mt.FILE else 0
        e.st_blksize = min(chunk, 1 << 20) if chunk else 4096
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = mtime_ns
        e.st_ctime_ns = ctime_ns
        return e

    def _file(self, fh: int) -> tuple[FileHandle, OpenInode]:
        h = self._files.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h, self._open[h.ino]

    def _open_inode(self, inode: mt.Inode, truncated: bool) -> OpenInode:
        st = self._open.get(inode.ino)
        if st is None:
            handle = OpenHandle(f"<inode {inode.ino}>", inode.ino, layout_of(inode), inode.size)
            st = OpenInode(inode.ino, handle, inode.size)
            self._open[inode.ino] = st
        elif truncated:
            st.size = inode.size
            st.generation += 1
        else:
            st.size = max(st.size, inode.size)
        return st

    async def _drop_writer(self, ino: int) -> None:
        """Push and drop the inode's writer (before its length is cut)."""
        st = self._open.get(ino)
        if st is not None and st.writer is not None:
            async with st.lock:
                w, st.writer = st.writer, None
                if w is not None:
                    await w.close()

    def _writer(self, st: OpenInode) -> AsyncFile:
        if st.writer is None:
            h = OpenHandle(st.handle.path, st.ino, st.handle.layout, st.size)
            st.writer = AsyncFile(self.fs, h, _WRITE_MODE)
        return st.writer

    def _keep_cache(self, inode: mt.Inode) -> bool:
        if inode.ino in self._open:
            return True  # open here already: the page cache holds what we wrote
        if not self.config.keep_cache:
            return False
        return self._versions.get(inode.ino) == (inode.size, inode.mtime_ns)

    def _file_info(self, fh: int, inode: mt.Inode, flags: int) -> pyfuse3.FileInfo:
        keep = self._keep_cache(inode)
        self._versions[inode.ino] = (inode.size, inode.mtime_ns)
        direct = self.config.direct_io or bool(flags & os.O_DIRECT)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=direct)

    async def _start_handle(
        self, inode: mt.Inode, session: bytes, flags: int, truncated: bool
    ) -> tuple[pyfuse3.FileInfo, FileHandle]:
        if inode.type != mt.FILE:
            if session:
                await self.meta.close(inode.ino, session)
            raise pyfuse3.FUSEError(errno.EISDIR if inode.type == mt.DIRECTORY else errno.EINVAL)
        acc = flags & os.O_ACCMODE
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        try:
            st = self._open_inode(inode, truncated)
        except BaseException:
            if session:
                await self.meta.close(inode.ino, session)
            raise
        duplicate = b""
        if session and not writable:
            # A read session: one per inode of this mount, held until its last release.
            if st.hold_session:
                duplicate = session  # a concurrent open took one too
            else:
                st.hold_session = session
            session = b""
        # No await from _open_inode until the handle is counted in st: a release
        # of the inode's last other handle in between would drop st from
        # self._open and leave this handle pointing at nothing.
        fi = self._file_info(self._fh(), inode, flags)
        h = FileHandle(
            fi.fh,
            inode.ino,
            session,
            readable=acc in (os.O_RDONLY, os.O_RDWR),
            writable=writable,
        )
        if h.readable and self._readahead_buffers is not None and self.config.readahead_bytes:
            layout = st.handle.layout
            block = min(max(layout.chunk_size, _MiB), 8 * _MiB)
            handle = st.handle

            async def fetch(start: int, out: memoryview) -> None:
                await self.fs._read_into(handle, start, out)

            h.readahead = ReadAhead(
                self._readahead_buffers, block, self.config.readahead_bytes, fetch
            )
        self._files[fi.fh] = h
        st.handles += 1
        if h.writable:
            st.write_handles += 1
        if duplicate:
            try:
                await self.meta.close(inode.ino, duplicate)
            except ChainfsError as e:  # meta ends it with this mount's lease at the latest
                log.warning("ending a duplicate read session of inode %d: %s", inode.ino, e)
        return fi, h

    async def _report_length(self, st: OpenInode, session: bytes, exact: bool) -> None:
        """Tell meta the length (and that we wrote): after this, other clients see the data."""
        if not st.dirty and not exact:
            return
        st.dirty = False
        try:
            inode = await self.meta.sync(st.ino, session, st.known_size(), exact=exact, wrote=True)
        except BaseException:
            st.dirty = True
            raise
        st.size = max(st.size, inode.size)
        self._versions[st.ino] = (inode.size, inode.mtime_ns)

    async def _push(self, st: OpenInode) -> None:
        """Send buffered writes of ``st`` to storage and wait for their acks."""
        if st.writer is not None:
            async with st.lock:
                if st.writer is not None:
                    try:
                        await st.writer.flush()
                    except BaseException:
                        st.write_failed = True
                        raise

    @staticmethod
    def _check_writes(st: OpenInode) -> None:
        if st.write_failed:
            raise ChainfsError(Code.EIO, f"inode {st.ino}: an earlier write failed")

    async def _hold_if_open(self, parent: int, name: bytes, user: UserInfo) -> None:
        """Before a name goes away: if it is the last name of a file open here
        read-only, take a write session so meta keeps its data until release."""
        if not any(not s.write_handles and not s.hold_session for s in self._open.values()):
            return
        try:
            inode = await self.meta.lookup(parent, name, user)
        except ChainfsError:
            return
        st = self._open.get(inode.ino)
        if st is None or st.write_handles or st.hold_session or inode.nlink > 1:
            return
        try:
            rsp = await self.meta.open(inode.ino, read=False, write=True)
        except ChainfsError as e:
            log.info("cannot keep unlinked open inode %d alive: %s", inode.ino, e)
            return
        if self._open.get(inode.ino) is st and not st.hold_session:
            st.hold_session = rsp.session_id
            return
        # Released (or protected by another call) meanwhile: this one is not
        # needed. Failing to end it must not fail the caller's unlink/rename.
        try:
            await self.meta.close(inode.ino, rsp.session_id)
        except ChainfsError as e:  # meta ends it with this mount's lease at the latest
            log.warning("ending an unneeded session of inode %d: %s", inode.ino, e)

    # -- names known to be absent --------------------------------------------------
    def _absent(self, parent: int, name: bytes) -> bool:
        """True when ``parent``'s fresh name list says ``name`` does not exist."""
        nc = self._names.get(parent)
        if nc is None:
            return False
        if time.monotonic() > nc.expires:
            del self._names[parent]
            return False
        self._names.move_to_end(parent)
        return name not in nc.names

    def _install_names(self, parent: int, names: set[bytes], since: int) -> None:
        """Keep a complete listing fetched while no change went through us."""
        if self._negative_timeout_s <= 0 or since != self._mutations:
            return
        if len(names) > _NAMES_MAX_ENTRIES:
            return
        self._names[parent] = DirNames(time.monotonic() + self._negative_timeout_s, names)
        self._names.move_to_end(parent)
        while len(self._names) > _NAMES_MAX_DIRS:
            self._names.popitem(last=False)

    async def _list_names(self, parent: int, user: UserInfo) -> None:
        if self._negative_timeout_s <= 0 or parent in self._names:
            return
        since = self._mutations
        try:
            rsp = await self.meta.readdir(parent, b"", _NAMES_MAX_ENTRIES, False, user=user)
        except ChainfsError:
            return  # e.g. no read permission: no list, lookups ask meta
        if not rsp.more:
            self._install_names(parent, {e.name for e in rsp.entries}, since)

    async def _changing(
        self,
        change: Awaitable[T],
        added: Sequence[tuple[int, bytes]] = (),
        removed: Sequence[tuple[int, bytes]] = (),
    ) -> T:
        """Run a namespace change; keep the name lists of its directories current."""
        try:
            result = await change
        except BaseException:
            self._mutations += 1
            for parent, _ in (*added, *removed):
                self._names.pop(parent, None)  # outcome unknown: forget the list
            raise
        self._mutations += 1
        for parent, name in removed:
            nc = self._names.get(parent)
            if nc is not None:
                nc.names.discard(name)
        for parent, name in added:
            nc = self._names.get(parent)
            if nc is not None:
                nc.names.add(name)
                if len(nc.names) > _NAMES_MAX_ENTRIES:
                    del self._names[parent]
        return result

    # -- names -----------------------------------------------------------------
    @_op
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        user = self._user(ctx)
        try:
            if name == b".":
                inode = await self.meta.stat(parent_inode, follow=False, user=user)
            elif name == b"..":
                d = await self.meta.stat(parent_inode, follow=False, user=user)
                inode = await self.meta.stat(d.parent or ROOT_INO, follow=False, user=user)
            elif self._absent(parent_inode, name):
                raise ChainfsError(Code.ENOENT, "not in the directory's name list")
            else:
                try:
                    inode = await self.meta.lookup(parent_inode, name, user)
                except ChainfsError as e:
                    if e.code == Code.ENOENT:
                        await self._list_names(parent_inode, user)
                    raise
        except ChainfsError as e:
            if e.code == Code.ENOENT and self._negative_timeout_s > 0:
                neg = pyfuse3.EntryAttributes()
                neg.st_ino = 0
                neg.entry_timeout = self._negative_timeout_s
                return neg
            raise
        self._remember(inode.ino)
        return self._entry(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                if ino not in self._open:
                    self._versions.pop(ino, None)

    @_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.meta.stat(inode, follow=False, user=self._user(ctx)))

    @_op
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        user = self._user(ctx)
        kw: dict[str, Any] = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        now = time.time_ns()
        if fields.update_atime:
            if abs(attr.st_atime_ns - now) < _NOW_SLACK_NS:
                kw["atime_now"] = True
            else:
                kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            if abs(attr.st_mtime_ns - now) < _NOW_SLACK_NS:
                kw["mtime_now"] = True
            else:
                kw["mtime_ns"] = attr.st_mtime_ns
        st = self._open.get(inode)
        if st is not None and st.dirty and (fields.update_mtime or fields.update_size):
            # Report our writes first, so the flush at close does not stamp
            # mtime over the time set here (cp -p, tar, rsync set it last).
            await self._push(st)
            h = self._files.get(fh) if fh is not None else None
            await self._report_length(st, h.session if h else b"", exact=False)
        if not fields.update_size:
            if not kw:
                return await self.getattr(inode, ctx)
            return self._entry(await self.meta.setattr(inode, follow=False, user=user, **kw))
        size = attr.st_size
        h = self._files.get(fh) if fh is not None else None
        if h is not None and h.writable and h.ino == inode and not kw:
            # ftruncate on a descriptor open for writing: the kernel checked it
            # at open; the file's mode may not grant write any more (0444 + O_CREAT).
            user = UserInfo(0, 0)
        if st is None:
            return self._entry(
                await self.meta.setattr(inode, follow=False, user=user, size=size, **kw)
            )
        async with st.lock:
            if st.writer is not None:
                w, st.writer = st.writer, None
                try:
                    await w.close()  # pushes what is buffered, then drops the writer
                except BaseException:
                    st.write_failed = True
                    raise
            result = await self.meta.setattr(inode, follow=False, user=user, size=size, **kw)
            st.size = size
            st.generation += 1
        return self._entry(result)

    @_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.meta.readlink_bytes(inode, user=self._user(ctx))

    @_op
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if stat_mod.S_IFMT(mode) not in (0, stat_mod.S_IFREG):
            # FIFOs, sockets and device nodes are not stored by chainfs.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        rsp = await self._changing(
            self.meta.open(
                (parent_inode, name),
                read=False,
                write=False,
                create=True,
                exclusive=True,
                mode=mode & 0o7777,
                user=self._user(ctx),
            ),
            added=[(parent_inode, name)],
        )
        self._remember(rsp.inode.ino)
        return self._entry(rsp.inode)

    @_op
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = await self._changing(
            self.meta.mkdir((parent_inode, name), mode & 0o7777, user=self._user(ctx)),
            added=[(parent_inode, name)],
        )
        self._install_names(inode.ino, set(), self._mutations)  # new: empty
        self._remember(inode.ino)
        return self._entry(inode)

    @_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        user = self._user(ctx)
        await self._hold_if_open(parent_inode, name, user)
        await self._changing(
            self.meta.unlink((parent_inode, name), user=user), removed=[(parent_inode, name)]
        )

    @_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._changing(
            self.meta.rmdir((parent_inode, name), user=self._user(ctx)),
            removed=[(parent_inode, name)],
        )

    @_op
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = await self._changing(
            self.meta.symlink(target, (parent_inode, name), user=self._user(ctx)),
            added=[(parent_inode, name)],
        )
        self._remember(inode.ino)
        return self._entry(inode)

    @_op
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~_RENAME_FLAGS:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_WHITEOUT: overlayfs only
        user = self._user(ctx)
        if not flags & pyfuse3.RENAME_EXCHANGE:
            await self._hold_if_open(parent_inode_new, name_new, user)
        await self._changing(
            self.meta.rename(
                (parent_inode_old, name_old), (parent_inode_new, name_new), flags, user=user
            ),
            added=[(parent_inode_new, name_new)]
            + ([(parent_inode_old, name_old)] if flags & pyfuse3.RENAME_EXCHANGE else []),
            removed=[] if flags & pyfuse3.RENAME_EXCHANGE else [(parent_inode_old, name_old)],
        )

    @_op
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        result = await self._changing(
            self.meta.link(inode, (new_parent_inode, new_name), user=self._user(ctx)),
            added=[(new_parent_inode, new_name)],
        )
        self._remember(result.ino)
        return self._entry(result)

    # -- files -----------------------------------------------------------------
    @_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        acc = flags & os.O_ACCMODE
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        # libfuse asks for atomic O_TRUNC: the kernel sends O_TRUNC here
        # instead of a separate truncate.
        truncate = writable and bool(flags & os.O_TRUNC)
        if truncate:
            await self._drop_writer(inode)
        st = self._open.get(inode)
        rsp = await self.meta.open(
            inode,
            read=acc in (os.O_RDONLY, os.O_RDWR),
            write=writable,
            truncate=truncate,
            nofollow=True,
            user=self._user(ctx),
            # Read-only: take a read session in the same call unless this mount
            # already holds one for the inode (the file then outlives an unlink
            # or rename over it by any client until our last release).
            session=not writable
            and self.fs.config.read_sessions
            and (st is None or not st.hold_session),
        )
        fi, _ = await self._start_handle(rsp.inode, rsp.session_id, flags, truncate)
        return fi

    @_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        acc = flags & os.O_ACCMODE
        rsp = await self._changing(
            self.meta.open(
                (parent_inode, name),
                read=acc in (os.O_RDONLY, os.O_RDWR),
                write=acc in (os.O_WRONLY, os.O_RDWR),
                create=True,
                exclusive=bool(flags & os.O_EXCL),
                truncate=bool(flags & os.O_TRUNC),
                nofollow=True,
                mode=mode & 0o7777,
                user=self._user(ctx),
                session=acc == os.O_RDONLY and self.fs.config.read_sessions,
            ),
            added=[(parent_inode, name)],
        )
        truncated = bool(flags & os.O_TRUNC) and not rsp.created
        fi, _ = await self._start_handle(rsp.inode, rsp.session_id, flags, truncated)
        self._remember(rsp.inode.ino)
        return fi, self._entry(rsp.inode)

    @_op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h, st = self._file(fh)
        await self._push(st)
        known = st.known_size()
        end = min(off + size, known)
        if end <= off:
            return b""
        if h.readahead is not None:
            ahead = await h.readahead.read(off, size, known, st.generation)
            if ahead is not None:
                return ahead  # type: ignore[return-value]  # pyfuse3 takes any buffer
        buf = await self._read_buffers.acquire(end - off)
        try:
            await self.fs._read_into(st.handle, off, buf.view)
        except BaseException:
            buf.release()
            raise
        # pyfuse3 copies the reply to the kernel before this task yields again:
        # the buffer goes back to the pool right after.
        asyncio.get_running_loop().call_soon(buf.release)
        return buf.view  # type: ignore[return-value]  # pyfuse3 takes any buffer

    @_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h, st = self._file(fh)
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        async with st.lock:
            w = self._writer(st)
            w.seek_sync(off)
            try:
                n = await w.write(buf)
            except BaseException:
                st.write_failed = True
                raise
        st.generation += 1
        st.dirty = True
        st.write_mtime_ns = time.time_ns()
        return n

    @_op
    async def flush(self, fh: int) -> None:
        h, st = self._file(fh)
        if not h.writable:
            return
        await self._push(st)
        self._check_writes(st)
        await self._report_length(st, h.session, exact=False)

    @_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        h, st = self._file(fh)
        if not h.writable:
            return
        await self._push(st)
        self._check_writes(st)
        await self._report_length(st, h.session, exact=True)

    @_op
    async def release(self, fh: int) -> None:
        h = self._files.pop(fh, None)
        if h is None:
            return
        if h.readahead is not None:
            h.readahead.close()
        st = self._open[h.ino]
        try:
            if h.writable:
                st.write_handles -= 1
                if st.writer is not None:
                    async with st.lock:
                        w = st.writer
                        if w is not None and st.write_handles == 0:
                            st.writer = None
                            await w.close()
                        elif w is not None:
                            await w.flush()
                wrote, st.dirty = st.dirty, False
                inode = await self.meta.close(h.ino, h.session, st.known_size(), wrote=wrote)
                if inode is not None:
                    self._versions[h.ino] = (inode.size, inode.mtime_ns)
        finally:
            st.handles -= 1
            if st.handles == 0:
                del self._open[h.ino]
                if st.hold_session:
                    await self.meta.close(h.ino, st.hold_session)

    # -- directories -----------------------------------------------------------
    @_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        user = self._user(ctx)
        since = self._mutations
        dir_inode, first = await asyncio.gather(
            self.meta.stat(inode, follow=False, user=user),
            self.meta.readdir(inode, b"", self._page, with_attrs=True, user=user),
        )
        fh = self._fh()
        d = DirHandle(fh, inode, dir_inode.parent or ROOT_INO, user, dir_inode)
        self._take_page(d, first)
        if not first.more:
            self._install_names(inode, {e.name for e in first.entries}, since)
        self._dirs[fh] = d
        return fh

    @staticmethod
    def _take_page(d: DirHandle, rsp: mt.ReaddirRsp) -> None:
        d.base += len(d.page)
        d.page = list(rsp.entries)
        d.more = rsp.more and bool(rsp.entries)
        if rsp.entries:
            d.after = rsp.entries[-1].name
        d.fetched = True

    def _dir_entry(self, e: mt.DirEntry) -> pyfuse3.EntryAttributes:
        if e.HasField("inode"):
            return self._entry(e.inode)
        # Listed without attributes (raced with a change): let the kernel ask.
        a = pyfuse3.EntryAttributes()
        a.st_ino = e.ino
        a.st_mode = {mt.DIRECTORY: stat_mod.S_IFDIR, mt.SYMLINK: stat_mod.S_IFLNK}.get(
            e.type, stat_mod.S_IFREG
        )
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    @_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        pos = start_id
        if pos == 0:
            if not pyfuse3.readdir_reply(token, b".", self._entry(d.dir_inode), 1):
                return
            pos = 1
        if pos == 1:
            dotdot = pyfuse3.EntryAttributes()
            dotdot.st_ino = d.parent
            dotdot.st_mode = stat_mod.S_IFDIR
            if not pyfuse3.readdir_reply(token, b"..", dotdot, 2):
                return
            pos = 2
        k = pos - 2  # index of the next entry in the listing
        if k < d.base:  # rewinddir / seekdir backwards: list again from the start
            d.base, d.page, d.after, d.more, d.fetched = 0, [], b"", True, False
        while True:
            while k >= d.base + len(d.page):
                if d.fetched and not d.more:
                    return
                rsp = await self.meta.readdir(d.ino, d.after, self._page, True, user=d.user)
                self._take_page(d, rsp)
                if not d.page:
                    return
            e = d.page[k - d.base]
            if not pyfuse3.readdir_reply(token, e.name, self._dir_entry(e), k + _FIRST_ENTRY_POS):
                return
            self._remember(e.ino)
            k += 1

    @_op
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return  # every namespace change is durable at meta once answered

    # -- file system -------------------------------------------------------------
    @_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = time.monotonic()
        if self._statfs is not None and now < self._statfs[0]:
            return self._statfs[1]
        rsp = await self.meta.statfs(user=self._user(ctx))
        bsize = rsp.block_size or 4096
        s = pyfuse3.StatvfsData()
        s.f_bsize = bsize
        s.f_frsize = bsize
        s.f_blocks = rsp.capacity_bytes // bsize
        s.f_bfree = rsp.free_bytes // bsize
        s.f_bavail = s.f_bfree
        # Inodes are not a fixed pool: report room for as many again.
        s.f_files = max(rsp.inodes_allocated, 1) * 2
        s.f_ffree = s.f_files - rsp.inodes_allocated
        s.f_favail = s.f_ffree
        s.f_namemax = rsp.max_name_bytes or 255
        self._statfs = (now + self.config.statfs_cache_ms / 1000, s)
        return s

    def _check_xattr_name(self, name: bytes) -> None:
        """Namespaces the mount answers itself, without asking meta."""
        if name.startswith(b"system."):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # POSIX ACLs: meta has none
        if name.startswith(b"security.") and not self.config.security_xattrs:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    def _caps_changed(self, inode: int, name: bytes) -> None:
        st = self._open.get(inode)
        if st is not None and name == _CAPS:
            st.no_caps = False

    @_op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._check_xattr_name(name)
        self._caps_changed(inode, name)
        await self.meta.setxattr(inode, name, value, follow=False, user=self._user(ctx))

    @_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._check_xattr_name(name)
        st = self._open.get(inode) if name == _CAPS else None
        if st is not None and st.no_caps:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return await self.meta.getxattr(inode, name, follow=False, user=self._user(ctx))
        except ChainfsError as e:
            if st is not None and e.errno == errno.ENODATA:
                st.no_caps = True
            raise

    @_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = [
            os.fsencode(n)
            for n in await self.meta.listxattr(inode, follow=False, user=self._user(ctx))
        ]
        if not self.config.security_xattrs:
            names = [n for n in names if not n.startswith(b"security.")]
        return names

    @_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_xattr_name(name)
        self._caps_changed(inode, name)
        await self.meta.removexattr(inode, name, follow=False, user=self._user(ctx))

    @_op
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Called only without default_permissions.
        node = await self.meta.stat(inode, follow=False, user=self._user(ctx))
        return permitted(node, mode, self._user(ctx))

    # -- lifetime ----------------------------------------------------------------
    async def shutdown(self) -> None:
        """Unmounting: push buffered writes and end every meta session we hold."""
        for fh in list(self._files):
            try:
                await self.release(fh)
            except pyfuse3.FUSEError as e:
                log.warning("closing handle %d at unmount: errno %d", fh, e.errno)
        self._dirs.clear()
