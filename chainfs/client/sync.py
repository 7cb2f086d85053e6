"""`chainfs.connect(address)` -> FileSystem: the synchronous twin of AsyncFileSystem.

Each FileSystem owns one background thread running a uvloop event loop; a
call runs the async core there and waits for it. Namespace calls (stat,
listdir, mkdir, rename, remove, ...) and write opens (so creates) are the
exception: their async core awaits nothing but meta calls, so it runs in the
calling thread and asks meta from there (``ClientConfig.meta_sync_connections``),
the loop thread taking over only for a call that gets no answer
(:func:`run_in_caller`). Calls may come from any number of threads at once.
"""

from __future__ import annotations

import atexit
import io
import logging
import warnings
import weakref
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from chainfs.client._loop import LoopThread
from chainfs.client.aio_fs import AsyncFileSystem, DirEntry, Range, StatResult, StatVFS
from chainfs.client.aio_fs import connect as aio_connect
from chainfs.client.config import ClientConfig, resolve_address
from chainfs.client.file import Mode
from chainfs.client.sync_file import File
from chainfs.common.rpc.meta_client import CallerThread, run_in_caller

if TYPE_CHECKING:
    from chainfs.client.kvcache import KVCache, KVCacheConfig

# Modes that give a binary File (any other valid mode gives a text wrapper).
BinaryMode = Literal[
    "rb", "wb", "ab", "xb", "rb+", "wb+", "ab+", "xb+", "r+b", "w+b", "a+b", "x+b",
    "br", "bw", "ba", "bx",
]  # fmt: skip

_log = logging.getLogger(__name__)

T = TypeVar("T")

# Bound on closing one FileSystem left open at interpreter exit.
_EXIT_CLOSE_TIMEOUT_S = 5.0

# Every FileSystem not yet closed, so interpreter exit can close them first:
# letting a daemon thread that runs uvloop and gRPC die during interpreter
# finalization crashes the process (seen as SIGSEGV in DataLoader workers).
_open_filesystems: weakref.WeakSet[FileSystem] = weakref.WeakSet()


@atexit.register
def _close_open_filesystems() -> None:
    for fs in list(_open_filesystems):
        try:
            fs.close(timeout_s=_EXIT_CLOSE_TIMEOUT_S)
        except Exception as e:  # the loop thread is stopped regardless
            _log.warning("closing chainfs connection to %s at exit: %s", fs.address, e)


