"""FUSE handlers of file contents: open, create, read, write, flush, fsync, release.

File bytes go through the client's chunk I/O: reads straight into the reply
buffer, split at chunk boundaries and fetched in parallel; writes into one
write-back AsyncFile per inode (chunk-sized runs, several in flight).
close(2) (FUSE flush) pushes buffered data and reports the length to meta, so
a client that opens the file after our close sees it whole (close-to-open).
The kernel page cache is kept across opens when meta says the file did not
change meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pyfuse3

from chainfs.client.chunk_io import OpenHandle
from chainfs.client.file import AsyncFile, Mode
from chainfs.client.layout import layout_of
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.fuse_mount.ops_base import MiB, OpsBase, log, op
from chainfs.fuse_mount.readahead import ReadAhead
from chainfs.fuse_mount.state import FileHandle, OpenInode
from chainfs.proto import meta_pb2 as mt

_WRITE_MODE = Mode(
    readable=False,
    writable=True,
    append=False,
    create=False,
    truncate=False,
    exclusive=False,
    binary=True,
)


class FileOps(OpsBase):
    """Open files of the mount: one shared writer and one length per inode."""

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
                    try:
                        await w.close()
                    finally:
                        st.size = max(st.size, w.size())

    def _writer(self, st: OpenInode) -> AsyncFile:
        if st.writer is None:
            h = OpenHandle(st.handle.path, st.ino, st.handle.layout, st.size)
            st.writer = AsyncFile(self.io, h, _WRITE_MODE)
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
        # O_DIRECT asks for no caching: its reads go straight to storage (a
        # random 4 KiB read taken for sequential would fetch a whole block).
        if (
            h.readable
            and not flags & os.O_DIRECT
            and self._readahead_buffers is not None
            and self.config.readahead_bytes
        ):
            layout = st.handle.layout
            block = min(max(layout.chunk_size, MiB), 8 * MiB)
            handle = st.handle

            async def fetch(start: int, out: memoryview) -> None:
                await self.io.read_into(handle, start, out)

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

    async def _report_length(self, st: OpenInode, session: bytes, exact: bool) -> mt.Inode | None:
        """Tell meta the length (and that we wrote): after this, other clients see the data.
        Meta's inode after it; None if there was nothing to report."""
        if not st.dirty and not exact:
            return None
        st.dirty = False
        try:
            inode = await self.meta.sync(st.ino, session, st.known_size(), exact=exact, wrote=True)
        except BaseException:
            st.dirty = True
            raise
        st.size = max(st.size, inode.size)
        self._versions[st.ino] = (inode.size, inode.mtime_ns)
        return inode

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

    # -- files -----------------------------------------------------------------
    @op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        acc = flags & os.O_ACCMODE
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        # libfuse asks for atomic O_TRUNC: the kernel sends O_TRUNC here
        # instead of a separate truncate.
        truncate = writable and bool(flags & os.O_TRUNC)
        with self._changing_file(inode) as left:
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
                and self.io.config.read_sessions
                and (st is None or not st.hold_session),
            )
            left.append(rsp.inode)  # what meta says now (close-to-open)
        fi, _ = await self._start_handle(rsp.inode, rsp.session_id, flags, truncate)
        self._refresh_kernel_attrs(rsp.inode)
        return fi

    @op
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
                session=acc == os.O_RDONLY and self.io.config.read_sessions,
            ),
            added=[(parent_inode, name)],
            left=lambda r: [] if r.parent is None else [r.parent],
        )
        if not rsp.created:  # an existing file (O_TRUNC cut it): nothing kept from before
            self._file_attrs.forget(rsp.inode.ino)
        truncated = bool(flags & os.O_TRUNC) and not rsp.created
        fi, _ = await self._start_handle(rsp.inode, rsp.session_id, flags, truncated)
        self._remember(rsp.inode.ino)
        return fi, self._entry(rsp.inode)

    @op
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
            await self.io.read_into(st.handle, off, buf.view)
        except BaseException:
            buf.release()
            raise
        # pyfuse3 copies the reply to the kernel before this task yields again:
        # the buffer goes back to the pool right after.
        asyncio.get_running_loop().call_soon(buf.release)
        return buf.view  # type: ignore[return-value]  # pyfuse3 takes any buffer

    @op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h, st = self._file(fh)
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        with self._changing_file(h.ino):  # its length and mtime, once reported
            return await self._write(h, st, off, buf)

    async def _write(self, h: FileHandle, st: OpenInode, off: int, buf: bytes) -> int:
        async with st.lock:
            w = self._writer(st)
            w.seek_sync(off)
            try:
                n = await w.write(buf)
            except OSError as e:
                if e.errno != errno.EFBIG:  # EFBIG is refused before anything is buffered
                    st.write_failed = True
                raise
            except BaseException:
                st.write_failed = True
                raise
        st.generation += 1
        st.dirty = True
        st.write_mtime_ns = time.time_ns()
        return n

    @op
    async def flush(self, fh: int) -> None:
        h, st = self._file(fh)
        if not h.writable:
            return
        await self._push(st)
        self._check_writes(st)
        # Nothing written since the last report: nothing changes at meta.
        with self._changing_file(h.ino, changes=st.dirty) as left:
            left.extend(filter(None, [await self._report_length(st, h.session, exact=False)]))

    @op
    async def fsync(self, fh: int, datasync: bool) -> None:
        h, st = self._file(fh)
        if not h.writable:
            return
        with self._changing_file(h.ino) as left:
            await self._push(st)
            self._check_writes(st)
            left.extend(filter(None, [await self._report_length(st, h.session, exact=True)]))

    @op
    async def release(self, fh: int) -> None:
        h = self._files.pop(fh, None)
        if h is None:
            return
        if h.readahead is not None:
            h.readahead.close()
        st = self._open[h.ino]
        try:
            if h.writable:
                await self._release_writable(h, st)
        finally:
            st.handles -= 1
            if st.handles == 0:
                del self._open[h.ino]
                if st.hold_session:
                    await self.io.end_session_later(h.ino, st.hold_session)

    async def _release_writable(self, h: FileHandle, st: OpenInode) -> None:
        """Push what is buffered; report it, or (nothing new) end the session in the background."""
        st.write_handles -= 1
        if st.writer is not None:
            async with st.lock:
                w = st.writer
                if w is not None and st.write_handles == 0:
                    st.writer = None
                    try:
                        await w.close()
                    finally:
                        # Its writes count in the length reported below
                        # (unmount releases without a flush first).
                        st.size = max(st.size, w.size())
                elif w is not None:
                    await w.flush()
        # A failed write may have left chunks: report it as a write, so
        # meta never treats the file as never written (its GC removes them).
        wrote, st.dirty = st.dirty or st.write_failed, False
        if wrote:
            with self._changing_file(h.ino) as left:
                inode = await self.meta.close(h.ino, h.session, st.known_size(), wrote=True)
                if inode is not None:
                    self._versions[h.ino] = (inode.size, inode.mtime_ns)
                    left.append(inode)
        else:
            # Meta has the length already (close(2)'s flush reported it, or
            # nothing was written): only the session ends, in the background.
            await self.io.end_session_later(h.ino, h.session)
