"""FUSE handlers of directory listings: opendir, readdir (paged from meta), releasedir.

Two kinds of readdir share one cursor and one numbering of positions (0 ".",
1 "..", 2 + k the k-th entry): READDIRPLUS (pyfuse3's ``readdir``: every
entry with its attributes, and a kernel lookup reference) and plain READDIR
(:meth:`DirOps.readdir_plain`, routed by :mod:`chainfs.fuse_mount.kernel_bridge`:
names, inode numbers and types only). The kernel picks per request.

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
from chainfs.fuse_mount import metrics as fuse_metrics
from chainfs.fuse_mount.dirents import PackedDirents, dirent
from chainfs.fuse_mount.ops_base import ROOT_INO, OpsBase, op
from chainfs.fuse_mount.state import DirHandle, DirListing
from chainfs.proto import meta_pb2 as mt

# Positions in a directory listing: 0 ".", 1 "..", 2 + k the k-th entry. A reply
# names with each entry the position after it (where the kernel continues).
_FIRST_ENTRY_POS = 3  # what follows entry k: k + _FIRST_ENTRY_POS
_ENTRIES_POS = 2  # the position of entry 0

Entry = tuple[bytes, int, pyfuse3.EntryAttributes]  # (name, ino, attributes)


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
        since, names_since = self._changes, self._mutations
        dir_inode, first = await asyncio.gather(
            self._stat(inode, user),
            self.meta.readdir(inode, b"", self._page, with_attrs=True, user=user),
        )
        d = DirHandle(fh, inode, dir_inode.parent or ROOT_INO, user, dir_inode, changes=since)
        d.answered = [] if self._listing_budget else None
        self._take_page(d, first)
        if not first.more:
            self._install_names(inode, {e.name for e in first.entries}, names_since)
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
            self._reply_entries(token, d.listing.entries, pos - _ENTRIES_POS)
            return
        await self._reply_from_meta(d, token, pos - _ENTRIES_POS)

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
        while (entry := await self._entry_at(d, k)) is not None:
            name, ino, attrs = entry
            if not pyfuse3.readdir_reply(token, name, attrs, k + _FIRST_ENTRY_POS):
                return
            self._remember(ino)
            k += 1

    async def _entry_at(self, d: DirHandle, k: int) -> Entry | None:
        """The k-th entry of the handle's listing (None: past the end), fetching
        meta's pages as needed."""
        if k < d.base:  # rewinddir / seekdir backwards: list again from the start
            d.base, d.page, d.after, d.more, d.fetched = 0, [], b"", True, False
            d.answered = None
        while k >= d.base + len(d.page):
            if d.fetched and not d.more:
                return None
            rsp = await self.meta.readdir(d.ino, d.after, self._page, True, user=d.user)
            self._take_page(d, rsp)
            if not d.page:
                return None
        return d.page[k - d.base]

    # -- plain READDIR (routed by kernel_bridge) ------------------------------------
    def readdir_cached(self, fh: int, pos: int, size: int) -> bytes | None:
        """A plain READDIR answered from a kept listing, or None when the handle
        lists from meta (then :meth:`readdir_plain`). No kernel lookup reference
        is taken by these entries: nothing to remember."""
        d = self._dirs.get(fh)
        with fuse_metrics.REQUESTS.observe("readdir_plain"):
            if d is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            if d.listing is None:
                return None
            self.counters.fuse["readdir_plain"] += 1
            listing = d.listing
            if listing.packed is None:
                listing.packed = _pack(d, listing.entries)
            return listing.packed.reply(pos, size)

    @op
    async def readdir_plain(self, fh: int, pos: int, size: int) -> bytes:
        """A plain READDIR of a handle listing from meta: whole records from
        ``pos`` on, at most ``size`` bytes."""
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        records: list[bytes] = []
        used = 0

        def fits(record: bytes) -> bool:
            nonlocal used
            if used + len(record) > size:
                return False
            records.append(record)
            used += len(record)
            return True

        for j, (ino, name) in enumerate(_dots(d)):
            if pos == j:
                if not fits(dirent(ino, j + 1, name, stat_mod.S_IFDIR)):
                    return b"".join(records)
                pos += 1
        k = max(pos - _ENTRIES_POS, 0)
        while (entry := await self._entry_at(d, k)) is not None:
            name, ino, attrs = entry
            if not fits(dirent(ino, k + _FIRST_ENTRY_POS, name, attrs.st_mode)):
                break
            k += 1
        return b"".join(records)

    @op
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return  # every namespace change is durable at meta once answered


def _dots(d: DirHandle) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    return ((d.ino, b"."), (d.parent, b".."))


def _pack(d: DirHandle, entries: list[Entry]) -> PackedDirents:
    """Every record of a complete listing, positions 0 ("."), 1 (".."), 2 + k."""
    packed = PackedDirents()
    for ino, name in _dots(d):
        packed.add(ino, name, stat_mod.S_IFDIR)
    for name, ino, attrs in entries:
        packed.add(ino, name, attrs.st_mode)
    return packed
