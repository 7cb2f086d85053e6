"""What every FUSE handler shares: the mount's state, answering requests, attributes, name lists.

Every handler (decorated with :func:`op`) answers: chainfs errors become their
errno, anything unexpected is logged and answered EIO, and a request stuck on
an unreachable cluster is answered EIO after ``cluster_timeout_ms`` (plus a
margin; see stuck_guard). Name lists of small directories are kept for a
short while so that lookups of absent names (compilers and interpreters make
many) are answered without asking meta.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from chainfs.client.chunk_io import ChunkIO
from chainfs.common.dataplane.buffers import BufferPool
from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_client import MetaClient, UserInfo, mode_bits
from chainfs.common.units import MiB
from chainfs.fuse_mount import metrics as fuse_metrics
from chainfs.fuse_mount.config import MountConfig
from chainfs.fuse_mount.state import (
    DirAttrCache,
    DirHandle,
    DirListing,
    DirNames,
    FileHandle,
    GroupsCache,
    OpenInode,
)
from chainfs.fuse_mount.stuck_guard import StuckGuard
from chainfs.proto import meta_pb2 as mt

log = logging.getLogger("chainfs.fuse_mount.ops")

P = ParamSpec("P")
T = TypeVar("T")

ROOT_INO = 1

# Read replies: the kernel asks at most 1 MiB per request (FUSE max_pages).
MAX_READ_BYTES = MiB
# Margin on top of the client's own timeouts before a request is cut short.
_GUARD_MARGIN_S = 5.0
# Name lists kept for negative lookups: directories of at most this many
# entries, at most this many directories (least recently used dropped).
NAMES_MAX_ENTRIES = 4096
_NAMES_MAX_DIRS = 64
# Directories whose last change of names the mount remembers (older ones count
# as changed just now for a listing fetched across their eviction).
_CHANGED_DIRS = 4096
# Directories, and files, whose attributes the mount keeps to answer getattr
# (least recently used dropped).
_DIR_ATTRS_MAX = 4096
_FILE_ATTRS_MAX = 4096
# Bound on the (size, mtime) versions remembered of attributes told to the kernel.
_TOLD_MAX = 1 << 16
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


Ops = TypeVar("Ops", bound="OpsBase")

# Requests that may change a name, an attribute or a file's bytes: while one
# runs and once it ran, no listing fetched earlier is answered from the cache.
_CHANGING_REQUESTS = frozenset(
    {
        "setattr",
        "mknod",
        "mkdir",
        "unlink",
        "rmdir",
        "symlink",
        "rename",
        "link",
        "create",
        "write",
        "setxattr",  # ctime
        "removexattr",
    }
)
# Requests that change something only on a handle open for writing.
_WRITE_HANDLE_REQUESTS = frozenset({"flush", "fsync", "release"})


def replied(rsp: Any, *fields: str) -> list[mt.Inode]:
    """The directories a change's reply carries in ``fields`` (absent in a replay)."""
    return [getattr(rsp, f) for f in fields if rsp.HasField(f)]


class RequestCounters:
    """FUSE requests served, meta RPCs sent, and requests answered from what the
    mount keeps instead of a meta RPC (``local``), by name, ever. Among the meta
    counts, ``StatPaths`` is not an RPC: the paths stat'ed, alone or batched.

    Logged on SIGUSR2 (see mount.py): the difference of two dumps around a
    workload says what one POSIX operation costs in requests and round trips.
    """

    def __init__(self) -> None:
        self.fuse: collections.Counter[str] = collections.Counter()
        self.meta: collections.Counter[str] = collections.Counter()
        self.local: collections.Counter[str] = collections.Counter()

    def count_meta_calls(self, meta: MetaClient) -> None:
        """Count every RPC ``meta`` sends (all its methods go through ``call``)."""
        send = meta.call

        async def counted(method: str, request: Any) -> Any:
            self.meta[method] += 1
            # Paths stat'ed at meta, whether alone (Stat) or several callers'
            # lookups in one BatchStat (MetaClient's stat coalescer).
            if method == "Stat":
                self.meta["StatPaths"] += 1
            elif method == "BatchStat":
                self.meta["StatPaths"] += len(request.ats)
            return await send(method, request)

        setattr(meta, "call", counted)  # noqa: B010  # an instance override, not a class change

    def summary(self) -> str:
        fuse = " ".join(f"{k}={v}" for k, v in sorted(self.fuse.items()))
        meta = " ".join(f"{k}={v}" for k, v in sorted(self.meta.items()))
        local = " ".join(f"{k}={v}" for k, v in sorted(self.local.items()))
        return (
            f"fuse requests: {fuse or '-'}; meta rpcs: {meta or '-'}; local answers: {local or '-'}"
        )


