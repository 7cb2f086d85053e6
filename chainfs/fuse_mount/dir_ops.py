"""FUSE handlers of directory listings: opendir, readdir (paged from meta), releasedir.

A complete listing is kept for a short while (``listing_ttl_s``: half the
attribute timeout, the kernel trusts the attributes in it for the other half)
and answers later opendirs of the same directory by the same user without
asking meta, as long as no change went through this mount meanwhile: a
program listing a directory again and again costs no meta calls, and this
mount's own changes are never hidden by it.
"""

from __future__ import annotations

import asyncio
import errno
import stat as stat_mod
import time

import pyfuse3

from chainfs.common.rpc.meta_client import UserInfo, type_bits
from chainfs.fuse_mount.ops_base import ROOT_INO, OpsBase, op
from chainfs.fuse_mount.state import DirHandle, DirListing
from chainfs.proto import meta_pb2 as mt

# Positions in a directory listing: 1 ".", 2 "..", 3 + k the k-th entry.
_FIRST_ENTRY_POS = 3


def _listing_key(ino: int, user: UserInfo) -> tuple[int, int, int, tuple[int, ...]]:
    # Per caller: meta checks read permission on the directory with its ids.
    return (ino, user.uid, user.gid, tuple(user.gids))


class DirOps(OpsBase):
    """Directory handles: a cursor over meta's pages of entries with attributes."""

    @op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        user = self._user(ctx)
        fh = self._fh()
        cached = self._cached_listing(_listing_key(inode, user))
        if cached is not None:
            d = DirHandle(fh, inode, cached.dir_inode.parent or ROOT_INO, user, cached.dir_inode)
            d.listing = cached
            self._dirs[fh] = d
            return fh
        since = self._changes
        dir_inode, first = await asyncio.gather(
            self._stat(inode, user),
            self.meta.readdir(inode, b"", self._page, with_attrs=True, user=user),
        )
        d = DirHandle(fh, inode, dir_inode.parent or ROOT_INO, user, dir_inode, changes=since)
        d.answered = [] if self._listing_budget else None
        self._take_page(d, first)
        if not first.more:
            self._install_names(inode, {e.name for e in first.entries}, self._mutations)
        self._dirs[fh] = d
        return fh

    def _cached_listing(self, key: tuple[int, int, int, tuple[int, ...]]) -> DirListing | None:
        listing = self._listings.get(key)
        if listing is None:
            return None
        if listing.changes != self._changes or time.monotonic() > listing.expires:
            self._drop_listing(key)
            return None
        self._listings.move_to_end(key)
        return listing

    def _drop_listing(self, key: tuple[int, int, int, tuple[int, ...]]) -> None:
        listing = self._listings.pop(key, None)
        if listing is not None:
            self._listed_entries -= len(listing.entries)

    def _keep_listing(self, d: DirHandle) -> None:
        """The handle listed its directory to the end: keep the listing for later opendirs."""
        entries, d.answered = d.answered, None
        if entries is None or d.changes != self._changes or len(entries) > self._listing_budget:
            return
        key = _listing_key(d.ino, d.user)
        self._drop_listing(key)
        expires = time.monotonic() + self._listing_ttl_s
        self._listings[key] = DirListing(expires, d.changes, d.dir_inode, entries)
        self._listed_entries += len(entries)
        while self._listed_entries > self._listing_budget:
            self._drop_listing(next(iter(self._listings)))

    def _take_page(self, d: DirHandle, rsp: mt.ReaddirRsp) -> None:
        d.base += len(d.page)
        d.page = [(e.name, e.ino, self._dir_entry(e)) for e in rsp.entries]
        d.more = rsp.more and bool(rsp.entries)
        if rsp.entries:
            d.after = rsp.entries[-1].name
        d.fetched = True
        if d.answered is not None:
            d.answered.extend(d.page)
            if len(d.answered) > self._listing_budget:
                d.answered = None  # too big to keep: stop collecting
        if not d.more and d.answered is not None:
            self._keep_listing(d)

    def _dir_entry(self, e: mt.DirEntry) -> pyfuse3.EntryAttributes:
        if e.HasField("inode"):
            # Trusted for half the attribute timeout: the listing may be
            # answered from the cache for the other half.
            return self._entry(e.inode, self._listing_ttl_s, self._listing_ttl_s)
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
            dot = self._entry(d.dir_inode, self._listing_ttl_s, self._listing_ttl_s)
            if not pyfuse3.readdir_reply(token, b".", dot, 1):
                return
            pos = 1
        if pos == 1:
            dotdot = pyfuse3.EntryAttributes()
            dotdot.st_ino = d.parent
            dotdot.st_mode = stat_mod.S_IFDIR
            if not pyfuse3.readdir_reply(token, b"..", dotdot, 2):
                return
            pos = 2
        if d.listing is not None:
            self._reply_entries(token, d.listing.entries, pos - 2)
            return
        await self._reply_from_meta(d, token, pos - 2)

    def _reply_entries(
        self,
        token: pyfuse3.ReaddirToken,
        entries: list[tuple[bytes, int, pyfuse3.EntryAttributes]],
        k: int,
    ) -> None:
        """Answer entries from the k-th of a complete listing on (no meta calls)."""
        while k < len(entries):
            name, ino, attrs = entries[k]
            if not pyfuse3.readdir_reply(token, name, attrs, k + _FIRST_ENTRY_POS):
                return
            self._remember(ino)
            k += 1

    async def _reply_from_meta(self, d: DirHandle, token: pyfuse3.ReaddirToken, k: int) -> None:
        """Answer entries from the k-th on, fetching meta's pages as needed."""
        if k < d.base:  # rewinddir / seekdir backwards: list again from the start
            d.base, d.page, d.after, d.more, d.fetched = 0, [], b"", True, False
            d.answered = None
        while True:
            while k >= d.base + len(d.page):
                if d.fetched and not d.more:
                    return
                rsp = await self.meta.readdir(d.ino, d.after, self._page, True, user=d.user)
                self._take_page(d, rsp)
                if not d.page:
                    return
            name, ino, attrs = d.page[k - d.base]
            if not pyfuse3.readdir_reply(token, name, attrs, k + _FIRST_ENTRY_POS):
                return
            self._remember(ino)
            k += 1

    @op
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return  # every namespace change is durable at meta once answered
