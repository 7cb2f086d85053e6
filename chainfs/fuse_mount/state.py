"""What the mount remembers between FUSE requests: open inodes, handles, listings, callers.

Meta is the source of truth; this is only what the kernel's protocol makes us
keep (file handles, directory cursors, lookup counts) plus the write-back data
of files open for writing in this mount.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyfuse3

from chainfs.client.chunk_io import OpenHandle
from chainfs.client.file import AsyncFile
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.fuse_mount.dirents import PackedDirents
from chainfs.fuse_mount.readahead import ReadAhead
from chainfs.proto import meta_pb2 as mt

# Supplementary groups of a caller, read from /proc/<pid>/status: kept this long
# and for at most this many pids (a bound; the kernel already checked
# permissions when default_permissions is on, meta checks again with these).
GROUPS_TTL_S = 2.0
GROUPS_CACHE_MAX = 1024


@dataclass
class OpenInode:
    """A file with at least one open handle in this mount."""

    ino: int
    handle: OpenHandle  # inode + layout for the client's chunk I/O (no meta session)
    size: int  # largest length we told the kernel or meta told us (local truncate lowers it)
    handles: int = 0
    write_handles: int = 0
    # One write-back writer per inode shared by all its handles, so a read
    # through any handle first pushes what any other handle wrote.
    writer: AsyncFile | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False  # bytes written since the length was last reported to meta
    write_mtime_ns: int = 0  # time of our last write (meta learns it on flush)
    # The session keeping a read-only-open file alive at meta until the last
    # release (a read session from open, or a write one taken before an unlink).
    hold_session: bytes = b""
    # Meta said the file has no security.capability: the kernel asks before
    # every write (to drop capabilities); answered here while the file is open.
    no_caps: bool = False
    # Bumped by every write and truncate through the mount: read-ahead blocks
    # fetched under an older generation are not used.
    generation: int = 0
    # A write failed or was cut short: buffered data may be lost, so every later
    # flush/fsync of the file answers EIO until its last handle is closed.
    write_failed: bool = False

    def known_size(self) -> int:
        if self.writer is not None:
            return max(self.size, self.writer.size())
        return self.size


@dataclass
class FileHandle:
    fh: int
    ino: int
    session: bytes  # meta write session; b"" for read-only opens
    readable: bool
    writable: bool
    readahead: ReadAhead | None = None


@dataclass
class DirListing:
    """A directory's complete listing as answered to the kernel, reused by later opendirs.

    Valid until ``expires`` and only while no change went through this mount
    since it was fetched (``changes`` is the mount's change count then).
    """

    expires: float  # time.monotonic()
    changes: int
    dir_inode: mt.Inode
    entries: list[tuple[bytes, int, pyfuse3.EntryAttributes]]  # (name, ino, attributes)
    # The plain READDIR records of ".", ".." and the entries, packed at its first use.
    packed: PackedDirents | None = None


@dataclass
class DirHandle:
    """A directory listing cursor: offsets are entry positions, counted from 1."""

    fh: int
    ino: int
    parent: int
    user: UserInfo
    dir_inode: mt.Inode
    base: int = 0  # position of page[0] among the listing's entries (after . and ..)
    page: list[tuple[bytes, int, pyfuse3.EntryAttributes]] = field(default_factory=list)
    after: bytes = b""  # the last name fetched (meta pages after it)
    more: bool = True  # meta has entries after `after`
    fetched: bool = False  # the first page has been asked for
    # Served from the mount's listing cache (no meta calls) when set.
    listing: DirListing | None = None
    # Attributes answered so far, in listing order, while the listing may still
    # be kept whole (complete from the first entry, no change meanwhile).
    answered: list[tuple[bytes, int, pyfuse3.EntryAttributes]] | None = None
    changes: int = 0  # the mount's change count at opendir


@dataclass
class DirNames:
    """Every name of a small directory, as listed by meta at one moment.

    Lets a lookup of a name that is not there answer ENOENT without asking
    meta (unlink of absent names, the lookup before each create); our own
    changes keep it current, other clients' show after it expires.
    """

    expires: float  # time.monotonic()
    names: set[bytes]
    # False: the directory was too big to list; lookups ask meta until expires
    # (kept so that every lookup of an absent name does not list it again).
    complete: bool = True


@dataclass(frozen=True)
class DirChange:
    """A change of directories through this mount, from :meth:`DirAttrCache.begin`."""

    dirs: tuple[int, ...]
    sent: float  # the cache's clock (time.monotonic()) when it was sent


class DirAttrCache:
    """Directory attributes learned from meta's answers (lookups, Stats, the
    replies of namespace changes), answering getattr of a directory for
    ``ttl_s`` from when they were asked for (the attribute timeout), without a
    Stat; at most ``max_entries`` directories, least recently used dropped.
    With ``kinds`` it keeps inodes of those types instead (the mount keeps a
    second one for files: the replies of its length reports and setattrs).

    This mount's own changes are never hidden: a change drops its directories'
    entries when it starts (:meth:`begin`) and keeps the attributes its reply
    carries when it ends (:meth:`end`), unless another change of the same
    directory through this mount overlapped it (their order at meta is
    unknown): then the next getattr asks meta. An answer to a lookup or Stat is
    kept only if no change through this mount started or ended since it was
    sent (:meth:`stamp`, then :meth:`learn`).
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        kinds: frozenset[int] = frozenset({mt.DIRECTORY}),
    ) -> None:
        self._clock = clock
        self._kinds = kinds
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: collections.OrderedDict[int, tuple[float, mt.Inode]] = (
            collections.OrderedDict()
        )
        self._busy: dict[int, int] = {}  # directory -> changes in flight through this mount
        self._contended: set[int] = set()  # busy directories whose changes overlapped
        self._events = 0  # changes started or ended, ever

    def __len__(self) -> int:
        return len(self._entries)

    def stamp(self) -> tuple[int, float]:
        """Taken before asking meta; :meth:`learn` keeps the answer only if still current."""
        return self._events, self._clock()

    def get(self, ino: int) -> tuple[mt.Inode, float] | None:
        """The attributes of directory ``ino`` and the seconds they stay valid, if known."""
        hit = self._entries.get(ino)
        if hit is None:
            return None
        left_s = hit[0] - self._clock()
        if left_s <= 0:
            del self._entries[ino]
            return None
        self._entries.move_to_end(ino)
        return hit[1], left_s

    def learn(self, inode: mt.Inode, stamp: tuple[int, float]) -> None:
        """Keep a directory's attributes from an answer to a request sent at ``stamp``."""
        events, sent = stamp
        if inode.type in self._kinds and events == self._events and inode.ino not in self._busy:
            self._put(inode, sent)

    def begin(self, dirs: Iterable[int]) -> DirChange:
        """A change of ``dirs`` is sent: forget them until it is answered."""
        change = DirChange(tuple(dict.fromkeys(dirs)), self._clock())
        self._events += 1
        for ino in change.dirs:
            n = self._busy.get(ino, 0)
            if n:
                self._contended.add(ino)
            self._busy[ino] = n + 1
            self._entries.pop(ino, None)
        return change

    def end(self, change: DirChange, left: Iterable[mt.Inode] = ()) -> None:
        """``change`` was answered (or failed: nothing ``left``); ``left`` holds
        directories of ``change.dirs`` as its reply says it left them."""
        self._events += 1
        alone: set[int] = set()
        for ino in change.dirs:
            n = self._busy[ino] - 1
            if n:
                self._busy[ino] = n
                continue
            del self._busy[ino]
            if ino in self._contended:
                self._contended.discard(ino)
            else:
                alone.add(ino)
        for inode in left:
            if inode.ino in alone and inode.type in self._kinds:
                self._put(inode, change.sent)

    def drop(self, ino: int) -> None:
        self._entries.pop(ino, None)

    def clear(self) -> None:
        self._entries.clear()

    def forget(self, ino: int) -> None:
        """``ino`` changed through this mount without :meth:`begin` (found to be an
        existing file only from the reply): keep nothing of it from before."""
        self._events += 1
        self._entries.pop(ino, None)
        if ino in self._busy:
            self._contended.add(ino)

    def forget_all(self) -> None:
        """A change of inodes not known yet (an unlink's file): keep nothing
        now, and nothing asked for before it."""
        self._events += 1
        self._entries.clear()

    def _put(self, inode: mt.Inode, sent: float) -> None:
        if self._ttl_s <= 0 or self._max_entries <= 0:
            return
        self._entries[inode.ino] = (sent + self._ttl_s, inode)
        self._entries.move_to_end(inode.ino)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class GroupsCache:
    """Supplementary group ids of calling pids (bounded, short-lived)."""

    def __init__(self) -> None:
        self._entries: collections.OrderedDict[int, tuple[float, tuple[int, ...]]] = (
            collections.OrderedDict()
        )

    def get(self, pid: int) -> tuple[int, ...]:
        if pid <= 0:
            return ()
        now = time.monotonic()
        hit = self._entries.get(pid)
        if hit is not None and now - hit[0] < GROUPS_TTL_S:
            return hit[1]
        gids = _read_groups(pid)
        self._entries[pid] = (now, gids)
        self._entries.move_to_end(pid)
        while len(self._entries) > GROUPS_CACHE_MAX:
            self._entries.popitem(last=False)
        return gids


def _read_groups(pid: int) -> tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(x) for x in line.split()[1:])
    except (OSError, ValueError):
        pass  # the caller exited already: its primary gid is all we know
    return ()


def permitted(inode: mt.Inode, mode: int, user: UserInfo) -> bool:
    """access(2) against the mode bits: R_OK/W_OK/X_OK (F_OK: exists)."""
    want = mode & (os.R_OK | os.W_OK | os.X_OK)
    if not want:
        return True
    perms = inode.mode
    if user.uid == 0:  # root: anything, but execute only if some x bit is set
        return not (want & os.X_OK and inode.type != mt.DIRECTORY and not perms & 0o111)
    if user.uid == inode.uid:
        bits = (perms >> 6) & 7
    elif user.gid == inode.gid or inode.gid in user.gids:
        bits = (perms >> 3) & 7
    else:
        bits = perms & 7
    return want & bits == want