def op(
    fn: Callable[Concatenate[Ops, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Ops, P], Coroutine[Any, Any, T]]:
    """Answer every request: errno for known failures, EIO (logged) for the rest."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Ops, *args: P.args, **kwargs: P.kwargs) -> T:
        with fuse_metrics.REQUESTS.observe(name):
            return await answer(self, *args, **kwargs)

    async def answer(self: Ops, *args: P.args, **kwargs: P.kwargs) -> T:
        self.counters.fuse[name] += 1
        changing = self._may_change(name, args)
        if changing:
            self._changes += 1  # before: a listing fetched from now on is not kept
        request = self.guard.enter(name, args)
        stuck = False
        try:
            try:
                return await fn(self, *args, **kwargs)
            finally:
                stuck = self.guard.leave(request)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:  # ChainfsError included: its errno is the mapped one
            code = e.errno or errno.EIO
            level = logging.WARNING if code in _ALARMING_ERRNOS else logging.DEBUG
            log.log(level, "%s%r: %s", name, args[:2], e)
            raise pyfuse3.FUSEError(errno.EIO if code in _UNREACHABLE_ERRNOS else code) from None
        except asyncio.CancelledError:
            if stuck:  # the guard cut it short: the cluster did not answer in time
                log.warning("%s%r: no answer in %.1fs: EIO", name, args[:2], self.guard.limit_s)
                raise pyfuse3.FUSEError(errno.EIO) from None
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
        finally:
            if changing:
                self._changes += 1  # after: a listing fetched meanwhile is not used

    return wrapper


class OpsBase(pyfuse3.Operations):
    """The state of one mount and the helpers every group of handlers uses."""

    supports_dot_lookup = True

    def __init__(self, io: ChunkIO, config: MountConfig) -> None:
        super().__init__()
        self.io = io  # the client's chunk I/O engine: file bytes and the meta client
        self.config = config
        self.meta: MetaClient = io.meta
        self.counters = RequestCounters()
        self.counters.count_meta_calls(self.meta)
        self.enable_writeback_cache = config.writeback_cache
        self._attr_timeout_s = config.attr_timeout_ms / 1000
        self._entry_timeout_s = config.entry_timeout_ms / 1000
        self._negative_timeout_s = config.negative_timeout_ms / 1000
        # Requests stuck on an unreachable cluster are answered EIO after the
        # client's own timeouts plus a margin.
        self.guard = StuckGuard(
            max(config.cluster_timeout_ms, io.config.meta_timeout_ms) / 1000 + _GUARD_MARGIN_S,
            config.stuck_sweep_interval_ms / 1000,
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
        # The number (self._mutations) of the last change of each directory's
        # names, for the most recently changed _CHANGED_DIRS directories; a
        # directory evicted from it counts as changed at _changed_floor.
        self._dir_changed: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._changed_floor = 0
        self._changes = 0  # requests that may change something, counted at start and end
        # Complete listings by (directory, caller), least recently used first.
        self._listings: collections.OrderedDict[
            tuple[int, int, int, tuple[int, ...]], DirListing
        ] = collections.OrderedDict()
        self._listed_entries = 0  # entries held in self._listings
        self._listing_budget = config.readdir_cache_entries
        self._listing_ttl_s = min(self._attr_timeout_s, self._entry_timeout_s) / 2
        # (size, mtime_ns) of the attributes the kernel last got from us, by inode.
        self._told: dict[int, tuple[int, int]] = {}
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None  # (expires, answer)
        self._dir_attrs = DirAttrCache(self._attr_timeout_s, _DIR_ATTRS_MAX)
        # Files' attributes as meta answered this mount's own changes of them
        # (length reports, setattr, link, open) or a Stat no change overlapped.
        self._file_attrs = DirAttrCache(
            self._attr_timeout_s, _FILE_ATTRS_MAX, kinds=frozenset({mt.FILE})
        )
        # Reply buffers of reads, reused (a fresh 1 MiB buffer costs 256 page faults);
        # room for every concurrent request, twice over.
        room = 2 * config.max_requests * MAX_READ_BYTES
        self._read_buffers = BufferPool(room, room // 2)
        budget = config.readahead_budget_bytes
        self._readahead_buffers = BufferPool(budget, budget // 2) if budget else None
        self.on_init: Callable[[], None] | None = None  # run once the kernel handshake is done

    # -- helpers ---------------------------------------------------------------
    def _may_change(self, request: str, args: tuple[Any, ...]) -> bool:
        """Whether a request may change a name, an attribute or a file's bytes."""
        if request in _CHANGING_REQUESTS:
            return True
        if request == "open":  # (inode, flags, ctx)
            return bool(args[1] & (os.O_ACCMODE | os.O_TRUNC))
        if request in _WRITE_HANDLE_REQUESTS:  # (fh, ...)
            h = self._files.get(args[0])
            return h is None or h.writable
        return False

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
        self,
        inode: mt.Inode,
        entry_timeout: float | None = None,
        attr_timeout: float | None = None,
    ) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = 0
        e.entry_timeout = self._entry_timeout_s if entry_timeout is None else entry_timeout
        e.attr_timeout = self._attr_timeout_s if attr_timeout is None else attr_timeout
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
        e.st_rdev = inode.rdev
        chunk = inode.layout.chunk_size if inode.type == mt.FILE else 0
        e.st_blksize = min(chunk, 1 << 20) if chunk else 4096
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = mtime_ns
        e.st_ctime_ns = ctime_ns
        if len(self._told) >= _TOLD_MAX:
            self._told.clear()  # forgetting is safe: an unknown version is invalidated
        self._told[inode.ino] = (size, mtime_ns)
        return e

    def _refresh_kernel_attrs(self, inode: mt.Inode) -> None:
        """Drop the kernel's attributes of ``inode`` if meta's length or mtime differ.

        Close-to-open: an open must see what another client wrote before its
        close, but the kernel would read only up to the length it cached
        (for up to the attribute timeout). Done here, before the open is
        answered: an attributes-only invalidation takes no lock an open holds.
        """
        if self._told.get(inode.ino) == (inode.size, inode.mtime_ns):
            return
        self._told.pop(inode.ino, None)
        try:
            pyfuse3.invalidate_inode(inode.ino, attr_only=True)
        except OSError as e:  # ENOENT: the kernel has forgotten the inode already
            log.debug("invalidating attributes of inode %d: %s", inode.ino, e)

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
        return nc.complete and name not in nc.names

    def _install_names(
        self, parent: int, names: set[bytes], since: int, complete: bool = True
    ) -> None:
        """Keep a complete listing fetched while no change of ``parent``'s names
        went through us (or, ``complete`` False, that the directory is too big
        to list). ``since``: ``self._mutations`` when the fetch started."""
        if self._negative_timeout_s <= 0:
            return
        if max(self._dir_changed.get(parent, 0), self._changed_floor) > since:
            return  # a change here may have landed after meta's listing: it may miss it
        if len(names) > NAMES_MAX_ENTRIES:
            return
        expires = time.monotonic() + self._negative_timeout_s
        self._names[parent] = DirNames(expires, names, complete)
        self._names.move_to_end(parent)
        while len(self._names) > _NAMES_MAX_DIRS:
            self._names.popitem(last=False)

    def _names_changed(
        self, added: Sequence[tuple[int, bytes]], removed: Sequence[tuple[int, bytes]]
    ) -> None:
        """Count a change of names (done or failed) in these directories."""
        self._mutations += 1
        if self._negative_timeout_s <= 0:
            return  # no name lists are kept (_install_names): nothing reads the counts
        changed = self._dir_changed
        for parent, _ in (*added, *removed):
            changed[parent] = self._mutations
            changed.move_to_end(parent)
        while len(changed) > _CHANGED_DIRS:
            _, n = changed.popitem(last=False)
            self._changed_floor = max(self._changed_floor, n)

    async def _list_names(self, parent: int, user: UserInfo) -> None:
        if self._negative_timeout_s <= 0 or parent in self._names:
            return
        since = self._mutations
        try:
            rsp = await self.meta.readdir(parent, b"", NAMES_MAX_ENTRIES, False, user=user)
        except ChainfsError:
            return  # e.g. no read permission: no list, lookups ask meta
        if rsp.more:
            self._install_names(parent, set(), since, complete=False)
        else:
            self._install_names(parent, {e.name for e in rsp.entries}, since)

    async def _stat(self, ino: int, user: UserInfo) -> mt.Inode:
        """Meta's Stat of ``ino``; its attributes are kept for getattr."""
        stamps = self._dir_attrs.stamp(), self._file_attrs.stamp()
        inode = await self.meta.stat(ino, follow=False, user=user)
        self._learn(inode, stamps)
        return inode

    def _learn(self, inode: mt.Inode, stamps: tuple[tuple[int, float], tuple[int, float]]) -> None:
        self._dir_attrs.learn(inode, stamps[0])
        self._file_attrs.learn(inode, stamps[1])

    @contextlib.contextmanager
    def _changing_file(self, ino: int, changes: bool = True) -> Iterator[list[mt.Inode]]:
        """A request that may change file ``ino``'s attributes (at meta, or once
        its writes are reported): none kept of it meanwhile; what the caller
        puts in the yielded list (meta's reply) is kept after. ``changes``
        False: this request changes nothing after all (a close with nothing
        written since the last report)."""
        left: list[mt.Inode] = []
        if not changes:
            yield left
            return
        change = self._file_attrs.begin([ino])
        try:
            yield left
        except BaseException:
            self._file_attrs.end(change)
            raise
        self._file_attrs.end(change, left)

    async def _touching(self, ino: int, change: Awaitable[T]) -> T:
        """A change of ``ino``'s own attributes (setattr, xattrs): none kept of it meanwhile."""
        dir_change = self._dir_attrs.begin([ino])
        try:
            return await change
        finally:
            self._dir_attrs.end(dir_change)

    async def _changing(
        self,
        change: Awaitable[T],
        added: Sequence[tuple[int, bytes]] = (),
        removed: Sequence[tuple[int, bytes]] = (),
        dirs: Iterable[int] = (),
        left: Callable[[T], Iterable[mt.Inode]] | None = None,
    ) -> T:
        """Run a change; keep the name lists and attributes of its directories
        (those of ``added`` and ``removed``, and ``dirs``) current: ``left``
        says, from the reply, how the change left them."""
        dir_change = self._dir_attrs.begin([*(p for p, _ in (*added, *removed)), *dirs])
        try:
            result = await change
        except BaseException:
            self._dir_attrs.end(dir_change)
            self._names_changed(added, removed)
            for parent, _ in (*added, *removed):
                self._names.pop(parent, None)  # outcome unknown: forget the list
            raise
        self._dir_attrs.end(dir_change, left(result) if left is not None else ())
        self._names_changed(added, removed)
        for parent, name in removed:
            nc = self._names.get(parent)
            if nc is not None:
                nc.names.discard(name)
        for parent, name in added:
            nc = self._names.get(parent)
            if nc is not None:
                nc.names.add(name)
                if len(nc.names) > NAMES_MAX_ENTRIES:
                    del self._names[parent]
        return result
