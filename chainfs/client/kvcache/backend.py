"""The file-system operations a KV cache is built on, and their one implementation
over an AsyncFileSystem (the only module of the cache that touches the client's engine)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chainfs.client.caps import CapabilityCache
from chainfs.client.chunk_io import ChunkIO, OpenHandle
from chainfs.client.layout import Layout, layout_of, split
from chainfs.common.auth.capability import READ, WRITE
from chainfs.common.dataplane.sync_client import SyncDataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import RENAME_NOREPLACE, XATTR_CREATE, At
from chainfs.proto import meta_pb2 as mt


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """What meta says about one file."""

    ino: int
    size: int
    layout: Layout
    mtime_ns: int
    atime_ns: int

    @property
    def last_access_ns(self) -> int:
        return max(self.mtime_ns, self.atime_ns)


@dataclass(slots=True)
class NewFile:
    """A file created for one value, open for writing (its meta session held)."""

    path: str
    handle: Any  # the backend's own (FsBackend: the client's OpenHandle)
    usable_until_s: float  # time.monotonic() after which its write rights need renewing
    closed: bool = False  # its session ended (published, or closed under its own name)


class SyncReader(Protocol):
    """Reads of an entry's start from the calling thread (any thread, no event loop)."""

    def read(self, info: EntryInfo, view: memoryview) -> bool:
        """Fill ``view`` with the first ``len(view)`` bytes of the file when one
        clean storage answer serves them; False (``view`` then unspecified) for
        anything else: the caller reads through the async path instead."""

    def read_many(self, reads: Sequence[tuple[EntryInfo, memoryview]]) -> list[bool]:
        """Per (file, view): fill ``view`` with the first ``len(view)`` bytes of
        the file when one clean storage answer serves them; False (``view``
        then unspecified) for anything else: the caller reads those through the
        async path instead. The reads go out together (one frame per storage
        node)."""

    def look_up(self, paths: Sequence[str]) -> list[EntryInfo | None] | None:
        """As ``KVCacheBackend.kv_stat_many``, asked of meta from the calling
        thread (one attempt, no retry); None for anything but a clean answer:
        the caller asks through the async path instead."""

    def close(self) -> None:
        """Close its connections (idempotent)."""


