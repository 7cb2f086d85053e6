"""The content files of one target's chunks: ``data/XX/<inode>.<index>.<gen>``.

XX is the low byte of the inode (256 subdirectories); ``gen`` is the version
that created the file, so a new version can go to a new file while readers
still use the old one. Writes of a whole new file from a page-aligned buffer
use O_DIRECT (no copy into the page cache) unless small; reads go through a bounded cache
of open descriptors (:class:`FdCache`). Methods are synchronous: call them in
an I/O thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from chainfs.storage_service import crc
from chainfs.storage_service.config import EngineOptions

# Chunk data is the users' file content: readable by the storage service's user only.
CHUNK_FILE_MODE = 0o600
CHUNK_DIR_MODE = 0o700
_DIRECT_ALIGN = 4096  # bytes: buffer address and length alignment O_DIRECT needs


def _direct_io_ok(view: memoryview) -> bool:
    """Can ``view``'s page-aligned prefix go to disk with O_DIRECT (writable,
    page-aligned address, at least one page)? A shorter tail goes buffered."""
    if view.readonly or len(view) < _DIRECT_ALIGN or not view.contiguous:
        return False
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return addr % _DIRECT_ALIGN == 0


class _OpenFile:
    __slots__ = ("closing", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.closing = False  # evicted or invalidated: closed when the last user releases


# A cached file: (target directory, inode, index, generation). Built per read
# instead of the path string, which is only formatted to open a file.
FileKey = tuple[str, int, int, int]

OPEN_FILES_AUTO = -1  # open_chunk_files: size the cache from RLIMIT_NOFILE
OPEN_FILES_AUTO_MIN = 256  # descriptors: the auto size never goes below ...
OPEN_FILES_AUTO_MAX = 65536  # ... nor above (at ~0.3 KiB of kernel memory each)


def open_files_bound(configured: int) -> int:
    """Descriptors one node keeps open for chunk reads: ``configured``, or with
    OPEN_FILES_AUTO a quarter of the soft RLIMIT_NOFILE (the rest stays for
    connections, RocksDB and writes), within [OPEN_FILES_AUTO_MIN, OPEN_FILES_AUTO_MAX]."""
    if configured != OPEN_FILES_AUTO:
        assert configured >= 0
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return OPEN_FILES_AUTO_MAX
    return max(OPEN_FILES_AUTO_MIN, min(OPEN_FILES_AUTO_MAX, soft // 4))


class FdCache:
    """Read-only descriptors of chunk files, bounded LRU, shared by the I/O threads
    (and by every target of a node: one bound on the descriptors it holds).

    A descriptor is closed only when no reader uses it (so its number is never
    reused under a read). A file the engine unlinks is invalidated; a file
    replaced behind the engine's back (st_nlink 0) is reopened on next use.
    """

    def __init__(self, capacity: int) -> None:
        assert capacity >= 0
        self.capacity = capacity
        self._lock = threading.Lock()
        self._files: OrderedDict[FileKey, _OpenFile] = OrderedDict()
        self.opens = 0  # files opened (misses), for tests and profiles

    def __len__(self) -> int:
        return len(self._files)

    def acquire(self, key: FileKey) -> _OpenFile:
        """An open descriptor of the file ``key`` names (raises FileNotFoundError);
        release() it."""
        with self._lock:
            f = self._files.get(key)
            if f is not None:
                self._files.move_to_end(key)
                f.users += 1
        if f is not None:
            if os.fstat(f.fd).st_nlink:
                return f
            self.release(f)
            self.invalidate(key)  # unlinked or replaced: reopen below
        fd = os.open(ChunkFiles.path_in(*key), os.O_RDONLY | os.O_CLOEXEC)
        self.opens += 1
        f = _OpenFile(fd)
        f.users = 1
        with self._lock:
            if self.capacity == 0:
                f.closing = True  # not cached: closed on release
                return f
            old = self._files.pop(key, None)
            if old is not None:
                self._retire(old)
            self._files[key] = f
            while len(self._files) > self.capacity:
                _, victim = self._files.popitem(last=False)
                self._retire(victim)
        return f

    def release(self, f: _OpenFile) -> None:
        with self._lock:
            f.users -= 1
            assert f.users >= 0
            if f.closing and f.users == 0:
                os.close(f.fd)

    def invalidate(self, key: FileKey) -> None:
        with self._lock:
            f = self._files.pop(key, None)
            if f is not None:
                self._retire(f)

    def _retire(self, f: _OpenFile) -> None:
        """Close now or when its last reader is done (call with the lock held)."""
        if not f.closing:
            f.closing = True
            if f.users == 0:
                os.close(f.fd)

    def clear(self, target_dir: str | None = None) -> None:
        """Close the descriptors of ``target_dir``'s files (all when None)."""
        with self._lock:
            keys = [k for k in self._files if target_dir is None or k[0] == target_dir]
            for k in keys:
                self._retire(self._files.pop(k))


