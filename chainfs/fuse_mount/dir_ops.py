"""FUSE handlers of directory listings: opendir, readdir (paged from meta), releasedir."""

from __future__ import annotations

import asyncio
import errno
import stat as stat_mod

import pyfuse3

from chainfs.common.rpc.meta_client import type_bits
from chainfs.fuse_mount.ops_base import ROOT_INO, OpsBase, op
from chainfs.fuse_mount.state import DirHandle
from chainfs.proto import meta_pb2 as mt

# Positions in a directory listing: 1 ".", 2 "..", 3 + k the k-th entry.
_FIRST_ENTRY_POS = 3


class DirOps(OpsBase):
    """Directory handles: a cursor over meta's pages of entries with attributes."""

    @op
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
        a.st_mode = type_bits(e.type)
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    @op
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

    @op
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return  # every namespace change is durable at meta once answered
