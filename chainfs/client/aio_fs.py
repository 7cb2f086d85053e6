"""`chainfs.aio.connect(address)` -> AsyncFileSystem: the async core of the client.

Namespace calls go to meta (any meta server, found through mgmtd's routing
info); file bytes go straight to the storage nodes through the connection's
chunk I/O engine (``AsyncFileSystem.io``, see chainfs.client.chunk_io).
Errors reaching the caller are builtin OSError subclasses
(FileNotFoundError, IsADirectoryError, ...) with the errno set.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat as stat_mod
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from chainfs.client.chunk_io import ChunkIO, OpenHandle, ReadWork
from chainfs.client.config import ClientConfig, resolve_address
from chainfs.client.file import AsyncFile, Mode
from chainfs.client.layout import layout_of, metapath, normpath, split
from chainfs.common.auth.capability import READ
from chainfs.common.errors import ChainfsError, Code, to_user_error
from chainfs.common.rpc.meta_client import to_stat_result
from chainfs.proto import meta_pb2 as mt

if TYPE_CHECKING:
    from chainfs.client.kvcache import AsyncKVCache, KVCacheConfig

P = ParamSpec("P")
T = TypeVar("T")

StatResult = os.stat_result
StatVFS = os.statvfs_result
# (path, offset, length); length None (or < 0) reads to the end of the file.
Range = tuple[str, int, int | None]


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

    def __init__(self, address: str, io: ChunkIO) -> None:
        self.address = address
        self.io = io  # the chunk I/O engine, shared with this connection's files and caches
        self._open_files: set[AsyncFile] = set()
        self._kvcaches: weakref.WeakSet[AsyncKVCache] = weakref.WeakSet()  # closed with us
        self._closed = False
        _filesystems.add(self)

    def _drop_inherited(self) -> None:
        """In a fork()ed child: files and caches opened by the parent hold the
        parent's sessions and tasks; the child sees them closed and never
        ends them (the connection itself is reset by ChunkIO)."""
        for f in self._open_files:
            f._closed = True
        for cache in self._kvcaches:
            cache._closed = True
        self._open_files = set()
        self._kvcaches = weakref.WeakSet()

    @property
    def config(self) -> ClientConfig:
        return self.io.config

    @property
    def storage_read_bytes(self) -> int:
        """Bytes asked of storage by reads since connect (file reads, read_ranges)."""
        return self.io.storage_read_bytes + self.io.sync_read_bytes

    # -- connect / close -----------------------------------------------------
    @classmethod
    async def connect(
        cls,
        address: str | None = None,
        config: ClientConfig | None = None,
        token: str | None = None,
    ) -> AsyncFileSystem:
        """Reach mgmtd at ``address`` (default $CHAINFS_ADDRESS), fail fast if
        unreachable; ``token`` (default: config, then $CHAINFS_TOKEN[_FILE]) says who we are."""
        address = resolve_address(address)
        cfg = (config or ClientConfig()).with_token(token)
        return cls(address, await ChunkIO.connect(address, cfg))

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
        self._closed = True
        await self.io.close()
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
        return to_stat_result(await self.io.meta.stat(metapath(path), follow_symlinks))

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
            async for e in self.io.meta.iterdir(metapath(path), with_attrs=True, page=page)
        ]

    @_user_errors
    async def listdir(self, path: str = "/") -> list[str]:
        self._check_open()
        page = self.config.readdir_page_entries
        return [
            os.fsdecode(e.name)
            async for e in self.io.meta.iterdir(metapath(path), with_attrs=False, page=page)
        ]

    @_user_errors
    async def mkdir(
        self, path: str, mode: int = 0o777, parents: bool = False, exist_ok: bool = False
    ) -> None:
        """Create a directory; ``parents`` creates missing ancestors (mkdir -p).
        The process umask applies, as in ``os.mkdir``."""
        self._check_open()
        p = metapath(path)
        mode &= ~_umask()
        if parents and exist_ok:
            await self.io.meta.mkdir(p, mode, parents=True)  # mkdir -p: one call
            return
        try:
            await self.io.meta.mkdir(p, mode, parents=False)
            return
        except ChainfsError as e:
            if e.code == Code.EEXIST and exist_ok:
                if stat_mod.S_ISDIR(to_stat_result(await self.io.meta.stat(p, True)).st_mode):
                    return
                raise
            if e.code != Code.ENOENT or not parents or p == "/":
                raise
        parent = normpath(p).rsplit("/", 1)[0] or "/"
        await self.io.meta.mkdir(parent, mode, parents=True)
        try:
            await self.io.meta.mkdir(p, mode, parents=False)
        except ChainfsError as e:
            if not (e.code == Code.EEXIST and exist_ok):
                raise

    async def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        await self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    @_user_errors
    async def remove(self, path: str) -> None:
        self._check_open()
        await self.io.meta.unlink(metapath(path))

    unlink = remove

    @_user_errors
    async def rmdir(self, path: str) -> None:
        self._check_open()
        await self.io.meta.rmdir(metapath(path))

    @_user_errors
    async def rename(self, src: str, dst: str) -> None:
        """Atomically move ``src`` to ``dst``, replacing a file or an empty directory there."""
        self._check_open()
        await self.io.meta.rename(metapath(src), metapath(dst))

    @_user_errors
    async def symlink(self, target: str, path: str) -> None:
        """Create ``path`` as a symbolic link to ``target`` (os.symlink's order)."""
        self._check_open()
        await self.io.meta.symlink(target, metapath(path))

    @_user_errors
    async def link(self, src: str, dst: str) -> None:
        """Create ``dst`` as a hard link to the file ``src``."""
        self._check_open()
        await self.io.meta.link(metapath(src), metapath(dst))

    @_user_errors
    async def readlink(self, path: str) -> str:
        self._check_open()
        return await self.io.meta.readlink(metapath(path))

    @_user_errors
    async def truncate(self, path: str, length: int) -> None:
        self._check_open()
        if length < 0:
            raise ChainfsError(Code.EINVAL, f"negative length {length}", path)
        await self.io.meta.setattr(metapath(path), follow=True, size=length)

    @_user_errors
    async def chmod(self, path: str, mode: int) -> None:
        self._check_open()
        await self.io.meta.setattr(metapath(path), follow=True, mode=mode & 0o7777)

    @_user_errors
    async def chown(self, path: str, uid: int, gid: int) -> None:
        """Change owner and group; -1 leaves one unchanged (as os.chown)."""
        self._check_open()
        if uid != -1 or gid != -1:
            await self.io.meta.chown(metapath(path), uid, gid)

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
        p = metapath(path)
        if ns is not None:
            await self.io.meta.setattr(p, follow=True, atime_ns=ns[0], mtime_ns=ns[1])
        elif times is not None:
            a, m = (round(t * 1e9) for t in times)
            await self.io.meta.setattr(p, follow=True, atime_ns=a, mtime_ns=m)
        else:
            await self.io.meta.setattr(p, follow=True, atime_now=True, mtime_now=True)

    @_user_errors
    async def mknod(self, path: str, mode: int = 0o600, device: int = 0) -> None:
        """os.mknod: a FIFO, UNIX socket, character or block device (``device``
        from os.makedev), or a regular file; the process umask applies."""
        self._check_open()
        bits = (mode & ~0o7777) | (mode & 0o7777 & ~_umask())
        await self.io.meta.mknod(metapath(path), bits, device)

    @_user_errors
    async def fallocate(self, path: str, offset: int, length: int, mode: int = 0) -> None:
        """fallocate(2) on a file: mode 0 extends its length to offset+length,
        FALLOC_FL_KEEP_SIZE reserves nothing (storage allocates on write),
        FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE makes the range read as zeros."""
        async with await self.open(path, "r+b") as f:
            await f.fallocate(offset, length, mode)

    @_user_errors
    async def statfs(self) -> os.statvfs_result:
        """File-system totals as an ``os.statvfs_result``."""
        self._check_open()
        rsp = await self.io.meta.statfs()
        bsize = rsp.block_size or 4096
        blocks, free = rsp.capacity_bytes // bsize, rsp.free_bytes // bsize
        files = rsp.inodes_total
        ffree = files - min(rsp.inodes_used, files)
        return os.statvfs_result(
            (bsize, bsize, blocks, free, free, files, ffree, ffree, 0, rsp.max_name_bytes or 255)
        )

    @_user_errors
    async def getxattr(self, path: str, name: str) -> bytes:
        self._check_open()
        return await self.io.meta.getxattr(metapath(path), os.fsencode(name))

    @_user_errors
    async def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self._check_open()
        await self.io.meta.setxattr(metapath(path), os.fsencode(name), bytes(value), flags)

    @_user_errors
    async def listxattr(self, path: str) -> list[str]:
        self._check_open()
        return await self.io.meta.listxattr(metapath(path))

    @_user_errors
    async def removexattr(self, path: str, name: str) -> None:
        self._check_open()
        await self.io.meta.removexattr(metapath(path), os.fsencode(name))

    # -- files ---------------------------------------------------------------
    @_user_errors
    async def open(self, path: str, mode: str = "rb", buffering: int = -1) -> AsyncFile:
        """Open a file in a binary mode (r, w, a, x, with + and b) -> AsyncFile.

        ``buffering`` as builtin open: 0 unbuffered (reads fetch exactly what
        they ask, writes reach storage before returning), N > 1 a read buffer
        of N bytes, -1 (or 1) the adaptive default (see chainfs.client.file).

        A write open awaits nothing but meta calls: the sync FileSystem runs it
        in the calling thread (``run_in_caller``); keep it so."""
        self._check_open()
        if not isinstance(buffering, int) or buffering < -1:
            raise ValueError(f"invalid buffering {buffering!r}")
        m = Mode.parse(mode)
        if not m.binary:
            raise ValueError(
                f"mode {mode!r}: the async client opens files in binary mode only "
                "(decode the bytes, or use the sync FileSystem for text)"
            )
        p = metapath(path)
        # Read-only: a read session in the same call (unless one is held for the
        # file this path named), so an unlink or rename over the file elsewhere
        # leaves it readable until our close.
        read_session = not m.writable and self.config.read_sessions
        rsp = await self.io.meta.open(
            p,
            read=m.readable,
            write=m.writable,
            create=m.create,
            exclusive=m.exclusive,
            truncate=m.truncate,
            mode=0o666 & ~_umask(),
            session=read_session and self.io.wants_read_session(p),
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
                await self.io.meta.close(inode.ino, rsp.session_id, 0, False)
            raise
        if read_session:
            await self.io.hold_read_session(p, inode.ino, rsp.session_id)
            handle = OpenHandle(p, inode.ino, layout, inode.size, read_session=True)
        else:
            handle = OpenHandle(p, inode.ino, layout, inode.size, rsp.session_id or None)
        f = AsyncFile(
            self.io, handle, m, -1 if buffering == 1 else buffering, self._open_files.discard
        )
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
        paths = sorted({metapath(r[0]) for r in ranges})
        step = self.config.batch_stat_paths
        inodes = [
            inode
            for batch in await asyncio.gather(
                *(
                    # READ capabilities come with the stats (storage wants them; no open here).
                    self.io.meta.batch_stat(paths[i : i + step], want_capability=READ)
                    for i in range(0, len(paths), step)
                )
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
        work: list[ReadWork] = []
        for i, (path, offset, length) in enumerate(ranges):
            inode = by_path[metapath(path)]
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
        await self.io.read_pieces(work)
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

        cache = await open_kvcache(
            self.io, 0o666 & ~_umask(), directory, ttl, capacity_bytes, config, **options
        )
        self._kvcaches.add(cache)
        return cache


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def connect(
    address: str | None = None, token: str | None = None, config: ClientConfig | None = None
) -> AsyncFileSystem:
    """Connect to the cluster whose mgmtd is at ``address`` ("host:port[,host:port]").

    ``address`` None: $CHAINFS_ADDRESS (ValueError when that is unset too).
    ``token`` None: ``config.token``/``token_file``, else $CHAINFS_TOKEN, else
    the file $CHAINFS_TOKEN_FILE names."""
    try:
        return await AsyncFileSystem.connect(address, config=config, token=token)
    except ChainfsError as e:
        raise to_user_error(e) from None


# Open connections of this process; a fork()ed child drops what each inherited.
_filesystems: weakref.WeakSet[AsyncFileSystem] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for afs in list(_filesystems):
        afs._drop_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)