class ChunkFiles:
    """Chunk content files under ``target_dir/data``."""

    def __init__(
        self, target_dir: Path, options: EngineOptions, cache: FdCache | None = None
    ) -> None:
        self.target_dir = target_dir
        self._dir = str(target_dir)  # the first item of this target's FileKeys
        self.data_dir = target_dir / "data"
        self.data_dir.mkdir(mode=CHUNK_DIR_MODE, exist_ok=True)
        for b in range(256):
            (self.data_dir / f"{b:02x}").mkdir(mode=CHUNK_DIR_MODE, exist_ok=True)
        self.durable = options.durable
        self.direct_writes = options.direct_writes
        self.direct_write_min_bytes = options.direct_write_min_bytes
        # The node's shared cache, or (an engine on its own) one of this target's.
        self.cache = cache if cache is not None else FdCache(open_files_bound(options.open_files))

    def close(self) -> None:
        self.cache.clear(self._dir)

    @staticmethod
    def path_in(target_dir: str | Path, inode: int, index: int, gen: int) -> str:
        """Where a target directory keeps generation ``gen`` of a chunk's content."""
        return f"{target_dir}/data/{inode & 0xFF:02x}/{inode:016x}.{index:08x}.{gen}"

    def path(self, inode: int, index: int, gen: int) -> str:
        return self.path_in(self.target_dir, inode, index, gen)

    def fsync_dir_of(self, inode: int) -> None:
        """Make the creation, removal or rename of a file of ``inode`` durable."""
        fd = os.open(f"{self.data_dir}/{inode & 0xFF:02x}", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, inode: int, index: int, gen: int) -> None:
        if gen:
            path = self.path(inode, index, gen)
            self.cache.invalidate((self._dir, inode, index, gen))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def truncate(self, inode: int, index: int, gen: int, length: int) -> None:
        os.truncate(self.path(inode, index, gen), length)

    def write(
        self,
        inode: int,
        index: int,
        gen: int,
        offset: int,
        data: memoryview,
        keep: int,
        final: int,
    ) -> None:
        """Write ``data`` at ``offset`` of file ``gen`` (created if absent).

        The file is first cut to its first ``keep`` bytes (dropping whatever an
        abandoned update left past them), then sized to ``final`` (zero-filled).
        """
        assert offset + len(data) <= final and keep <= final
        if (
            self.direct_writes
            and offset == 0
            and keep == 0
            and final == len(data) > 0
            and len(data) >= self.direct_write_min_bytes
            and _direct_io_ok(data)
        ):
            self._write_direct(inode, index, gen, data)
            return
        fd = os.open(self.path(inode, index, gen), os.O_WRONLY | os.O_CREAT, CHUNK_FILE_MODE)
        try:
            os.ftruncate(fd, keep)
            if final > keep:
                os.ftruncate(fd, final)
            self._pwrite(fd, offset, data)
        finally:
            os.close(fd)

    def write_in_place(
        self, inode: int, index: int, gen: int, offset: int, data: memoryview
    ) -> None:
        """Write ``data`` at ``offset`` of the existing file ``gen`` (a journaled update
        reaching the file at commit); durable before it returns on a durable target."""
        fd = os.open(self.path(inode, index, gen), os.O_WRONLY)
        try:
            self._pwrite(fd, offset, data)
        finally:
            os.close(fd)

    def _pwrite(self, fd: int, offset: int, data: memoryview) -> None:
        """All of ``data`` at ``offset``; on disk before returning on a durable target."""
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        if self.durable:
            os.fdatasync(fd)

    def _write_direct(self, inode: int, index: int, gen: int, data: memoryview) -> None:
        """A whole new file from an aligned buffer with O_DIRECT: DMA from our buffer,
        no copy into the page cache (the copy that dominated replicated writes).
        A length that is not whole pages (a file's last chunk, a KV-cache entry:
        a header and a value) ends with a short buffered write of its last page."""
        path = self.path(inode, index, gen)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, CHUNK_FILE_MODE)
        except OSError as e:
            if e.errno != errno.EINVAL:  # file system without O_DIRECT: buffered instead
                raise
            self.direct_writes = False
            self.write(inode, index, gen, 0, data, 0, len(data))
            return
        try:
            aligned = len(data) - len(data) % _DIRECT_ALIGN
            done = 0
            while done < aligned:
                done += os.pwrite(fd, data[done:aligned], done)
            if done < len(data):
                # Linux lets F_SETFL drop O_DIRECT: the tail page goes through the cache.
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                while done < len(data):
                    done += os.pwrite(fd, data[done:], done)
            if self.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def read(
        self, inode: int, index: int, gen: int, offset: int, out: memoryview, nowait: bool = False
    ) -> int:
        """Fill ``out`` from file ``gen`` at ``offset``; returns the bytes read.

        ``nowait``: only from the page cache (RWF_NOWAIT); BlockingIOError when the
        bytes would need the disk (the caller retries in an I/O thread).
        """
        return self.readv(inode, index, gen, offset, [out], nowait)

    def readv(
        self, inode: int, index: int, gen: int, offset: int, bufs: list[memoryview], nowait: bool
    ) -> int:
        """Scatter-read consecutive bytes at ``offset`` into ``bufs``; the bytes read."""
        bufs = [b for b in bufs if len(b)]
        want = sum(map(len, bufs))
        flags = os.RWF_NOWAIT if nowait else 0
        f = self.cache.acquire((self._dir, inode, index, gen))
        try:
            got = 0
            while got < want:
                n = os.preadv(f.fd, bufs, offset + got, flags)
                if n == 0:
                    break
                got += n
                while bufs and n >= len(bufs[0]):  # drop what is filled
                    n -= len(bufs[0])
                    bufs.pop(0)
                if n:
                    bufs[0] = bufs[0][n:]
            return got
        finally:
            self.cache.release(f)

    def crc_of(self, inode: int, index: int, gen: int, length: int) -> int | None:
        """CRC32C of the first ``length`` bytes of a file, None if shorter or absent."""
        if length == 0:
            return 0
        buf = bytearray(length)
        try:
            got = self.read(inode, index, gen, 0, memoryview(buf))
        except FileNotFoundError:
            return None
        if got != length:
            return None
        return crc.value(buf)

    # ---- metadata ----------------------------------------------------------

    def replace(self, inode: int, index: int, gen: int, data: memoryview) -> None:
        """Replace file ``gen`` with ``data`` atomically: temp file, fsync, rename
        (and the rename made durable on a durable target)."""
        path = self.path(inode, index, gen)
        tmp = path + ".repair"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CHUNK_FILE_MODE)
        try:
            view = data
            while len(view):
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.cache.invalidate((self._dir, inode, index, gen))  # the old file, now unlinked
        if self.durable:
            self.fsync_dir_of(inode)

    def all_files(self) -> Iterator[Path]:
        """Every file under the data directory (recovery looks for orphans)."""
        for sub in self.data_dir.iterdir():
            yield from sub.iterdir()
