"""`chainfs.aio.connect(address)` -> AsyncFileSystem: the async core of the client.

Namespace calls go to meta (any meta server, found through mgmtd's routing
info); file bytes go straight to the storage nodes over the data plane: a
large read is cut at chunk boundaries into groups sent in parallel (bounded
per FileSystem), each group batched per storage node by the storage client,
which picks a serving replica at random, fails over to another replica and
refreshes routing on stale-version answers. Bytes land in the caller's
buffer. Errors reaching the caller are builtin OSError subclasses
(FileNotFoundError, IsADirectoryError, ...) with the errno set.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import secrets
import stat as stat_mod
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from chainfs.client.budget import ByteBudget
from chainfs.client.config import ClientConfig
from chainfs.client.file import AsyncFile, Mode, OpenHandle
from chainfs.client.layout import Layout, Piece, split
from chainfs.common.errors import ChainfsError, Code, to_user_error
from chainfs.common.rpc.meta_client import MetaClient, to_stat_result
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import ReadReq, StorageClient, cut_chunks
from chainfs.proto import meta_pb2 as mt

if TYPE_CHECKING:
    from chainfs.client.kvcache import AsyncKVCache, KVCacheConfig

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

StatResult = os.stat_result
StatVFS = os.statvfs_result
# (path, offset, length); length None (or < 0) reads to the end of the file.
Range = tuple[str, int, int | None]

_ZEROS = bytes(1 << 20)  # source for zero-filling holes without allocating


def _user_errors(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """ChainfsError -> the builtin OSError subclass for its errno, naming the path."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except ChainfsError as e:
            path = args[1] if len(args) > 1 and isinstance(args[1], str) else None
            raise to_user_error(e, path if e.filename is None else None) from None

    return wrapper


def normpath(path: str) -> str:
    """Absolute, no trailing slash; relative paths are taken from the root."""
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if "\x00" in path:
        raise ValueError("embedded null character in path")
    if not path.startswith("/"):
        path = "/" + path
    while "//" in path:
        path = path.replace("//", "/")
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return path


def layout_of(inode: mt.Inode) -> Layout:
    lay = inode.layout
    if not lay.chunk_size or not lay.chains:
        raise ChainfsError(Code.EIO, f"inode {inode.ino} has no usable layout")
    return Layout(chunk_size=lay.chunk_size, chains=tuple(lay.chains)[: lay.stripe or None])


@dataclass(frozen=True)
class DirEntry:
    """One directory entry with its attributes (``stat`` is an os.stat_result)."""

    name: str
    stat: os.stat_result

    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.stat.st_mode)

    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.stat.st_mode)

    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.stat.st_mode)


