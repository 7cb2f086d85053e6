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

    @property
    def has_pending(self) -> bool:
        return self.pending_version != 0

    def encode(self) -> bytes:
        return _RECORD.pack(
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

    @classmethod
    def decode(cls, raw: bytes) -> ChunkRecord:
        f = _RECORD.unpack(raw)
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


_DIRECT_ALIGN = 4096  # bytes: buffer address and length alignment O_DIRECT needs


def _direct_io_ok(view: memoryview) -> bool:
    """Can ``view`` go to disk with O_DIRECT (writable, page-aligned address and length)?"""
    if view.readonly or len(view) % _DIRECT_ALIGN or not view.contiguous:
        return False
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return addr % _DIRECT_ALIGN == 0


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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file_path(inode, index, gen))

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

    def _read_file(self, inode: int, index: int, gen: int, offset: int, out: memoryview) -> int:
        """Fill ``out`` from file ``gen`` at ``offset``; returns the bytes read."""
        fd = os.open(self.file_path(inode, index, gen), os.O_RDONLY)
        try:
            got = 0
            while got < len(out):
                n = os.preadv(fd, [out[got:]], offset + got)
                if n == 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

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
        raw = self.db.get(chunk_key(inode, index))
        return None if raw is None else ChunkRecord.decode(raw)

    def _put(self, inode: int, index: int, rec: ChunkRecord) -> None:
        rec.check()
        self.db.put(chunk_key(inode, index), rec.encode(), self._write_opts)

    def _delete(self, inode: int, index: int) -> None:
        self.db.delete(chunk_key(inode, index), self._write_opts)

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
    ) -> ChunkRecord:
        new = replace(
            rec,
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
            if self.options.durable:
                self._fsync_dir_of(inode)
        elif offset >= committed_len and rec.file_gen:
            # Append (maybe past a hole): in place, beyond what readers look at.
            gen = rec.file_gen
            self._write_file(inode, index, gen, offset, data, committed_len, end)
            new_len = end
            new_crc = crc.combine(
                crc.extend_zeros(rec.crc32c, offset - committed_len), data_crc, length
            )
        elif offset >= committed_len:
            # No file yet (new or empty chunk) and a write not at 0: hole + data, new file.
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
            view[offset:end] = data
            new_crc = crc.value(buf)
            gen = version
            self._write_file(inode, index, gen, 0, view, 0, new_len)
            if self.options.durable:
                self._fsync_dir_of(inode)
        return self._set_pending(inode, index, rec, version, new_len, new_crc, gen, client, request)

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
        if length == committed_len:
            new_crc = rec.crc32c
        elif length > committed_len:
            if gen:
                os.truncate(self.file_path(inode, index, gen), committed_len)
                os.truncate(self.file_path(inode, index, gen), length)
            else:
                gen = version
                self._write_file(inode, index, gen, 0, memoryview(b""), 0, length)
            new_crc = crc.extend_zeros(rec.crc32c, length - committed_len)
        else:
            # Shrink: the file keeps its bytes until commit (readers may still use them).
            got = self._crc_of_file(inode, index, gen, length)
            if got is None:
                raise ChainfsError(
                    Code.EIO, f"chunk ({inode}, {index}) file shorter than its length"
                )
            new_crc = got
        return self._set_pending(inode, index, rec, version, length, new_crc, gen, client, request)

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
        return self._set_pending(
            inode, index, rec, version, len(data), data_crc, version, client, request
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

    def read(
        self,
        inode: int,
        index: int,
        offset: int,
        length: int,
        verify: bool,
        scratch: memoryview | None = None,
    ) -> tuple[ChunkRecord | None, memoryview]:
        """Committed bytes [offset, offset + length) (shorter at the chunk's end).

        ``scratch``: a buffer to read into (the whole chunk when verifying, else
        just the range) instead of a new one; the result may be a slice of it.
        Raises NOT_COMMITTED when a version is pending and CHECKSUM_MISMATCH when
        ``verify`` finds the file does not match its stored CRC32C. A missing
        chunk reads as empty (record None).
        """
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
            want = end - start
            if want == 0:
                return rec, memoryview(b"")
            try:
                if verify:
                    if scratch is not None and len(scratch) >= rec.length:
                        buf = scratch[: rec.length]
                    else:
                        buf = memoryview(bytearray(rec.length))
                    got = self._read_file(inode, index, rec.file_gen, 0, buf)
                    if got == rec.length:
                        if crc.value(buf) != rec.crc32c:
                            if self._record_unchanged(inode, index, rec):
                                raise ChainfsError(
                                    Code.CHECKSUM_MISMATCH,
                                    f"chunk ({inode}, {index}) v{rec.committed_version} on "
                                    f"{self.path}: data does not match its CRC32C",
                                )
                            continue
                        return rec, buf[start:end]
                else:
                    if scratch is not None and len(scratch) >= want:
                        dest = scratch[:want]
                    else:
                        dest = memoryview(bytearray(want))
                    got = self._read_file(inode, index, rec.file_gen, start, dest)
                    if got == want:
                        return rec, dest
            except FileNotFoundError:
                pass
            # Short read or vanished file: a commit raced us (or the file is damaged).
            if self._record_unchanged(inode, index, rec):
                raise ChainfsError(
                    Code.CHECKSUM_MISMATCH,
                    f"chunk ({inode}, {index}) file on {self.path} is shorter than its "
                    f"length {rec.length}",
                )
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