class KVCacheBackend(Protocol):
    """The file-system operations a KV cache is built on (AsyncFileSystem provides them)."""

    async def kv_makedirs(self, paths: Sequence[str]) -> None:
        """mkdir -p each path (existing directories are fine)."""

    async def kv_stat_many(self, paths: Sequence[str]) -> list[EntryInfo | None]:
        """Stat files in one batch; None where the path (or its parent) does not exist."""

    async def kv_read_many(self, reads: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        """Read ``len(view)`` bytes at ``offset`` of each file straight into ``view``,
        all in parallel through the chunk path; the bytes actually received per
        read (fewer when chunks are gone: never zero-filled)."""

    async def kv_open_new(self, path: str) -> NewFile:
        """Create ``path`` exclusively (EEXIST if present) and open it for writing."""

    async def kv_write_new(self, f: NewFile, parts: Sequence[memoryview]) -> None:
        """Write ``parts`` one after the other from offset 0 of ``f`` (acknowledged
        by every replica when this returns)."""

    async def kv_publish(self, f: NewFile, length: int, dst: str, replace: bool) -> None:
        """Close ``f`` (``length`` bytes, all written) and rename it to ``dst`` in
        one commit. A refused rename (EEXIST when ``dst`` exists and not
        ``replace``, ENOENT, ...) raises with ``f.closed`` set: the file is closed
        under its own name."""

    async def kv_discard(self, f: NewFile, wrote: bool) -> None:
        """Remove ``f``'s name and end its write session if it is still open
        (``wrote``: bytes may have reached storage, so they are collected too)."""

    async def kv_rename(self, src: str, dst: str, replace: bool) -> None:
        """Atomic rename; EEXIST when ``dst`` exists and not ``replace``."""

    async def kv_unlink(self, path: str) -> bool:
        """Remove a file; False if it did not exist."""

    def kv_list(self, path: str) -> AsyncIterator[list[tuple[str, EntryInfo | None]]]:
        """Pages of (name, info) of a directory (info None for non-files)."""

    async def kv_set_atime(self, path: str, atime_ns: int) -> None:
        """Set a file's access time (ENOENT is not an error)."""

    def kv_sync_reader(self, connections_per_node: int, timeout_ms: float) -> SyncReader | None:
        """A reader for callers' threads with at most ``connections_per_node``
        connections per storage node, each socket operation bounded by
        ``timeout_ms``; None when this backend has none (or TLS is on)."""

    async def kv_xattr_create(self, path: str, name: str, value: bytes) -> bool:
        """Set an extended attribute unless it exists (atomically); whether it was set."""

    async def kv_xattr_get(self, path: str, name: str) -> bytes | None:
        """An extended attribute's value, None if it is not set."""


class FsBackend:
    """KVCacheBackend over the client's chunk I/O engine: meta calls through its
    MetaClient, chunk reads through its parallel chunk path (batched per storage
    node, into the views), new values written chunk by chunk straight from the
    caller's buffers, then published by one meta call (close + rename)."""

    def __init__(self, io: ChunkIO, file_mode: int) -> None:
        self._file_mode = file_mode  # of new entries (the client's umask applied)
        self._io = io
        self._meta = io.meta
        caps = io.storage.caps
        self._caps = caps if isinstance(caps, CapabilityCache) else None
        self._read_pieces = io.read_pieces
        self._readdir_page_entries = io.config.readdir_page_entries
        # Directory path -> (inode id, when resolved): entries are then named
        # (directory inode, name), which meta resolves with one lookup instead
        # of a walk from the root. Trusted for _DIR_INO_TTL_S, so a cache
        # directory removed and made again is noticed within that time.
        self._dirs: dict[str, tuple[int, float]] = {}

    def _young_dir(self, d: str, now: float) -> int | None:
        """The inode id of directory ``d`` if learned within _DIR_INO_TTL_S of
        ``now`` (one dict read: callers' threads use it too; the loop writes)."""
        known = self._dirs.get(d)
        return None if known is None or now - known[1] > _DIR_INO_TTL_S else known[0]

    def _note_dir(self, d: str, found: mt.Inode | ChainfsError, now: float) -> None:
        """Remember what a stat or mkdir of ``d`` answered (forget it unless a directory)."""
        if isinstance(found, ChainfsError) or found.type != mt.DIRECTORY or not found.ino:
            self._dirs.pop(d, None)
        else:
            self._dirs[d] = (found.ino, now)

    async def _dir_inos(self, dirs: set[str], fetch: bool = True) -> dict[str, int]:
        """Inode ids of directories: cached ones, and (``fetch``) stale ones asked of meta."""
        now = time.monotonic()
        stale = [d for d in dirs if self._young_dir(d, now) is None]
        if stale and not fetch:
            return {d: self._dirs[d][0] for d in dirs if d not in stale}
        if stale:
            found = await self._meta.batch_stat(stale, follow=True)
            for d, r in zip(stale, found, strict=True):
                self._note_dir(d, r, now)
        return {d: self._dirs[d][0] for d in dirs if d in self._dirs}

    async def _ats(self, paths: Sequence[str], fetch: bool = True) -> list[At]:
        """(directory inode, name) for each path whose directory is known, else the
        path (``fetch``: directories not known are looked up first)."""
        parts = [p.rsplit("/", 1) for p in paths]
        inos = await self._dir_inos({d or "/" for d, _ in parts}, fetch)
        out: list[At] = []
        for p, (d, name) in zip(paths, parts, strict=True):
            ino = inos.get(d or "/")
            out.append(p if ino is None else (ino, name))
        return out

    async def kv_makedirs(self, paths: Sequence[str]) -> None:
        found = await self._meta.batch_stat(list(paths), follow=True)
        missing = [
            p
            for p, r in zip(paths, found, strict=True)
            if isinstance(r, ChainfsError) and r.code in (Code.ENOENT, Code.ENOTDIR)
        ]
        for p, r in zip(paths, found, strict=True):
            if isinstance(r, ChainfsError) and p not in missing:
                raise ChainfsError(r.code, r.message, p)
        sem = asyncio.Semaphore(_MKDIR_PARALLEL)

        async def mkdir(p: str) -> None:
            async with sem:
                made = await self._meta.mkdir(p, 0o777, parents=True)
            self._note_dir(p, made, time.monotonic())

        self._dirs.clear()
        now = time.monotonic()
        for p, r in zip(paths, found, strict=True):  # known now: lookups name entries by them
            if p not in missing:
                self._note_dir(p, r, now)
        await asyncio.gather(*(mkdir(p) for p in missing))

    async def kv_stat_many(self, paths: Sequence[str]) -> list[EntryInfo | None]:
        # READ capabilities come along: storage wants them for the reads that follow.
        found = await self._meta.batch_stat(
            await self._ats(paths), follow=False, want_capability=READ
        )
        return _entry_infos(paths, found)

    def _stat_now(
        self, sync: SyncDataClient, paths: Sequence[str]
    ) -> list[EntryInfo | None] | None:
        """:meth:`kv_stat_many` from the calling thread (``SyncReader.look_up``):
        only when every directory's inode is known and young, in one attempt."""
        now = time.monotonic()
        ats: list[At] = []
        for p in paths:
            d, name = p.rsplit("/", 1)
            ino = self._young_dir(d or "/", now)
            if ino is None:
                return None
            ats.append((ino, name))
        found = self._io.meta.batch_stat_now(sync, ats, want_capability=READ)
        if found is None:
            return None
        inodes = [r if isinstance(r, ChainfsError) else r[0] for r in found]
        try:
            return _entry_infos(paths, inodes)
        except ChainfsError:
            return None  # the loop path raises it, with its retries

    async def kv_read_many(self, reads: Sequence[tuple[EntryInfo, int, memoryview]]) -> list[int]:
        work = [
            (info.ino, info.layout, piece, view)
            for info, offset, view in reads
            for piece in split(info.layout, offset, len(view))
        ]
        await self._read_pieces(work)  # missing chunks come back as zeros
        return [len(view) for _, _, view in reads]

    async def kv_open_new(self, path: str) -> NewFile:
        (at,) = await self._ats([path])
        try:
            r = await self._meta.create(at, self._file_mode, exclusive=True)
        except ChainfsError as e:
            if e.code == Code.ENOENT:
                self._dirs.clear()  # perhaps a directory was made again: look it up anew
            raise ChainfsError(e.code, e.message, path) from None
        h = OpenHandle(path, r.inode.ino, layout_of(r.inode), r.inode.size, r.session_id)
        usable_until_s = math.inf
        until_ms = self._caps.usable_until_ms(h.inode, WRITE) if self._caps else None
        if until_ms is not None:  # renewing would cost a meta call in the put: retire it first
            usable_until_s = time.monotonic() + (until_ms - time.time() * 1000) / 1000
        return NewFile(path, h, usable_until_s)

    async def kv_write_new(self, f: NewFile, parts: Sequence[memoryview]) -> None:
        await self._io.write_parts(f.handle, 0, parts)

    async def kv_publish(self, f: NewFile, length: int, dst: str, replace: bool) -> None:
        h: OpenHandle = f.handle
        # A shard directory not known here goes by path: meta resolves it in the
        # publish's own transaction (a lookup first would cost a round trip).
        at_src, at_dst = await self._ats([f.path, dst], fetch=False)
        flags = 0 if replace else RENAME_NOREPLACE
        rsp = await self._meta.close_publish(h.inode, h.session, length, at_src, at_dst, flags)
        f.closed = True
        if rsp.rename.code:
            if rsp.rename.code == Code.ENOENT:
                self._dirs.clear()
            raise ChainfsError(rsp.rename.code, rsp.rename.message, dst)

    async def kv_discard(self, f: NewFile, wrote: bool) -> None:
        await self.kv_unlink(f.path)
        if not f.closed:
            f.closed = True
            h: OpenHandle = f.handle
            # wrote: meta asks storage for the length, so GC drops whatever chunks exist.
            await self._io.close_handle(h, 0, wrote)

    async def kv_rename(self, src: str, dst: str, replace: bool) -> None:
        at_src, at_dst = await self._ats([src, dst])
        try:
            await self._meta.rename(at_src, at_dst, flags=0 if replace else RENAME_NOREPLACE)
        except ChainfsError as e:
            if e.code == Code.ENOENT:
                self._dirs.clear()  # perhaps a directory was made again: look it up anew
            raise

    async def kv_unlink(self, path: str) -> bool:
        (at,) = await self._ats([path])
        try:
            await self._meta.unlink(at)
        except ChainfsError as e:
            if e.code in (Code.ENOENT, Code.ENOTDIR):
                return False
            raise
        return True

    async def kv_list(self, path: str) -> AsyncIterator[list[tuple[str, EntryInfo | None]]]:
        after = b""
        while True:
            try:
                rsp = await self._meta.readdir(
                    path, after, self._readdir_page_entries, with_attrs=True
                )
            except ChainfsError as e:
                if e.code in (Code.ENOENT, Code.ENOTDIR):
                    return
                raise
            page: list[tuple[str, EntryInfo | None]] = []
            for ent in rsp.entries:
                name = ent.name.decode("utf-8", "surrogateescape")
                page.append((name, _entry_info(ent.inode)))
            if page:
                yield page
            if not rsp.more or not rsp.entries:
                return
            after = rsp.entries[-1].name

    async def kv_xattr_create(self, path: str, name: str, value: bytes) -> bool:
        try:
            await self._meta.setxattr(path, name, value, flags=XATTR_CREATE)
        except ChainfsError as e:
            if e.code == Code.EEXIST:
                return False
            raise
        return True

    async def kv_xattr_get(self, path: str, name: str) -> bytes | None:
        try:
            return await self._meta.getxattr(path, name)
        except ChainfsError as e:
            if e.code == Code.ENODATA:
                return None
            raise

    async def kv_set_atime(self, path: str, atime_ns: int) -> None:
        (at,) = await self._ats([path])
        try:
            await self._meta.setattr(at, follow=False, atime_ns=atime_ns)
        except ChainfsError as e:
            if e.code not in (Code.ENOENT, Code.ENOTDIR):
                raise

    def kv_sync_reader(self, connections_per_node: int, timeout_ms: float) -> SyncReader | None:
        io = self._io
        dataplane = io.storage.config.dataplane
        if dataplane.effective_tls().enabled:
            return None  # the blocking sockets are plain: gets take the loop path
        sync = SyncDataClient(
            dataplane, io.config.credential(), connections_per_node, timeout_ms / 1000
        )
        return _ChunkSyncReader(self, io, sync)


class _ChunkSyncReader:
    """SyncReader over the client's engine (``ChunkIO.read_now``, ``read_now_many``,
    ``MetaClient.batch_stat_now``) and its own sockets (to storage nodes and meta)."""

    def __init__(self, backend: FsBackend, io: ChunkIO, sync: SyncDataClient) -> None:
        self._backend = backend
        self._io = io  # its storage client is looked up per read: a fork()ed child has its own
        self.sync = sync

    def look_up(self, paths: Sequence[str]) -> list[EntryInfo | None] | None:
        return self._backend._stat_now(self.sync, paths)

    def read(self, info: EntryInfo, view: memoryview) -> bool:
        return self._io.read_now(self.sync, info.ino, info.layout, view)

    def read_many(self, reads: Sequence[tuple[EntryInfo, memoryview]]) -> list[bool]:
        return self._io.read_now_many(
            self.sync, [(info.ino, info.layout, view) for info, view in reads]
        )

    def close(self) -> None:
        self.sync.close()


_MKDIR_PARALLEL = 16  # directory creations in flight when a cache is first opened
_DIR_INO_TTL_S = 5.0  # a directory's inode id is trusted this long (see FsBackend._dirs)


def _entry_infos(
    paths: Sequence[str], found: Sequence[mt.Inode | ChainfsError]
) -> list[EntryInfo | None]:
    """The entries of a batch stat's answers; None for an absent name (ENOENT,
    ENOTDIR), any other error raised with its path."""
    out: list[EntryInfo | None] = []
    for p, r in zip(paths, found, strict=True):
        if isinstance(r, ChainfsError):
            if r.code in (Code.ENOENT, Code.ENOTDIR):
                out.append(None)
                continue
            raise ChainfsError(r.code, r.message, p)
        out.append(_entry_info(r))
    return out


def _entry_info(inode: mt.Inode) -> EntryInfo | None:
    if inode.type != mt.FILE or not inode.layout.chunk_size or not inode.layout.chains:
        return None
    return EntryInfo(inode.ino, inode.size, layout_of(inode), inode.mtime_ns, inode.atime_ns)


def _chainfs_error(e: OSError, path: str) -> ChainfsError:
    if isinstance(e, ChainfsError):
        return e
    cause = e.__cause__
    if isinstance(cause, ChainfsError):
        return cause
    return ChainfsError(e.errno or Code.EIO, e.strerror or str(e), path)