class AsyncFileSystem:
    """A connection to one chainfs cluster, for coroutines (one event loop)."""

    def __init__(
        self,
        address: str,
        config: ClientConfig,
        mgmt: MgmtClient,
        routing: RoutingCache,
        meta: MetaClient,
        storage: StorageClient,
    ) -> None:
        self.address = address
        self.config = config
        self._mgmt = mgmt
        self._routing = routing
        self._meta = meta
        self._storage = storage
        self._budget = ByteBudget(config.write_buffer_budget_bytes)
        self._read_sem = asyncio.Semaphore(config.max_inflight_reads)
        self._open_files: set[AsyncFile] = set()
        # Read sessions at meta, one per inode however many read-only files of
        # this FileSystem have it open: ino -> [session id, open files using it].
        self._read_sessions: dict[int, list[Any]] = {}
        self._read_session_paths: dict[str, int] = {}  # path opened -> ino of a held session
        # Sessions being ended at meta in the background (close does not wait for it).
        self._session_ends: set[asyncio.Task[None]] = set()
        # Bytes asked of storage by reads since connect (file reads, read_ranges).
        self.storage_read_bytes = 0
        self._kvcaches: weakref.WeakSet[AsyncKVCache] = weakref.WeakSet()  # closed with us
        self._closed = False

    # -- connect / close -----------------------------------------------------
    @classmethod
    async def connect(
        cls, address: str, token: str | None = None, config: ClientConfig | None = None
    ) -> AsyncFileSystem:
        """Reach mgmtd at ``address``, learn the cluster, fail fast if unreachable."""
        if token is not None:
            raise ChainfsError(Code.ENOSYS, "token authentication is not supported by chainfs yet")
        if _fork_state["forked_after_connect"]:
            raise ChainfsError(
                Code.EOPNOTSUPP,
                "this process was forked from one that had opened a chainfs connection, "
                "and gRPC does not survive fork(): start workers with 'spawn' or "
                "'forkserver' (torch: DataLoader(..., multiprocessing_context='spawn'))",
            )
        _fork_state["connected"] = True
        config = config or ClientConfig()
        config.validate()
        timeout_s = config.connect_timeout_ms / 1000
        mgmt = MgmtClient(address, timeout_s=timeout_s)
        routing = RoutingCache(mgmt)
        try:
            await routing.refresh()
        except ChainfsError as e:
            await mgmt.close()
            raise ConnectionError(
                errno.ECONNREFUSED if e.code == Code.UNAVAILABLE else e.errno,
                f"cannot connect to chainfs at {address} within {timeout_s:g}s: {e.message}",
            ) from None
        client_id = secrets.token_bytes(16)
        storage = StorageClient(routing, client_id, config.storage)
        meta = MetaClient(
            routing,
            client_id,
            timeout_s=config.meta_timeout_ms / 1000,
            attempt_timeout_s=config.meta_attempt_timeout_ms / 1000,
        )
        routing.start()
        return cls(address, config, mgmt, routing, meta, storage)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close open files (flushing them), then the connections (idempotent)."""
        if self._closed:
            return
        first_error: BaseException | None = None
        for cache in list(self._kvcaches):
            await cache.close()  # stops its background tasks
        for f in list(self._open_files):
            try:
                await f.close()
            except Exception as e:  # keep closing the rest; report the first
                first_error = first_error or e
        if self._session_ends:  # each bounded by the meta call timeout
            await asyncio.gather(*self._session_ends, return_exceptions=True)
        self._closed = True
        await self._routing.stop()
        await self._meta.aclose()
        await self._storage.close()
        await self._mgmt.close()
        if first_error is not None:
            raise first_error

    async def __aenter__(self) -> AsyncFileSystem:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed chainfs FileSystem")

    # -- namespace -----------------------------------------------------------
    @_user_errors
    async def stat(self, path: str, follow_symlinks: bool = True) -> os.stat_result:
        self._check_open()
        return to_stat_result(await self._meta.stat(normpath(path), follow_symlinks))

    async def lstat(self, path: str) -> os.stat_result:
        return await self.stat(path, follow_symlinks=False)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    async def isdir(self, path: str) -> bool:
        try:
            return stat_mod.S_ISDIR((await self.stat(path)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    async def isfile(self, path: str) -> bool:
        try:
            return stat_mod.S_ISREG((await self.stat(path)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    @_user_errors
    async def scandir(self, path: str = "/") -> list[DirEntry]:
        """Entries of a directory with their attributes, in name order."""
        self._check_open()
        page = self.config.readdir_page_entries
        return [
            DirEntry(os.fsdecode(e.name), to_stat_result(e.inode))
            async for e in self._meta.iterdir(normpath(path), with_attrs=True, page=page)
        ]

    @_user_errors
    async def listdir(self, path: str = "/") -> list[str]:
        self._check_open()
        page = self.config.readdir_page_entries
        return [
            os.fsdecode(e.name)
            async for e in self._meta.iterdir(normpath(path), with_attrs=False, page=page)
        ]

    @_user_errors
    async def mkdir(
        self, path: str, mode: int = 0o777, parents: bool = False, exist_ok: bool = False
    ) -> None:
        """Create a directory; ``parents`` creates missing ancestors (mkdir -p)."""
        self._check_open()
        p = normpath(path)
        if parents and exist_ok:
            await self._meta.mkdir(p, mode, parents=True)  # mkdir -p: one call
            return
        try:
            await self._meta.mkdir(p, mode, parents=False)
            return
        except ChainfsError as e:
            if e.code == Code.EEXIST and exist_ok:
                if stat_mod.S_ISDIR(to_stat_result(await self._meta.stat(p, True)).st_mode):
                    return
                raise
            if e.code != Code.ENOENT or not parents or p == "/":
                raise
        parent = p.rsplit("/", 1)[0] or "/"
        await self._meta.mkdir(parent, mode, parents=True)
        try:
            await self._meta.mkdir(p, mode, parents=False)
        except ChainfsError as e:
            if not (e.code == Code.EEXIST and exist_ok):
                raise

    async def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        await self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    @_user_errors
    async def remove(self, path: str) -> None:
        self._check_open()
        await self._meta.unlink(normpath(path))

    unlink = remove

    @_user_errors
    async def rmdir(self, path: str) -> None:
        self._check_open()
        await self._meta.rmdir(normpath(path))

    @_user_errors
    async def rename(self, src: str, dst: str) -> None:
        """Atomically move ``src`` to ``dst``, replacing a file or an empty directory there."""
        self._check_open()
        await self._meta.rename(normpath(src), normpath(dst))

    @_user_errors
    async def symlink(self, target: str, path: str) -> None:
        """Create ``path`` as a symbolic link to ``target`` (os.symlink's order)."""
        self._check_open()
        await self._meta.symlink(target, normpath(path))

    @_user_errors
    async def link(self, src: str, dst: str) -> None:
        """Create ``dst`` as a hard link to the file ``src``."""
        self._check_open()
        await self._meta.link(normpath(src), normpath(dst))

    @_user_errors
    async def readlink(self, path: str) -> str:
        self._check_open()
        return await self._meta.readlink(normpath(path))

    @_user_errors
    async def truncate(self, path: str, length: int) -> None:
        self._check_open()
        if length < 0:
            raise ChainfsError(Code.EINVAL, f"negative length {length}", path)
        await self._meta.setattr(normpath(path), follow=True, size=length)

    @_user_errors
    async def chmod(self, path: str, mode: int) -> None:
        self._check_open()
        await self._meta.setattr(normpath(path), follow=True, mode=mode & 0o7777)

    @_user_errors
    async def chown(self, path: str, uid: int, gid: int) -> None:
        """Change owner and group; -1 leaves one unchanged (as os.chown)."""
        self._check_open()
        if uid != -1 or gid != -1:
            await self._meta.chown(normpath(path), uid, gid)

    @_user_errors
    async def utime(
        self,
        path: str,
        times: tuple[float, float] | None = None,
        *,
        ns: tuple[int, int] | None = None,
    ) -> None:
        """Set (atime, mtime) like os.utime: seconds, or ``ns=``; neither = now."""
        self._check_open()
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        p = normpath(path)
        if ns is not None:
            await self._meta.setattr(p, follow=True, atime_ns=ns[0], mtime_ns=ns[1])
        elif times is not None:
            a, m = (round(t * 1e9) for t in times)
            await self._meta.setattr(p, follow=True, atime_ns=a, mtime_ns=m)
        else:
            await self._meta.setattr(p, follow=True, atime_now=True, mtime_now=True)

    @_user_errors
    async def statfs(self) -> os.statvfs_result:
        """File-system totals as an ``os.statvfs_result``."""
        self._check_open()
        rsp = await self._meta.statfs()
        bsize = rsp.block_size or 4096
        blocks, free = rsp.capacity_bytes // bsize, rsp.free_bytes // bsize
        files = max(rsp.inodes_allocated, 1) * 2
        ffree = files - rsp.inodes_allocated
        return os.statvfs_result(
            (bsize, bsize, blocks, free, free, files, ffree, ffree, 0, rsp.max_name_bytes or 255)
        )

    @_user_errors
    async def getxattr(self, path: str, name: str) -> bytes:
        self._check_open()
        return await self._meta.getxattr(normpath(path), os.fsencode(name))

    @_user_errors
    async def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self._check_open()
        await self._meta.setxattr(normpath(path), os.fsencode(name), bytes(value), flags)

    @_user_errors
    async def listxattr(self, path: str) -> list[str]:
        self._check_open()
        return await self._meta.listxattr(normpath(path))

    @_user_errors
    async def removexattr(self, path: str, name: str) -> None:
        self._check_open()
        await self._meta.removexattr(normpath(path), os.fsencode(name))

    # -- files ---------------------------------------------------------------
    @_user_errors
    async def open(self, path: str, mode: str = "rb", buffering: int = -1) -> AsyncFile:
        """Open a file in a binary mode (r, w, a, x, with + and b) -> AsyncFile.

        ``buffering`` as builtin open: 0 unbuffered (reads fetch exactly what
        they ask, writes reach storage before returning), N > 1 a read buffer
        of N bytes, -1 (or 1) the adaptive default (see chainfs.client.file)."""
        self._check_open()
        if not isinstance(buffering, int) or buffering < -1:
            raise ValueError(f"invalid buffering {buffering!r}")
        m = Mode.parse(mode)
        if not m.binary:
            raise ValueError(
                f"mode {mode!r}: the async client opens files in binary mode only "
                "(decode the bytes, or use the sync FileSystem for text)"
            )
        p = normpath(path)
        # Read-only: a read session in the same call (unless one is held for the
        # file this path named), so an unlink or rename over the file elsewhere
        # leaves it readable until our close.
        read_session = not m.writable and self.config.read_sessions
        rsp = await self._meta.open(
            p,
            read=m.readable,
            write=m.writable,
            create=m.create,
            exclusive=m.exclusive,
            truncate=m.truncate,
            mode=0o666 & ~_umask(),
            session=read_session and p not in self._read_session_paths,
        )
        inode = rsp.inode
        try:
            if inode.type == mt.DIRECTORY:
                raise ChainfsError(Code.EISDIR, "is a directory", p)
            if inode.type != mt.FILE:
                raise ChainfsError(Code.EINVAL, "not a regular file", p)
            layout = layout_of(inode)
        except ChainfsError:
            if rsp.session_id:
                await self._meta.close(inode.ino, rsp.session_id, 0, False)
            raise
        if read_session:
            await self._hold_read_session(p, inode.ino, rsp.session_id)
            handle = OpenHandle(p, inode.ino, layout, inode.size, read_session=True)
        else:
            handle = OpenHandle(p, inode.ino, layout, inode.size, rsp.session_id or None)
        f = AsyncFile(self, handle, m, -1 if buffering == 1 else buffering)
        self._open_files.add(f)
        return f

    async def read_file(self, path: str) -> bytes:
        """The whole content of a file."""
        (data,) = await self.read_ranges([(path, 0, None)])
        return bytes(data)

    async def write_file(self, path: str, data: Any) -> None:
        """Create or replace a file with ``data``."""
        f = await self.open(path, "wb")
        try:
            await f.write(data)
        finally:
            await f.close()

    @_user_errors
    async def read_ranges(
        self, ranges: Sequence[Range], buffers: Sequence[Any] | None = None
    ) -> list[Any]:
        """Read many ``(path, offset, length)`` ranges in one parallel call.

        Returns one bytes-like object per range, in request order: a view of
        ``buffers[i]`` when buffers are given, else a new bytearray. A range
        past the end of its file comes back short (length None: to the end).
        """
        self._check_open()
        if buffers is not None and len(buffers) != len(ranges):
            raise ValueError(f"{len(buffers)} buffers for {len(ranges)} ranges")
        paths = sorted({normpath(r[0]) for r in ranges})
        step = self.config.batch_stat_paths
        inodes = [
            inode
            for batch in await asyncio.gather(
                *(self._meta.batch_stat(paths[i : i + step]) for i in range(0, len(paths), step))
            )
            for inode in batch
        ]
        by_path: dict[str, mt.Inode] = {}
        for p, res in zip(paths, inodes, strict=True):
            if isinstance(res, ChainfsError):
                raise ChainfsError(res.code, res.message, p)
            if res.type == mt.DIRECTORY:
                raise ChainfsError(Code.EISDIR, "is a directory", p)
            by_path[p] = res
        out: list[Any] = []
        work: list[tuple[int, Layout, Piece, memoryview]] = []
        for i, (path, offset, length) in enumerate(ranges):
            inode = by_path[normpath(path)]
            if offset < 0:
                raise ChainfsError(Code.EINVAL, f"negative offset {offset}", path)
            avail = max(0, inode.size - offset)
            n = avail if length is None or length < 0 else min(length, avail)
            if buffers is not None:
                view = memoryview(buffers[i]).cast("B")
                if length is not None and length >= 0 and len(view) < min(length, n):
                    raise ValueError(f"buffer {i} holds {len(view)} bytes, range needs {n}")
                n = min(n, len(view))
                dest = view[:n]
                out.append(dest)
            else:
                buf = bytearray(n)
                dest = memoryview(buf)
                out.append(buf)
            if n:
                layout = layout_of(inode)
                for piece in split(layout, offset, n):
                    work.append((inode.ino, layout, piece, dest))
        await self._read_pieces(work)
        return out

    # -- KV cache --------------------------------------------------------------
    async def kvcache(
        self,
        directory: str,
        ttl: float | None = None,
        capacity_bytes: int | None = None,
        *,
        config: KVCacheConfig | None = None,
        **options: Any,
    ) -> AsyncKVCache:
        """The KV cache stored in ``directory`` (created if needed); see chainfs.client.kvcache.

        ``ttl`` in seconds, ``capacity_bytes`` the eviction target; other
        KVCacheConfig fields as keywords."""
        self._check_open()
        from chainfs.client.kvcache import open_kvcache

        cache = await open_kvcache(self, directory, ttl, capacity_bytes, config, **options)
        self._kvcaches.add(cache)
        return cache

    # -- chunk I/O (used by AsyncFile) ----------------------------------------
    async def _read_into(self, h: OpenHandle, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the file's bytes at ``offset`` (holes as zeros)."""
        if len(out):
            await self._read_pieces(
                [(h.inode, h.layout, p, out) for p in split(h.layout, offset, len(out))]
            )

    async def _read_pieces(self, work: list[tuple[int, Layout, Piece, memoryview]]) -> None:
        """Read chunk pieces into their destinations: groups in parallel, bounded."""
        if not work:
            return
        groups: list[list[tuple[ReadReq, memoryview]]] = []
        group: list[tuple[ReadReq, memoryview]] = []
        group_bytes = 0
        for ino, _layout, p, dest in work:
            target = dest[p.buf_offset : p.buf_offset + p.length]
            req = ReadReq(p.chain_id, ino, p.chunk_index, p.chunk_offset, p.length, target)
            group.append((req, target))
            group_bytes += p.length
            if (
                group_bytes >= self.config.read_group_bytes
                or len(group) >= self.config.read_group_ios
            ):
                groups.append(group)
                group, group_bytes = [], 0
        if group:
            groups.append(group)
        if len(groups) == 1:
            await self._read_group(groups[0])
            return
        it = iter(groups)

        async def worker() -> None:
            for g in it:
                await self._read_group(g)

        workers = [
            asyncio.ensure_future(worker())
            for _ in range(min(len(groups), self.config.max_inflight_reads))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise

    async def _read_group(self, group: list[tuple[ReadReq, memoryview]]) -> None:
        self.storage_read_bytes += sum(req.length for req, _ in group)
        async with self._read_sem:
            got = await self._storage.read_batch([r for r, _ in group])
        for (req, target), data in zip(group, got, strict=True):
            n = len(data)
            if n < req.length:  # a hole, or the end of a short chunk: zeros
                _zero(target, n, req.length)

    async def _write_piece(self, h: OpenHandle, piece: Piece, data: bytearray) -> None:
        assert len(data) == piece.length, (len(data), piece)
        await self._storage.write(
            piece.chain_id, h.inode, piece.chunk_index, piece.chunk_offset, data,
            h.layout.chunk_size,
        )  # fmt: skip

    async def _sync_handle(self, h: OpenHandle, length: int, exact: bool) -> None:
        if h.session is None:
            return
        inode = await self._meta.sync(h.inode, h.session, length, exact=exact, wrote=True)
        h.size = inode.size

    async def _cut_chunks(self, h: OpenHandle, length: int) -> None:
        """Drop the file's bytes at and past ``length`` from storage."""
        layout = h.layout
        await cut_chunks(
            self._storage, layout.chains, h.inode, layout.chunk_size, length,
            self.config.storage.max_parallel_nodes,
        )  # fmt: skip

    async def _truncate_handle(self, h: OpenHandle, length: int) -> None:
        await self._meta.setattr(h.inode, size=length)
        h.size = length

    async def _close_handle(self, h: OpenHandle, length: int, wrote: bool) -> None:
        f = next((x for x in self._open_files if x._h is h), None)
        if f is not None:
            self._open_files.discard(f)
        if h.read_session:
            h.read_session = False
            self._release_read_session(h.inode)
        if h.session is not None:
            await self._meta.close(h.inode, h.session, length, wrote)

    async def _hold_read_session(self, path: str, ino: int, session_id: bytes) -> None:
        """Count one more read-only open of ``ino`` on its shared read session."""
        held = self._read_sessions.get(ino)
        if held is not None:
            held[1] += 1
            if session_id:  # another path (a hard link) took a second one: not needed
                self._end_session_later(ino, session_id)
            self._read_session_paths[path] = ino
            return
        if not session_id:
            # We held one for what this path named before; it names another file now.
            session_id = (await self._meta.open(ino, session=True)).session_id
            if ino in self._read_sessions:  # taken meanwhile by a concurrent open
                await self._hold_read_session(path, ino, session_id)
                return
        self._read_sessions[ino] = [session_id, 1]
        self._read_session_paths[path] = ino

    def _release_read_session(self, ino: int) -> None:
        held = self._read_sessions.get(ino)
        assert held is not None and held[1] > 0, (ino, held)
        held[1] -= 1
        if held[1] == 0:
            del self._read_sessions[ino]
            for path in [p for p, i in self._read_session_paths.items() if i == ino]:
                del self._read_session_paths[path]
            self._end_session_later(ino, held[0])

    def _end_session_later(self, ino: int, session_id: bytes) -> None:
        """End a read session at meta without making close wait (fs.close awaits it)."""

        async def end() -> None:
            try:
                await self._meta.close(ino, session_id, 0, False)
            except ChainfsError as e:  # meta prunes it once we are gone
                log.warning("ending the read session of inode %d failed: %s", ino, e)

        task = asyncio.ensure_future(end())
        self._session_ends.add(task)
        task.add_done_callback(self._session_ends.discard)


# gRPC (aio) keeps threads and state that a fork()ed child cannot use: a child
# that connects anyway hangs or crashes inside gRPC. Refuse it with a clear error.
_fork_state = {"connected": False, "forked_after_connect": False}


def _after_fork_in_child() -> None:
    if _fork_state["connected"]:
        _fork_state["forked_after_connect"] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _zero(view: memoryview, start: int, end: int) -> None:
    while start < end:
        n = min(end - start, len(_ZEROS))
        view[start : start + n] = _ZEROS[:n]
        start += n


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def connect(
    address: str, token: str | None = None, config: ClientConfig | None = None
) -> AsyncFileSystem:
    """Connect to the cluster whose mgmtd is at ``address`` ("host:port[,host:port]")."""
    try:
        return await AsyncFileSystem.connect(address, token=token, config=config)
    except ChainfsError as e:
        raise to_user_error(e) from None
