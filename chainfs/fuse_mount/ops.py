"""FUSE operations (pyfuse3, low-level, inode-based) over the chainfs client.

FUSE inode numbers are chainfs inode ids (root 1 = FUSE_ROOT_ID), so every
request maps onto one inode-based meta call made with the caller's uid/gid
(meta checks permissions). The handlers are grouped by what they touch:
file contents (file_ops), directory listings (dir_ops), extended attributes
(xattr_ops), and here the namespace (names, attributes, links) and the file
system; ops_base holds the mount's state and how every request is answered.
Locks and fallocate, which pyfuse3 does not route, come through
kernel_bridge to lock_ops; other operations pyfuse3 does not route (ioctl,
copy_file_range, lseek) are answered ENOSYS by libfuse, which the kernel
turns into EOPNOTSUPP or its local fallback.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from typing import Any

import pyfuse3

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.fuse_mount.dir_ops import DirOps
from chainfs.fuse_mount.file_ops import FileOps
from chainfs.fuse_mount.lock_ops import LockOps
from chainfs.fuse_mount.ops_base import ROOT_INO, log, op, replied
from chainfs.fuse_mount.special_ops import SpecialOps
from chainfs.fuse_mount.xattr_ops import XattrOps
from chainfs.proto import meta_pb2 as mt

# Explicit times this close to now come from utimensat(UTIME_NOW) (pyfuse3
# turns NOW into a timestamp); meta lets any writer set "now", only the owner
# an explicit time.
_NOW_SLACK_NS = 200_000_000
_RENAME_FLAGS = pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE
# What a setattr may change here. The kernel sends one with none of them for a
# chown to the owner a file has already (tar, as root): answered as a getattr.
_SETATTR_FIELDS = (
    "update_mode",
    "update_uid",
    "update_gid",
    "update_atime",
    "update_mtime",
    "update_size",
)


class ChainfsOperations(LockOps, FileOps, DirOps, XattrOps, SpecialOps):
    """pyfuse3 request handlers for one mount."""

    # -- names -----------------------------------------------------------------
    @op
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        user = self._user(ctx)
        try:
            if name == b".":
                inode = await self._stat(parent_inode, user)
            elif name == b"..":
                d = await self._stat(parent_inode, user)
                inode = await self._stat(d.parent or ROOT_INO, user)
            elif self._absent(parent_inode, name):
                raise ChainfsError(Code.ENOENT, "not in the directory's name list")
            else:
                try:
                    stamps = self._dir_attrs.stamp(), self._file_attrs.stamp()
                    inode = await self.meta.lookup(parent_inode, name, user)
                    self._learn(inode, stamps)
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
        self.counters.fuse["forget"] += 1
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                self._told.pop(ino, None)
                if ino not in self._open:
                    self._versions.pop(ino, None)

    @op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._getattr(inode, self._user(ctx))

    async def _getattr(self, inode: int, user: UserInfo) -> pyfuse3.EntryAttributes:
        known = self._dir_attrs.get(inode) or self._file_attrs.get(inode)
        if known is not None:  # the kernel may keep it only as long as we may
            self.counters.local["getattr"] += 1
            return self._entry(known[0], attr_timeout=known[1])
        return self._entry(await self._stat(inode, user))

    @op
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if not any(getattr(fields, f) for f in _SETATTR_FIELDS):
            return await self._getattr(inode, self._user(ctx))  # nothing we store changes
        with self._changing_file(inode) as left:
            result = await self._setattr(inode, attr, fields, fh, ctx)
            left.append(result)
        return self._entry(result)

    async def _setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> mt.Inode:
        """Meta's inode after the change (chmod, chown, utimes, truncate)."""
        user = self._user(ctx)
        kw: dict[str, Any] = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode & 0o7777
            # With default_permissions the kernel refuses a chmod by anyone but
            # the owner, so a mode change from another user is its setuid drop.
            kw["kill_priv"] = self.config.default_permissions
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
            return await self._touching(
                inode, self.meta.setattr(inode, follow=False, user=user, **kw)
            )
        size = attr.st_size
        h = self._files.get(fh) if fh is not None else None
        if h is not None and h.writable and h.ino == inode and not kw:
            # ftruncate on a descriptor open for writing: the kernel checked it
            # at open; the file's mode may not grant write any more (0444 + O_CREAT).
            user = UserInfo(0, 0)
        if st is None:
            return await self.meta.setattr(inode, follow=False, user=user, size=size, **kw)
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
        return result

    @op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.meta.readlink_bytes(inode, user=self._user(ctx))

    @op
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rsp = await self._changing(
            self.meta.mkdir_reply((parent_inode, name), mode & 0o7777, user=self._user(ctx)),
            added=[(parent_inode, name)],
            left=lambda r: replied(r, "parent"),
        )
        inode = rsp.inode
        self._install_names(inode.ino, set(), self._mutations)  # new: empty
        self._remember(inode.ino)
        return self._entry(inode)

    @op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        user = self._user(ctx)
        await self._hold_if_open(parent_inode, name, user)
        self._file_attrs.forget_all()  # the file lost a link (which one: not in the reply)
        try:
            await self._changing(
                self.meta.unlink_reply((parent_inode, name), user=user),
                removed=[(parent_inode, name)],
                left=lambda r: replied(r, "parent"),
            )
        finally:
            self._file_attrs.forget_all()

    @op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rsp = await self._changing(
            self.meta.rmdir_reply((parent_inode, name), user=self._user(ctx)),
            removed=[(parent_inode, name)],
            left=lambda r: replied(r, "parent"),
        )
        if rsp.ino:
            self._dir_attrs.drop(rsp.ino)
        else:
            self._dir_attrs.clear()  # which directory went is unknown

    @op
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rsp = await self._changing(
            self.meta.symlink_reply(target, (parent_inode, name), user=self._user(ctx)),
            added=[(parent_inode, name)],
            left=lambda r: replied(r, "parent"),
        )
        self._remember(rsp.inode.ino)
        return self._entry(rsp.inode)

    @op
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
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        self._file_attrs.forget_all()  # the moved file's ctime, the replaced one's nlink
        try:
            rsp = await self._changing(
                self.meta.rename_reply(
                    (parent_inode_old, name_old), (parent_inode_new, name_new), flags, user=user
                ),
                added=[(parent_inode_new, name_new)]
                + ([(parent_inode_old, name_old)] if exchange else []),
                removed=[] if exchange else [(parent_inode_old, name_old)],
                left=lambda r: replied(r, "src_parent", "dst_parent"),
            )
        finally:
            self._file_attrs.forget_all()
        # The moved inode's ctime (and a moved directory's "..") changed, and
        # what the new name replaced is gone or lost a link.
        if exchange or not rsp.HasField("src_parent"):
            self._dir_attrs.clear()  # the other inode of an exchange, or a replay: unknown
        self._dir_attrs.drop(rsp.inode.ino)
        if rsp.HasField("replaced"):
            self._dir_attrs.drop(rsp.replaced.ino)

    @op
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with self._changing_file(inode) as left:
            rsp = await self._changing(
                self.meta.link_reply(inode, (new_parent_inode, new_name), user=self._user(ctx)),
                added=[(new_parent_inode, new_name)],
                left=lambda r: replied(r, "parent"),
            )
            left.append(rsp.inode)
        self._remember(rsp.inode.ino)
        return self._entry(rsp.inode)

    # -- file system -------------------------------------------------------------
    @op
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
        s.f_files = rsp.inodes_total
        s.f_ffree = s.f_files - min(rsp.inodes_used, s.f_files)
        s.f_favail = s.f_ffree
        s.f_namemax = rsp.max_name_bytes or 255
        self._statfs = (now + self.config.statfs_cache_ms / 1000, s)
        return s

    # -- lifetime ----------------------------------------------------------------
    async def shutdown(self) -> None:
        """Unmounting: push buffered writes and end every meta session we hold."""
        for fh in list(self._files):
            try:
                await self.release(fh)
            except pyfuse3.FUSEError as e:
                log.warning("closing handle %d at unmount: errno %d", fh, e.errno)
        self._dirs.clear()
        await self.guard.stop()
