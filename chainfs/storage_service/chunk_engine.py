"""Chunk engine: the chunks of one storage target (one directory).

Layout of a target directory::

    target.json            ids assigned by mgmtd (target_id, node_id)
    meta/                  RocksDB: chunk id -> ChunkRecord
    data/XX/<inode>.<index>.<gen>   chunk content files (XX = low byte of the inode)

Every chunk has a committed version (what reads see) and at most one pending
version (committed + 1) while an update travels down the chain. Copy-on-write
keeps the committed bytes readable while a version is pending:

* an update covering all committed bytes (whole-chunk write) goes to a new
  file: no copy;
* an append or a write past the end writes in place *beyond* the committed
  length, which no reader looks at: no copy;
* a truncate keeps the file (shrinking happens at commit);
* any other overwrite reads the committed bytes, patches them in memory and
  writes a new file (read-modify-write, as 3FS does).

A new file written from a page-aligned buffer (the data plane's pooled receive
buffers are) goes to disk with O_DIRECT: no copy into the page cache.

Commit is one metadata write (the atomic switch); the file a version no longer
uses is unlinked afterwards. Recovery at open resolves what a crash left:
pending versions whose data is complete are kept (the chain re-drives them),
incomplete ones are discarded, files nothing refers to are deleted, and the
invariants of every record are asserted.

Methods are synchronous (run them in an I/O thread); the caller serializes
updates of one chunk (CRAQ's chunk lock). Reads need no lock: a read that races
a commit notices it and retries.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import rocksdict

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service import crc
from chainfs.storage_service.config import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

log = logging.getLogger(__name__)

_KEY = struct.Struct(">QI")  # big-endian: one inode's chunks are adjacent, in index order
_KEY_PREFIX = b"C"
_RECORD = struct.Struct("<QQIIQQIIQBI16sQ16sQ")
# Appended to _RECORD by records with per-block CRCs (older records end at _RECORD):
# block size, number of committed block CRCs, number of pending block CRCs; then the
# CRCs as little-endian u32s.
_EXT = struct.Struct("<III")
MIN_CRC_BLOCK = 4096  # bytes: smallest per-block CRC granule
MAX_CRC_BLOCK = 1024 * 1024  # bytes: largest (64 MiB chunks keep 64+ CRCs)
_FLAG_PENDING_REMOVE = 1
_NO_CLIENT = b"\0" * 16
_STAT_CACHE_S = 0.1  # statvfs result reused for this long (seconds)
_READ_RACE_RETRIES = 8  # re-reads of a chunk whose file changed under a read


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """What the metadata store keeps per chunk."""

    committed_version: int = 0
    pending_version: int = 0
    length: int = 0
    crc32c: int = 0
    chain_version: int = 0
    file_gen: int = 0  # 0 = no file (an empty committed chunk)
    pending_length: int = 0
    pending_crc32c: int = 0
    pending_file_gen: int = 0
    pending_remove: bool = False
    chunk_size: int = 0
    committed_client: bytes = _NO_CLIENT  # request that made the committed version
    committed_request: int = 0
    pending_client: bytes = _NO_CLIENT  # request that made the pending version
    pending_request: int = 0
    # Per-block CRC32Cs (packed u32, one per block_size bytes, the last block short):
    # a partial read verifies only the blocks it touches. block_size 0 = a record
    # written before per-block CRCs: verified as a whole chunk, converted on its
    # next update.
    block_size: int = 0
    block_crcs: bytes = b""  # of the committed version (b"" = unknown: whole-chunk CRC only)
    pending_block_crcs: bytes = b""  # of the pending version

    @property
    def has_pending(self) -> bool:
        return self.pending_version != 0

    @property
    def has_block_crcs(self) -> bool:
        """Can reads of the committed version verify single blocks?"""
        return bool(self.block_crcs) or (self.block_size > 0 and self.length == 0)

    def encode(self) -> bytes:
        base = _RECORD.pack(
            self.committed_version,
            self.pending_version,
            self.length,
            self.crc32c,
            self.chain_version,
            self.file_gen,
            self.pending_length,
            self.pending_crc32c,
            self.pending_file_gen,
            _FLAG_PENDING_REMOVE if self.pending_remove else 0,
            self.chunk_size,
            self.committed_client,
            self.committed_request,
            self.pending_client,
            self.pending_request,
        )
        if not self.block_size:
            return base
        ext = _EXT.pack(
            self.block_size, len(self.block_crcs) // 4, len(self.pending_block_crcs) // 4
        )
        return b"".join((base, ext, self.block_crcs, self.pending_block_crcs))

    @classmethod
    def decode(cls, raw: bytes) -> ChunkRecord:
        f = _RECORD.unpack_from(raw)
        block_size = 0
        block_crcs = pending_block_crcs = b""
        if len(raw) > _RECORD.size:
            block_size, n_committed, n_pending = _EXT.unpack_from(raw, _RECORD.size)
            at = _RECORD.size + _EXT.size
            assert len(raw) == at + 4 * (n_committed + n_pending), len(raw)
            block_crcs = raw[at : at + 4 * n_committed]
            pending_block_crcs = raw[at + 4 * n_committed :]
        else:
            assert len(raw) == _RECORD.size, len(raw)
        return cls(
            committed_version=f[0],
            pending_version=f[1],
            length=f[2],
            crc32c=f[3],
            chain_version=f[4],
            file_gen=f[5],
            pending_length=f[6],
            pending_crc32c=f[7],
            pending_file_gen=f[8],
            pending_remove=bool(f[9] & _FLAG_PENDING_REMOVE),
            chunk_size=f[10],
            committed_client=f[11],
            committed_request=f[12],
            pending_client=f[13],
            pending_request=f[14],
            block_size=block_size,
            block_crcs=block_crcs,
            pending_block_crcs=pending_block_crcs,
        )

    def check(self) -> None:
        """Assert the invariants of a record."""
        assert self.length <= self.chunk_size or self.committed_version == 0, self
        if self.has_pending:
            assert self.pending_version == self.committed_version + 1 or (
                self.pending_file_gen == self.pending_version and self.pending_version > 0
            ), f"pending version must follow committed (or be a full replace): {self}"
            if not self.pending_remove:
                assert self.pending_length <= self.chunk_size, self
        if self.committed_version == 0:
            assert self.length == 0 and self.file_gen == 0, self
        if self.file_gen == 0:
            assert self.length == 0, f"non-empty committed chunk without a file: {self}"
        if self.block_size:
            bs = self.block_size
            assert bs & (bs - 1) == 0, f"CRC block size not a power of 2: {self}"
            # A CRC list is complete or empty (a version from before per-block CRCs).
            assert len(self.block_crcs) in (0, 4 * n_blocks(self.length, bs)), self
            if self.has_pending and not self.pending_remove:
                assert len(self.pending_block_crcs) in (
                    0,
                    4 * n_blocks(self.pending_length, bs),
                ), self
            else:
                assert not self.pending_block_crcs, self
        else:
            assert not self.block_crcs and not self.pending_block_crcs, self


def n_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` covering ``length`` bytes."""
    return -(-length // block_size)


def chunk_key(inode: int, index: int) -> bytes:
    return _KEY_PREFIX + _KEY.pack(inode, index)


def parse_key(key: bytes) -> tuple[int, int]:
    assert key[:1] == _KEY_PREFIX and len(key) == 1 + _KEY.size, key
    inode, index = _KEY.unpack(key[1:])
    return int(inode), int(index)


def check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChainfsError(
            Code.EINVAL,
            f"chunk size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]",
        )


@dataclass(frozen=True, slots=True)
class EngineOptions:
    durable: bool = False
    disk_usage_limit_ratio: float = 0.95
    direct_writes: bool = True  # whole-chunk writes from aligned buffers use O_DIRECT
    crc_block_bytes: int = 64 * 1024  # per-block CRC granule of new chunks (power of 2)
    open_files: int = 256  # chunk files kept open for reads (LRU); 0 = open per read
    meta_cache_entries: int = 8192  # chunk records cached in memory (LRU) before RocksDB

    def __post_init__(self) -> None:
        bs = self.crc_block_bytes
        if not (MIN_CRC_BLOCK <= bs <= MAX_CRC_BLOCK and bs & (bs - 1) == 0):
            raise ValueError(
                f"crc_block_bytes {bs}: a power of 2 in [{MIN_CRC_BLOCK}, {MAX_CRC_BLOCK}]"
            )
        if self.open_files < 0 or self.meta_cache_entries < 0:
            raise ValueError("open_files and meta_cache_entries must be >= 0")


_DIRECT_ALIGN = 4096  # bytes: buffer address and length alignment O_DIRECT needs


def _direct_io_ok(view: memoryview) -> bool:
    """Can ``view`` go to disk with O_DIRECT (writable, page-aligned address and length)?"""
    if view.readonly or len(view) % _DIRECT_ALIGN or not view.contiguous:
        return False
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return addr % _DIRECT_ALIGN == 0


class _OpenFile:
    __slots__ = ("closing", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.closing = False  # evicted or invalidated: closed when the last user releases


class FdCache:
    """Read-only descriptors of chunk files, bounded LRU, shared by the I/O threads.

    A descriptor is closed only when no reader uses it (so its number is never
    reused under a read). A path the engine unlinks is invalidated; a file
    replaced behind the engine's back (st_nlink 0) is reopened on next use.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _OpenFile] = OrderedDict()
        self.opens = 0  # files opened (misses), for tests and profiles

    def __len__(self) -> int:
        return len(self._files)

    def acquire(self, path: str) -> _OpenFile:
        """An open descriptor of ``path`` (raises FileNotFoundError); release() it."""
        with self._lock:
            f = self._files.get(path)
            if f is not None:
                self._files.move_to_end(path)
                f.users += 1
        if f is not None:
            if os.fstat(f.fd).st_nlink:
                return f
            self.release(f)
            self.invalidate(path)  # unlinked or replaced: reopen below
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.opens += 1
        f = _OpenFile(fd)
        f.users = 1
        with self._lock:
            if self.capacity == 0:
                f.closing = True  # not cached: closed on release
                return f
            old = self._files.pop(path, None)
            if old is not None:
                self._retire(old)
            self._files[path] = f
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

    def invalidate(self, path: str) -> None:
        with self._lock:
            f = self._files.pop(path, None)
            if f is not None:
                self._retire(f)

    def _retire(self, f: _OpenFile) -> None:
        """Close now or when its last reader is done (call with the lock held)."""
        if not f.closing:
            f.closing = True
            if f.users == 0:
                os.close(f.fd)

    def clear(self) -> None:
        with self._lock:
            files = list(self._files.values())
            self._files.clear()
            for f in files:
                self._retire(f)


class ChunkEngine:
    """Chunk data files + chunk metadata in RocksDB for one target directory."""

    def __init__(self, path: str | Path, options: EngineOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or EngineOptions()
        self.data_dir = self.path / "data"
        self.path.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        for b in range(256):
            (self.data_dir / f"{b:02x}").mkdir(exist_ok=True)
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            self.db = rocksdict.Rdict(str(self.path / "meta"), opts)
        except Exception as e:  # rocksdict raises a bare Exception on a held lock
            if "lock" in str(e).lower():
                raise ChainfsError(
                    Code.STORE_LOCKED, f"target {self.path} is open in another process"
                ) from None
            raise
        self._closed = False
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.sync = self.options.durable
        self._stat_lock = threading.Lock()
        self._stat_at = 0.0
        self._stat = (0, 1)
        self.files = FdCache(self.options.open_files)
        self._edges = threading.local()  # per-thread buffers of edge CRC blocks
        # Write-through LRU of chunk records in front of RocksDB. A reader that
        # missed fills it only if no write happened since it looked (_meta_gen),
        # so it never caches a record older than the store's.
        self._meta: OrderedDict[tuple[int, int], ChunkRecord] = OrderedDict()
        self._meta_lock = threading.Lock()
        self._meta_gen = 0
        self.recovered: dict[str, int] = {}
        self.recover()

    # ---- identity ----------------------------------------------------------

    def load_ids(self) -> dict[str, int]:
        try:
            data = json.loads((self.path / "target.json").read_text())
        except FileNotFoundError:
            return {}
        return {k: int(v) for k, v in data.items()}

    def save_ids(self, ids: dict[str, int]) -> None:
        tmp = self.path / "target.json.tmp"
        tmp.write_text(json.dumps(ids))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "target.json")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.files.clear()
            self.db.close()

    # ---- files -------------------------------------------------------------

    @staticmethod
    def file_path_in(target_dir: str | Path, inode: int, index: int, gen: int) -> str:
        """Where a target directory keeps generation ``gen`` of a chunk's content."""
        return f"{target_dir}/data/{inode & 0xFF:02x}/{inode:016x}.{index:08x}.{gen}"

    def file_path(self, inode: int, index: int, gen: int) -> str:
        return self.file_path_in(self.path, inode, index, gen)

    def _fsync_dir_of(self, inode: int) -> None:
        fd = os.open(f"{self.data_dir}/{inode & 0xFF:02x}", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink(self, inode: int, index: int, gen: int) -> None:
        if gen:
            path = self.file_path(inode, index, gen)
            self.files.invalidate(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _write_file(
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
            self.options.direct_writes
            and offset == 0
            and keep == 0
            and final == len(data) > 0
            and _direct_io_ok(data)
        ):
            self._write_file_direct(inode, index, gen, data)
            return
        fd = os.open(self.file_path(inode, index, gen), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, keep)
            if final > keep:
                os.ftruncate(fd, final)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            if self.options.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def _write_file_direct(self, inode: int, index: int, gen: int, data: memoryview) -> None:
        """A whole new file from an aligned buffer with O_DIRECT: DMA from our buffer,
        no copy into the page cache (the copy that dominated replicated writes)."""
        path = self.file_path(inode, index, gen)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # file system without O_DIRECT: buffered instead
                raise
            self.options = replace(self.options, direct_writes=False)
            self._write_file(inode, index, gen, 0, data, 0, len(data))
            return
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            if self.options.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def _read_file(
        self, inode: int, index: int, gen: int, offset: int, out: memoryview, nowait: bool = False
    ) -> int:
        """Fill ``out`` from file ``gen`` at ``offset``; returns the bytes read.

        ``nowait``: only from the page cache (RWF_NOWAIT); BlockingIOError when the
        bytes would need the disk (the caller retries in an I/O thread).
        """
        return self._readv_file(inode, index, gen, offset, [out], nowait)

    def _readv_file(
        self, inode: int, index: int, gen: int, offset: int, bufs: list[memoryview], nowait: bool
    ) -> int:
        """Scatter-read consecutive bytes at ``offset`` into ``bufs``; the bytes read."""
        bufs = [b for b in bufs if len(b)]
        want = sum(len(b) for b in bufs)
        f = self.files.acquire(self.file_path(inode, index, gen))
        try:
            got = 0
            while got < want:
                if nowait:
                    n = os.preadv(f.fd, bufs, offset + got, os.RWF_NOWAIT)
                else:
                    n = os.preadv(f.fd, bufs, offset + got)
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
            self.files.release(f)

    def _crc_of_file(self, inode: int, index: int, gen: int, length: int) -> int | None:
        """CRC32C of the first ``length`` bytes of a file, None if shorter or absent."""
        if length == 0:
            return 0
        buf = bytearray(length)
        try:
            got = self._read_file(inode, index, gen, 0, memoryview(buf))
        except FileNotFoundError:
            return None
        if got != length:
            return None
        return crc.value(buf)

    # ---- metadata ----------------------------------------------------------

    def get(self, inode: int, index: int) -> ChunkRecord | None:
        key = (inode, index)
        with self._meta_lock:
            rec = self._meta.get(key)
            if rec is not None:
                self._meta.move_to_end(key)
                return rec
            gen = self._meta_gen
        raw = self.db.get(chunk_key(inode, index))
        if raw is None:
            return None
        rec = ChunkRecord.decode(raw)
        self._remember(key, rec, gen)
        return rec

    def _remember(self, key: tuple[int, int], rec: ChunkRecord, gen: int) -> None:
        cap = self.options.meta_cache_entries
        with self._meta_lock:
            if gen != self._meta_gen or cap == 0:
                return  # a write happened since the caller read the store
            self._meta[key] = rec
            self._meta.move_to_end(key)
            while len(self._meta) > cap:
                self._meta.popitem(last=False)

    def _put(self, inode: int, index: int, rec: ChunkRecord) -> None:
        rec.check()
        self.db.put(chunk_key(inode, index), rec.encode(), self._write_opts)
        key = (inode, index)
        with self._meta_lock:
            self._meta_gen += 1
            if self.options.meta_cache_entries:
                self._meta[key] = rec
                self._meta.move_to_end(key)
                if len(self._meta) > self.options.meta_cache_entries:
                    self._meta.popitem(last=False)
            else:
                self._meta.pop(key, None)

    def _delete(self, inode: int, index: int) -> None:
        self.db.delete(chunk_key(inode, index), self._write_opts)
        with self._meta_lock:
            self._meta_gen += 1
            self._meta.pop((inode, index), None)

    def iter_records(
        self, begin: bytes = _KEY_PREFIX, end: bytes = b"D"
    ) -> Iterator[tuple[bytes, ChunkRecord]]:
        for key, raw in self.db.items(from_key=begin):
            assert isinstance(key, bytes) and isinstance(raw, bytes)
            if key >= end:
                break
            yield key, ChunkRecord.decode(raw)

    def list_chunks(
        self, inode: int, begin_index: int = 0, end_index: int = 1 << 32, limit: int = 0
    ) -> list[tuple[int, ChunkRecord]]:
        """Chunks of ``inode`` with index in [begin_index, end_index), in index order."""
        out: list[tuple[int, ChunkRecord]] = []
        begin = chunk_key(inode, begin_index)
        end = chunk_key(inode, end_index) if end_index < (1 << 32) else chunk_key(inode + 1, 0)
        for key, rec in self.iter_records(begin, end):
            out.append((parse_key(key)[1], rec))
            if limit and len(out) >= limit:
                break
        return out

    def last_chunk(self, inode: int) -> tuple[int, ChunkRecord] | None:
        """The highest-index chunk of ``inode`` that has a committed version."""
        it = self.db.iter()
        try:
            it.seek_for_prev(chunk_key(inode, 0xFFFFFFFF))
            while it.valid():
                key = it.key()
                if key[:1] != _KEY_PREFIX:
                    return None
                ino, index = parse_key(key)
                if ino != inode:
                    return None
                rec = ChunkRecord.decode(it.value())
                if rec.committed_version > 0:
                    return index, rec
                it.prev()
            return None
        finally:
            del it

    # ---- space -------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(used bytes, capacity bytes) of the target's file system."""
        with self._stat_lock:
            now = time.monotonic()
            if now - self._stat_at > _STAT_CACHE_S:
                st = os.statvfs(self.path)
                capacity = st.f_blocks * st.f_frsize
                used = capacity - st.f_bavail * st.f_frsize
                self._stat = (used, max(capacity, 1))
                self._stat_at = now
            return self._stat

    def _check_space(self, inode: int, index: int) -> None:
        used, capacity = self.usage()
        if used / capacity > self.options.disk_usage_limit_ratio:
            raise ChainfsError(
                Code.ENOSPC,
                f"target {self.path}: {used / capacity:.1%} used, above the limit "
                f"{self.options.disk_usage_limit_ratio:.1%}; refusing new chunk "
                f"({inode}, {index})",
            )

    # ---- updates -----------------------------------------------------------

    def _base(self, inode: int, index: int, chunk_size: int, version: int) -> ChunkRecord:
        """The record an update at ``version`` starts from, with any stale pending dropped."""
        check_chunk_size(chunk_size)
        rec = self.get(inode, index)
        if rec is None or (rec.committed_version == 0 and not rec.has_pending):
            self._check_space(inode, index)
            rec = ChunkRecord(chunk_size=chunk_size)
        elif rec.chunk_size != chunk_size:
            raise ChainfsError(
                Code.EINVAL,
                f"chunk ({inode}, {index}) has chunk size {rec.chunk_size}, request says "
                f"{chunk_size}",
            )
        if rec.has_pending:
            rec = self._drop_pending(inode, index, rec)
        if version != rec.committed_version + 1:
            raise ChainfsError(
                Code.EINVAL,
                f"chunk ({inode}, {index}): update version {version} does not follow "
                f"committed {rec.committed_version}",
            )
        return rec

    def _drop_pending(self, inode: int, index: int, rec: ChunkRecord) -> ChunkRecord:
        """Forget the pending version (its file, or bytes written past the committed end)."""
        assert rec.has_pending
        if rec.pending_file_gen and rec.pending_file_gen != rec.file_gen:
            self._unlink(inode, index, rec.pending_file_gen)
        elif rec.file_gen and rec.pending_file_gen == rec.file_gen:
            # In-place append or extension: cut the file back to the committed length.
            os.truncate(self.file_path(inode, index, rec.file_gen), rec.length)
        return replace(
            rec,
            pending_version=0,
            pending_length=0,
            pending_crc32c=0,
            pending_file_gen=0,
            pending_remove=False,
            pending_client=_NO_CLIENT,
            pending_request=0,
            pending_block_crcs=b"",
        )

    def _set_pending(
        self,
        inode: int,
        index: int,
        rec: ChunkRecord,
        version: int,
        length: int,
        crc32c: int,
        file_gen: int,
        client: bytes,
        request: int,
        block_crcs: bytes,
    ) -> ChunkRecord:
        new = replace(
            rec,
            block_size=self._block_size(rec),
            pending_block_crcs=block_crcs,
            pending_version=version,
            pending_length=length,
            pending_crc32c=crc32c,
            pending_file_gen=file_gen,
            pending_remove=False,
            pending_client=client.ljust(16, b"\0")[:16],
            pending_request=request,
        )
        self._put(inode, index, new)
        return new

    # ---- per-block CRCs ------------------------------------------------------

    def _block_size(self, rec: ChunkRecord) -> int:
        """A chunk keeps the CRC block size it was created with."""
        return rec.block_size or self.options.crc_block_bytes

    def _with_block_crcs(
        self, inode: int, index: int, rec: ChunkRecord, src: memoryview | None = None
    ) -> ChunkRecord:
        """``rec`` (nothing pending) with the per-block CRCs of its committed bytes.

        A record from before per-block CRCs gets them from its file (or ``src``,
        the committed bytes already in memory), checked against its whole CRC.
        """
        assert not rec.has_pending
        bs = self._block_size(rec)
        if rec.has_block_crcs or rec.length == 0:
            return replace(rec, block_size=bs)
        if src is None:
            buf = memoryview(bytearray(rec.length))
            got = self._read_file(inode, index, rec.file_gen, 0, buf)
        else:
            buf, got = src, len(src)
        if got != rec.length or crc.value(buf) != rec.crc32c:
            raise self._damaged(inode, index, rec, "data does not match its CRC32C")
        return replace(rec, block_size=bs, block_crcs=crc.block_crcs(buf, bs))

    def _damaged(self, inode: int, index: int, rec: ChunkRecord, what: str) -> ChainfsError:
        return ChainfsError(
            Code.CHECKSUM_MISMATCH,
            f"chunk ({inode}, {index}) v{rec.committed_version} on {self.path}: {what}",
        )

    def _old_block(
        self, inode: int, index: int, rec: ChunkRecord, block: int, src: memoryview | None
    ) -> memoryview:
        """Committed block ``block`` (from the file or ``src``), checked against its CRC."""
        bs = rec.block_size
        start = block * bs
        n = min(bs, rec.length - start)
        assert n > 0 and rec.has_block_crcs
        if src is not None:
            view = src[start : start + n]
        else:
            view = memoryview(bytearray(n))
            if self._read_file(inode, index, rec.file_gen, start, view) != n:
                raise self._damaged(inode, index, rec, f"file shorter than its length {rec.length}")
        if crc.value(view) != crc.block_crc(rec.block_crcs, block):
            raise self._damaged(inode, index, rec, f"block {block} does not match its CRC32C")
        return view

    def _write_block_crcs(
        self,
        inode: int,
        index: int,
        rec: ChunkRecord,
        offset: int,
        data: memoryview,
        src: memoryview | None = None,
    ) -> bytes:
        """Block CRCs after writing ``data`` at ``offset`` over ``rec``'s committed bytes.

        Untouched blocks keep their CRC; a touched block is recomputed from the
        data, zeros (a hole up to ``offset``) and, for the first and last touched
        block only, the committed bytes around the write (read and verified).
        """
        bs = rec.block_size
        old = rec.block_crcs
        old_len = rec.length if rec.committed_version else 0
        end = offset + len(data)
        new_len = max(old_len, end)
        mod_start = min(offset, old_len)
        first, last = mod_start // bs, n_blocks(end, bs)
        out = bytearray(old[: 4 * first])
        for b in range(first, last):
            bstart = b * bs
            bend = min(bstart + bs, new_len)
            if bstart >= offset and bend <= end:
                out += crc.pack_crc(crc.value(data[bstart - offset : bend - offset]))
                continue
            around = None
            if bstart < mod_start or end < bend:
                around = self._old_block(inode, index, rec, b, src)
            c = 0
            pos = bstart
            if pos < mod_start:
                assert around is not None
                c = crc.extend(c, around[: mod_start - bstart])
                pos = mod_start
            if pos < offset:  # the hole between the old end and the write
                c = crc.extend_zeros(c, min(offset, bend) - pos)
                pos = min(offset, bend)
            if pos < bend and pos < end:
                e = min(end, bend)
                c = crc.extend(c, data[pos - offset : e - offset])
                pos = e
            if pos < bend:
                assert around is not None
                c = crc.extend(c, around[pos - bstart : bend - bstart])
                pos = bend
            out += crc.pack_crc(c)
        out += old[4 * last : 4 * n_blocks(new_len, bs)]
        assert len(out) == 4 * n_blocks(new_len, bs)
        return bytes(out)

    def _truncate_block_crcs(self, inode: int, index: int, rec: ChunkRecord, length: int) -> bytes:
        """Block CRCs of ``rec``'s committed bytes cut or zero-extended to ``length``."""
        bs = rec.block_size
        old_len = rec.length
        full = min(old_len, length) // bs
        out = bytearray(rec.block_crcs[: 4 * full])
        pos = full * bs
        if length > old_len:
            if old_len > pos:  # the old partial last block, extended with zeros
                c = crc.block_crc(rec.block_crcs, full)
                take = min(pos + bs, length) - old_len
                out += crc.pack_crc(crc.extend_zeros(c, take))
                pos = old_len + take
            while pos < length:
                n = min(bs, length - pos)
                out += crc.pack_crc(crc.zeros(n))
                pos += n
        elif length > pos:  # the block the cut falls in: its kept prefix
            block = self._old_block(inode, index, rec, full, None)
            out += crc.pack_crc(crc.value(block[: length - pos]))
        assert len(out) == 4 * n_blocks(length, bs)
        return bytes(out)

    def prepare_write(
        self,
        inode: int,
        index: int,
        offset: int,
        data: memoryview,
        data_crc: int,
        chunk_size: int,
        version: int,
        client: bytes = _NO_CLIENT,
        request: int = 0,
    ) -> ChunkRecord:
        """Apply a write of ``data`` at ``offset`` as pending ``version`` (= committed + 1)."""
        length = len(data)
        if offset + length > chunk_size:
            raise ChainfsError(
                Code.EINVAL,
                f"write [{offset}, {offset + length}) outside chunk of {chunk_size} bytes",
            )
        rec = self._base(inode, index, chunk_size, version)
        committed_len = rec.length if rec.committed_version else 0
        end = offset + length
        if offset == 0 and end >= committed_len:
            # Whole-chunk write: a new file, no copy.
            gen = version
            self._write_file(inode, index, gen, 0, data, 0, length)
            new_len, new_crc = length, data_crc
            blocks = crc.block_crcs(data, self._block_size(rec))
            if self.options.durable:
                self._fsync_dir_of(inode)
        elif offset >= committed_len and rec.file_gen:
            # Append (maybe past a hole): in place, beyond what readers look at.
            rec = self._with_block_crcs(inode, index, rec)
            blocks = self._write_block_crcs(inode, index, rec, offset, data)
            gen = rec.file_gen
            self._write_file(inode, index, gen, offset, data, committed_len, end)
            new_len = end
            new_crc = crc.combine(
                crc.extend_zeros(rec.crc32c, offset - committed_len), data_crc, length
            )
        elif offset >= committed_len:
            # No file yet (new or empty chunk) and a write not at 0: hole + data, new file.
            rec = replace(rec, block_size=self._block_size(rec))
            blocks = self._write_block_crcs(inode, index, rec, offset, data)
            gen = version
            self._write_file(inode, index, gen, offset, data, 0, end)
            new_len = end
            new_crc = crc.combine(crc.zeros(offset), data_crc, length)
            if self.options.durable:
                self._fsync_dir_of(inode)
        else:
            # Overwrite inside the committed bytes: read-modify-write into a new file.
            new_len = max(committed_len, end)
            buf = bytearray(new_len)
            view = memoryview(buf)
            got = self._read_file(inode, index, rec.file_gen, 0, view[:committed_len])
            if got != committed_len:
                raise ChainfsError(
                    Code.EIO, f"chunk ({inode}, {index}) file shorter than its length"
                )
            # The blocks around the write are checked against their CRCs before
            # their bytes go into the new version (never bless damaged bytes).
            rec = self._with_block_crcs(inode, index, rec, view[:committed_len])
            blocks = self._write_block_crcs(inode, index, rec, offset, data, view[:committed_len])
            view[offset:end] = data
            new_crc = crc.combine_blocks(blocks, rec.block_size, new_len)
            gen = version
            self._write_file(inode, index, gen, 0, view, 0, new_len)
            if self.options.durable:
                self._fsync_dir_of(inode)
        return self._set_pending(
            inode, index, rec, version, new_len, new_crc, gen, client, request, blocks
        )

    def prepare_truncate(
        self,
        inode: int,
        index: int,
        length: int,
        chunk_size: int,
        version: int,
        client: bytes = _NO_CLIENT,
        request: int = 0,
    ) -> ChunkRecord:
        """Make the chunk ``length`` bytes long (cut or zero-extended) as pending ``version``."""
        if length > chunk_size:
            raise ChainfsError(Code.EINVAL, f"truncate to {length} beyond chunk size {chunk_size}")
        rec = self._base(inode, index, chunk_size, version)
        committed_len = rec.length
        gen = rec.file_gen
        if length != committed_len:
            rec = self._with_block_crcs(inode, index, rec)
        blocks = rec.block_crcs
        if length == committed_len:
            new_crc = rec.crc32c
        elif length > committed_len:
            blocks = self._truncate_block_crcs(inode, index, rec, length)
            if gen:
                os.truncate(self.file_path(inode, index, gen), committed_len)
                os.truncate(self.file_path(inode, index, gen), length)
            else:
                gen = version
                self._write_file(inode, index, gen, 0, memoryview(b""), 0, length)
            new_crc = crc.extend_zeros(rec.crc32c, length - committed_len)
        else:
            # Shrink: the file keeps its bytes until commit (readers may still use them).
            blocks = self._truncate_block_crcs(inode, index, rec, length)
            new_crc = crc.combine_blocks(blocks, rec.block_size, length)
        return self._set_pending(
            inode, index, rec, version, length, new_crc, gen, client, request, blocks
        )

    def prepare_replace(
        self,
        inode: int,
        index: int,
        data: memoryview,
        data_crc: int,
        chunk_size: int,
        version: int,
        client: bytes = _NO_CLIENT,
        request: int = 0,
    ) -> ChunkRecord:
        """Full-chunk replace at ``version`` whatever the local versions (sync, gap repair)."""
        check_chunk_size(chunk_size)
        if len(data) > chunk_size:
            raise ChainfsError(Code.EINVAL, f"{len(data)} bytes exceed chunk size {chunk_size}")
        rec = self.get(inode, index)
        if rec is None:
            self._check_space(inode, index)
            rec = ChunkRecord(chunk_size=chunk_size)
        if rec.has_pending:
            rec = self._drop_pending(inode, index, rec)
        if version <= rec.committed_version:
            raise ChainfsError(
                Code.EINVAL,
                f"chunk ({inode}, {index}): replace version {version} not above committed "
                f"{rec.committed_version}",
            )
        self._write_file(inode, index, version, 0, data, 0, len(data))
        if self.options.durable:
            self._fsync_dir_of(inode)
        rec = replace(rec, chunk_size=chunk_size)
        blocks = crc.block_crcs(data, self._block_size(rec))
        return self._set_pending(
            inode, index, rec, version, len(data), data_crc, version, client, request, blocks
        )

    def prepare_remove(
        self, inode: int, index: int, client: bytes = _NO_CLIENT, request: int = 0
    ) -> ChunkRecord | None:
        """Mark the chunk as being removed (reads answer NOT_COMMITTED); None if absent."""
        rec = self.get(inode, index)
        if rec is None:
            return None
        if rec.has_pending:
            rec = self._drop_pending(inode, index, rec)
        new = replace(
            rec,
            pending_version=rec.committed_version + 1,
            pending_remove=True,
            pending_length=0,
            pending_crc32c=0,
            pending_file_gen=0,
            pending_client=client.ljust(16, b"\0")[:16],
            pending_request=request,
            pending_block_crcs=b"",
        )
        self._put(inode, index, new)
        return new

    def commit(
        self, inode: int, index: int, version: int, chain_version: int
    ) -> ChunkRecord | None:
        """Make pending ``version`` the committed one; None when that removed the chunk."""
        rec = self.get(inode, index)
        if rec is None:
            raise ChainfsError(Code.CHUNK_NOT_FOUND, f"commit of unknown chunk ({inode}, {index})")
        if rec.committed_version >= version and not rec.has_pending:
            return rec  # already committed (a repeated ack)
        if rec.pending_version != version:
            raise ChainfsError(
                Code.EINVAL,
                f"chunk ({inode}, {index}): commit of version {version}, pending is "
                f"{rec.pending_version}, committed {rec.committed_version}",
            )
        if rec.pending_remove:
            self._delete(inode, index)
            self._unlink(inode, index, rec.file_gen)
            return None
        new = ChunkRecord(
            committed_version=version,
            length=rec.pending_length,
            crc32c=rec.pending_crc32c,
            chain_version=chain_version,
            file_gen=rec.pending_file_gen,
            chunk_size=rec.chunk_size,
            committed_client=rec.pending_client,
            committed_request=rec.pending_request,
            block_size=rec.block_size,
            block_crcs=rec.pending_block_crcs,
        )
        self._put(inode, index, new)
        if rec.file_gen and rec.file_gen != new.file_gen:
            self._unlink(inode, index, rec.file_gen)
        elif new.file_gen and new.length < rec.length:
            os.truncate(self.file_path(inode, index, new.file_gen), new.length)
        return new

    def abort(self, inode: int, index: int) -> ChunkRecord | None:
        """Discard the pending version (the committed one stays)."""
        rec = self.get(inode, index)
        if rec is None or not rec.has_pending:
            return rec
        new = self._drop_pending(inode, index, rec)
        if new.committed_version == 0:
            self._delete(inode, index)
            return None
        self._put(inode, index, new)
        return new

    # ---- reads -------------------------------------------------------------

    @staticmethod
    def read_span(rec: ChunkRecord, offset: int, length: int, verify: bool) -> tuple[int, int]:
        """The bytes [lo, hi) of the committed version a read of [offset, +length) loads:
        the range itself, or with ``verify`` the CRC blocks around it (the whole
        chunk for a record without per-block CRCs)."""
        start = min(offset, rec.length)
        end = min(offset + length, rec.length)
        if not verify or start == end:
            return start, end
        if not rec.has_block_crcs:
            return 0, rec.length
        bs = rec.block_size
        return start // bs * bs, min(n_blocks(end, bs) * bs, rec.length)

    @classmethod
    def read_buffer_bytes(cls, rec: ChunkRecord, offset: int, length: int, verify: bool) -> int:
        """The size of the buffer ``read`` fills (the range, or the whole chunk when
        verifying a record without per-block CRCs)."""
        if verify and not rec.has_block_crcs:
            lo, hi = cls.read_span(rec, offset, length, verify)
            return hi - lo
        return max(0, min(offset + length, rec.length) - min(offset, rec.length))

    @staticmethod
    def _bad_block(rec: ChunkRecord, segments: list[tuple[int, memoryview]]) -> int | None:
        """None if the consecutive committed bytes in ``segments`` ((offset, bytes)
        pieces covering whole CRC blocks) match their CRCs, else the bad block."""
        lo = segments[0][0]
        hi = segments[-1][0] + len(segments[-1][1])
        if lo == 0 and hi == rec.length and len(segments) == 1:
            if crc.value(segments[0][1]) == rec.crc32c:
                return None
            if not rec.has_block_crcs:
                return -1
        bs = rec.block_size
        for b in range(lo // bs, n_blocks(hi, bs)):
            bstart = b * bs
            bend = min(bstart + bs, rec.length)
            c = 0
            for at, view in segments:
                a, z = max(bstart, at), min(bend, at + len(view))
                if a < z:
                    c = crc.extend(c, view[a - at : z - at])
            if c != crc.block_crc(rec.block_crcs, b):
                return b
        return -1 if lo == 0 and hi == rec.length and len(segments) == 1 else None

    def _edge_buffers(self, head: int, tail: int) -> tuple[memoryview, memoryview]:
        """Per-thread buffers for the bytes of the edge CRC blocks outside a read."""
        local = self._edges
        buf: bytearray | None = getattr(local, "buf", None)
        if buf is None or len(buf) < head + tail:
            buf = local.buf = bytearray(max(head + tail, 2 * self.options.crc_block_bytes))
        view = memoryview(buf)
        return view[:head], view[head : head + tail]

    def read(
        self,
        inode: int,
        index: int,
        offset: int,
        length: int,
        verify: bool,
        scratch: memoryview | None = None,
        nowait: bool = False,
    ) -> tuple[ChunkRecord | None, memoryview]:
        """Committed bytes [offset, offset + length) (shorter at the chunk's end).

        ``scratch``: a buffer to read into (``read_buffer_bytes`` of them) instead
        of a new one; the result may be a slice of it. With ``verify`` the CRC
        blocks the range touches are read and checked (the whole chunk for a
        record from before per-block CRCs); the bytes of the edge blocks outside
        the range land in small per-thread buffers (one scatter read). Raises
        NOT_COMMITTED when a version is pending and CHECKSUM_MISMATCH when the
        file does not match its stored CRC32C. A missing chunk reads as empty
        (record None). ``nowait``: page cache only, BlockingIOError if the disk
        is needed.
        """
        # A CRC failure seen while the record kept changing: reported as damage
        # (the client then reads another replica) if the retries run out.
        damaged: ChainfsError | None = None
        for _ in range(_READ_RACE_RETRIES):
            rec = self.get(inode, index)
            if rec is None or (rec.committed_version == 0 and not rec.has_pending):
                return None, memoryview(b"")
            if rec.has_pending:
                raise ChainfsError(
                    Code.NOT_COMMITTED,
                    f"chunk ({inode}, {index}) has pending version {rec.pending_version}",
                )
            start = min(offset, rec.length)
            end = min(offset + length, rec.length)
            if end == start:
                return rec, memoryview(b"")
            lo, hi = self.read_span(rec, offset, length, verify)
            # [bstart, bend) goes into ``out``; the rest of [lo, hi) into edge buffers.
            bstart, bend = (start, end) if rec.has_block_crcs else (lo, hi)
            n = bend - bstart
            if scratch is not None and len(scratch) >= n:
                out = scratch[:n]
            else:
                out = memoryview(bytearray(n))
            head, tail = self._edge_buffers(bstart - lo, hi - bend)
            try:
                got = self._readv_file(inode, index, rec.file_gen, lo, [head, out, tail], nowait)
                if got == hi - lo:
                    bad = None
                    if verify:
                        parts = [(lo, head), (bstart, out), (bend, tail)]
                        bad = self._bad_block(rec, [(at, v) for at, v in parts if len(v)])
                    if bad is None:
                        return rec, out[start - bstart : end - bstart]
                    where = "data" if bad < 0 else f"block {bad}"
                    damaged = self._damaged(inode, index, rec, f"{where} does not match its CRC32C")
                    if self._record_unchanged(inode, index, rec):
                        raise damaged
                    continue
            except FileNotFoundError:
                pass
            # Short read or vanished file: a commit raced us (or the file is damaged).
            if self._record_unchanged(inode, index, rec):
                raise ChainfsError(
                    Code.CHECKSUM_MISMATCH,
                    f"chunk ({inode}, {index}) file on {self.path} is shorter than its "
                    f"length {rec.length}",
                )
        if damaged is not None:
            raise damaged
        raise ChainfsError(Code.NOT_COMMITTED, f"chunk ({inode}, {index}) keeps changing")

    def read_pending(self, inode: int, index: int, rec: ChunkRecord) -> memoryview:
        """The whole content of ``rec``'s pending version (to send it down the chain)."""
        assert rec.has_pending and not rec.pending_remove
        buf = memoryview(bytearray(rec.pending_length))
        got = self._read_file(inode, index, rec.pending_file_gen, 0, buf) if len(buf) else 0
        if got != rec.pending_length or crc.value(buf) != rec.pending_crc32c:
            raise ChainfsError(
                Code.CHECKSUM_MISMATCH,
                f"pending v{rec.pending_version} of chunk ({inode}, {index}) on {self.path} "
                "is damaged",
            )
        return buf

    def _record_unchanged(self, inode: int, index: int, rec: ChunkRecord) -> bool:
        """Same committed version and file: a short or bad read is damage, not a race."""
        now = self.get(inode, index)
        return (
            now is not None
            and now.committed_version == rec.committed_version
            and now.file_gen == rec.file_gen
        )

    # ---- recovery ----------------------------------------------------------

    def recover(self) -> None:
        """Resolve what a crash left and assert every record's invariants."""
        stats = {"chunks": 0, "pending_kept": 0, "pending_dropped": 0, "orphans": 0, "trimmed": 0}
        referenced: set[str] = set()
        for key, rec in list(self.iter_records()):
            inode, index = parse_key(key)
            stats["chunks"] += 1
            rec.check()
            if rec.has_pending and not rec.pending_remove:
                ok = self._pending_complete(inode, index, rec)
                if ok:
                    stats["pending_kept"] += 1
                else:
                    stats["pending_dropped"] += 1
                    new = self._drop_pending(inode, index, rec)
                    if new.committed_version == 0:
                        self._delete(inode, index)
                        continue
                    self._put(inode, index, new)
                    rec = new
            if rec.file_gen:
                path = self.file_path(inode, index, rec.file_gen)
                referenced.add(path)
                size = os.stat(path).st_size if os.path.exists(path) else -1
                assert size >= 0, f"committed chunk ({inode}, {index}) has no file {path}"
                keep = rec.length
                if rec.has_pending and rec.pending_file_gen == rec.file_gen:
                    keep = max(keep, rec.pending_length)
                if size > keep:
                    os.truncate(path, keep)
                    stats["trimmed"] += 1
            if rec.has_pending and rec.pending_file_gen:
                referenced.add(self.file_path(inode, index, rec.pending_file_gen))
        for sub in self.data_dir.iterdir():
            for f in sub.iterdir():
                if str(f) not in referenced:
                    f.unlink()
                    stats["orphans"] += 1
        self.recovered = stats
        if any(stats[k] for k in ("pending_kept", "pending_dropped", "orphans", "trimmed")):
            log.info("target %s recovered: %s", self.path, stats)

    def _pending_complete(self, inode: int, index: int, rec: ChunkRecord) -> bool:
        got = self._crc_of_file(inode, index, rec.pending_file_gen, rec.pending_length)
        if rec.pending_length == 0:
            return True
        return got == rec.pending_crc32c

    # ---- stats -------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(chunks, chunks with a pending version)."""
        total = pending = 0
        for _, rec in self.iter_records():
            total += 1
            pending += rec.has_pending
        return total, pending