class FileSystem:
    """A connection to one chainfs cluster. Paths are absolute POSIX strings."""

    def __init__(self, afs: AsyncFileSystem, loop: LoopThread) -> None:
        self._afs = afs
        self._loop = loop
        self._caller: CallerThread | None = None
        cfg = afs.config
        if cfg.meta_sync_connections:
            attempt_ms = min(cfg.meta_attempt_timeout_ms, cfg.meta_timeout_ms)  # as on the loop
            sync = afs.io.meta.sync_client(cfg.meta_sync_connections, attempt_ms / 1000)
            if sync is not None:
                self._caller = CallerThread(sync, loop.run, loop.call_soon)
        _open_filesystems.add(self)

    def _namespace(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a namespace call of the async core (it awaits meta calls only)
        in this thread, meta asked from here; on the loop when that is off."""
        caller = self._caller
        if caller is None or self._loop.in_loop_thread():
            return self._loop.run(coro)
        return run_in_caller(coro, caller)

    @classmethod
    def connect(
        cls,
        address: str | None = None,
        config: ClientConfig | None = None,
        token: str | None = None,
    ) -> FileSystem:
        """Reach mgmtd at ``address`` (default $CHAINFS_ADDRESS), fail fast if unreachable."""
        address = resolve_address(address)
        loop = LoopThread()
        try:
            afs = loop.run(aio_connect(address, token=token, config=config))
        except BaseException:
            loop.stop()
            raise
        return cls(afs, loop)

    @property
    def address(self) -> str:
        return self._afs.address

    @property
    def config(self) -> ClientConfig:
        return self._afs.config

    @property
    def storage_read_bytes(self) -> int:
        """Bytes asked of storage by reads since connect (file reads, read_ranges)."""
        return self._afs.storage_read_bytes

    @property
    def aio(self) -> AsyncFileSystem:
        """The async core (usable only from coroutines on this FileSystem's loop)."""
        return self._afs

    @property
    def closed(self) -> bool:
        return self._afs.closed

    # -- files ---------------------------------------------------------------
    @overload
    def open(  # type: ignore[overload-overlap]
        self,
        path: str,
        mode: BinaryMode,
        buffering: int = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
    ) -> File: ...

    @overload
    def open(
        self,
        path: str,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> io.TextIOWrapper: ...

    def open(
        self,
        path: str,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> File | io.TextIOWrapper:
        """Like builtin ``open``: r, w, a, x, r+, w+, a+, x+ with 'b' or text."""
        m = Mode.parse(mode)
        if m.binary and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        # buffering as builtin open: 0 unbuffered (binary only), 1 line buffering
        # (text only), N > 1 a buffer of N bytes, -1 the default.
        if not m.binary and buffering == 0:
            raise ValueError("can't have unbuffered text I/O")
        if m.binary and buffering == 1:
            warnings.warn(
                "line buffering (buffering=1) isn't supported in binary mode, "
                "the default buffer size will be used",
                RuntimeWarning,
                stacklevel=2,
            )
        opening = self._afs.open(path, m.binary_mode(), buffering)
        # A write open awaits meta only (a read open may share a read session
        # the loop holds): it asks meta from this thread.
        afile = self._namespace(opening) if m.writable else self._loop.run(opening)
        f = File(afile, self._loop)
        if m.binary:
            return f
        return io.TextIOWrapper(
            f,
            encoding=encoding or "utf-8",
            errors=errors,
            newline=newline,
            line_buffering=buffering == 1,
            write_through=False,
        )

    def read_ranges(
        self, ranges: Sequence[Range], buffers: Sequence[Any] | None = None
    ) -> list[Any]:
        """Read many (path, offset, length) ranges in one parallel call, in request order."""
        return self._loop.run(self._afs.read_ranges(ranges, buffers))

    def kvcache(
        self,
        directory: str,
        ttl: float | None = None,
        capacity_bytes: int | None = None,
        *,
        config: KVCacheConfig | None = None,
        **options: Any,
    ) -> KVCache:
        """The KV cache stored in ``directory`` (created if needed); see chainfs.client.kvcache.

        ``ttl`` in seconds, ``capacity_bytes`` the eviction target; other
        KVCacheConfig fields as keywords."""
        from chainfs.client.kvcache import KVCache

        acache = self._loop.run(
            self._afs.kvcache(directory, ttl, capacity_bytes, config=config, **options)
        )
        return KVCache(acache, self._loop)

    def read_file(self, path: str) -> bytes:
        return self._loop.run(self._afs.read_file(path))

    def write_file(self, path: str, data: Any) -> None:
        self._loop.run(self._afs.write_file(path, data))

    # -- namespace -----------------------------------------------------------
    def stat(self, path: str, follow_symlinks: bool = True) -> StatResult:
        return self._namespace(self._afs.stat(path, follow_symlinks))

    def lstat(self, path: str) -> StatResult:
        return self._namespace(self._afs.lstat(path))

    def exists(self, path: str) -> bool:
        return self._namespace(self._afs.exists(path))

    def isdir(self, path: str) -> bool:
        return self._namespace(self._afs.isdir(path))

    def isfile(self, path: str) -> bool:
        return self._namespace(self._afs.isfile(path))

    def listdir(self, path: str = "/") -> list[str]:
        return self._namespace(self._afs.listdir(path))

    def scandir(self, path: str = "/") -> list[DirEntry]:
        return self._namespace(self._afs.scandir(path))

    def mkdir(
        self, path: str, mode: int = 0o777, parents: bool = False, exist_ok: bool = False
    ) -> None:
        self._namespace(self._afs.mkdir(path, mode, parents, exist_ok))

    def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        self._namespace(self._afs.makedirs(path, mode, exist_ok))

    def remove(self, path: str) -> None:
        self._namespace(self._afs.remove(path))

    unlink = remove

    def rmdir(self, path: str) -> None:
        self._namespace(self._afs.rmdir(path))

    def rename(self, src: str, dst: str) -> None:
        self._namespace(self._afs.rename(src, dst))

    def symlink(self, target: str, path: str) -> None:
        self._namespace(self._afs.symlink(target, path))

    def link(self, src: str, dst: str) -> None:
        self._namespace(self._afs.link(src, dst))

    def readlink(self, path: str) -> str:
        return self._namespace(self._afs.readlink(path))

    def truncate(self, path: str, length: int) -> None:
        self._namespace(self._afs.truncate(path, length))

    def chmod(self, path: str, mode: int) -> None:
        self._namespace(self._afs.chmod(path, mode))

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._namespace(self._afs.chown(path, uid, gid))

    def utime(
        self,
        path: str,
        times: tuple[float, float] | None = None,
        *,
        ns: tuple[int, int] | None = None,
    ) -> None:
        self._namespace(self._afs.utime(path, times, ns=ns))

    def mknod(self, path: str, mode: int = 0o600, device: int = 0) -> None:
        self._namespace(self._afs.mknod(path, mode, device))

    def fallocate(self, path: str, offset: int, length: int, mode: int = 0) -> None:
        self._loop.run(self._afs.fallocate(path, offset, length, mode))

    def statfs(self) -> StatVFS:
        return self._namespace(self._afs.statfs())

    def getxattr(self, path: str, name: str) -> bytes:
        return self._namespace(self._afs.getxattr(path, name))

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self._namespace(self._afs.setxattr(path, name, value, flags))

    def listxattr(self, path: str) -> list[str]:
        return self._namespace(self._afs.listxattr(path))

    def removexattr(self, path: str, name: str) -> None:
        self._namespace(self._afs.removexattr(path, name))

    # -- lifetime ------------------------------------------------------------
    def close(self, timeout_s: float | None = None) -> None:
        """Close the connection and stop the loop thread (idempotent).

        ``timeout_s`` bounds the wait for the cluster-side goodbyes; the loop
        thread is stopped either way.
        """
        _open_filesystems.discard(self)
        if self._caller is not None:
            self._caller.sync.close()
        if not self._loop.alive:
            return
        try:
            self._loop.run(self._afs.close(), timeout_s)
        finally:
            self._loop.stop()

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._loop.alive and not self._loop.in_loop_thread():
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<chainfs.FileSystem {self.address}{' closed' if self.closed else ''}>"


def connect(
    address: str | None = None, token: str | None = None, config: ClientConfig | None = None
) -> FileSystem:
    """Connect to the cluster whose mgmtd is at ``address`` ("host:port[,host:port]").

    ``address`` None: $CHAINFS_ADDRESS (ValueError when that is unset too).
    ``token`` None: ``config.token``/``token_file``, else $CHAINFS_TOKEN, else
    the file $CHAINFS_TOKEN_FILE names."""
    return FileSystem.connect(address, config=config, token=token)


__all__ = ["FileSystem", "connect"]
