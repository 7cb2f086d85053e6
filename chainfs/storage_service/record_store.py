"""The chunk records of one target: RocksDB under ``meta/``, behind a bounded LRU.

Keys are :func:`chunk_key` (one inode's chunks adjacent, in index order);
values are encoded :class:`ChunkRecord`. Journal keys (:func:`journal_key`,
outside the chunk key range) hold the bytes of journaled overwrites: a journal
is written and dropped in the same atomic batch as the record that refers to
it. The cache is write-through; a reader
that missed fills it only if no write happened since it looked (``_gen``), so
it never caches a record older than the store's. Methods are synchronous (call
them in an I/O thread) and safe from several threads.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import rocksdict

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service.chunk_record import (
    JOURNAL_END,
    JOURNAL_PREFIX,
    KEY_END,
    KEY_PREFIX,
    ChunkRecord,
    chunk_key,
    journal_key,
    parse_journal_key,
    parse_key,
)

Key = tuple[int, int]  # (inode, chunk index)
_JOURNAL_OFFSET = struct.Struct("<I")  # a journal value: offset in the chunk, then the bytes


def held_bytes_of(rec: ChunkRecord | None) -> int:
    """Bytes of chunk data ``rec`` keeps on disk: the committed version plus a
    pending one written to a file of its own (copy-on-write)."""
    if rec is None:
        return 0
    if not rec.has_pending:
        return rec.length
    if rec.pending_file_gen and rec.pending_file_gen != rec.file_gen:
        return rec.length + rec.pending_length
    return max(rec.length, rec.pending_length)


class RecordStore:
    """Chunk id -> ChunkRecord for one target directory."""

    def __init__(self, target_dir: Path, durable: bool, cache_entries: int) -> None:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            self.db = rocksdict.Rdict(str(target_dir / "meta"), opts)
        except Exception as e:  # rocksdict raises a bare Exception on a held lock
            if "lock" in str(e).lower():
                raise ChainfsError(
                    Code.STORE_LOCKED, f"target {target_dir} is open in another process"
                ) from None
            raise
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.sync = durable
        self._nosync_opts = rocksdict.WriteOptions()
        self._nosync_opts.sync = False
        self._cache_entries = cache_entries
        self._cache: OrderedDict[Key, ChunkRecord] = OrderedDict()
        self._lock = threading.Lock()
        self._gen = 0  # bumped by every write
        # Running total of held_bytes_of() over every record: one scan at open,
        # then adjusted by each put/delete, so reading it costs nothing.
        self._held_bytes = sum(held_bytes_of(rec) for _, rec in self.iter_records())

    def close(self) -> None:
        self.db.close()

    @property
    def cached(self) -> int:
        """Records held in the cache now (at most ``cache_entries``)."""
        return len(self._cache)

    def get(self, inode: int, index: int) -> ChunkRecord | None:
        key = (inode, index)
        with self._lock:
            rec = self._cache.get(key)
            if rec is not None:
                self._cache.move_to_end(key)
                return rec
            gen = self._gen
        raw = self.db.get(chunk_key(inode, index))
        if raw is None:
            return None
        rec = ChunkRecord.decode(raw)
        with self._lock:
            if gen == self._gen:  # else a write happened since we read the store
                self._cache_insert(key, rec)
        return rec

    @property
    def held_bytes(self) -> int:
        """Bytes of chunk data this target holds (committed and pending versions)."""
        return self._held_bytes

    def put(self, inode: int, index: int, rec: ChunkRecord) -> None:
        rec.check()
        self._write(inode, index, rec, None)

    def put_with_journal(
        self, inode: int, index: int, rec: ChunkRecord, offset: int, data: memoryview
    ) -> None:
        """``rec`` and its journal, atomically: a journaled pending version, or a
        committed one still to be written in place (``journal_applying``)."""
        assert rec.pending_journal or rec.journal_applying, rec
        rec.check()
        version = rec.pending_version if rec.pending_journal else rec.committed_version
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(chunk_key(inode, index), rec.encode())
        value = b"".join((_JOURNAL_OFFSET.pack(offset), data))
        batch.put(journal_key(inode, index, version), value)
        self._write(inode, index, rec, batch)

    def put_dropping_journal(
        self, inode: int, index: int, rec: ChunkRecord, version: int, sync: bool = True
    ) -> None:
        """``rec`` and the removal of the journal of ``version``, atomically.
        ``sync=False``: not synced even on a durable target (the caller says why
        losing it is harmless); the next synced write makes it durable too, since
        RocksDB's WAL is one ordered log."""
        rec.check()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(chunk_key(inode, index), rec.encode())
        batch.delete(journal_key(inode, index, version))
        self._write(inode, index, rec, batch, sync)

    def _write(
        self,
        inode: int,
        index: int,
        rec: ChunkRecord,
        batch: rocksdict.WriteBatch | None,
        sync: bool = True,
    ) -> None:
        """Store ``rec`` (with ``batch``, which must hold its put, atomically) and
        keep the cache and ``held_bytes`` in step."""
        old = held_bytes_of(self.get(inode, index))  # a cache hit: updates read first
        opts = self._write_opts if sync else self._nosync_opts
        if batch is None:
            self.db.put(chunk_key(inode, index), rec.encode(), opts)
        else:
            self.db.write(batch, opts)
        with self._lock:
            self._gen += 1
            self._cache_insert((inode, index), rec)
            self._held_bytes += held_bytes_of(rec) - old

    def get_journal(self, inode: int, index: int, version: int) -> tuple[int, bytes] | None:
        """(offset, bytes) of the journaled write that makes ``version``; None if absent."""
        raw = self.db.get(journal_key(inode, index, version))
        if raw is None:
            return None
        (offset,) = _JOURNAL_OFFSET.unpack_from(raw)
        return offset, raw[_JOURNAL_OFFSET.size :]

    def delete_journal(self, inode: int, index: int, version: int) -> None:
        self.db.delete(journal_key(inode, index, version), self._write_opts)

    def journal_keys(self) -> list[tuple[int, int, int]]:
        """(inode, index, version) of every journal in the store (recovery sweeps them)."""
        out = []
        for key in self.db.keys(from_key=JOURNAL_PREFIX):
            assert isinstance(key, bytes)
            if key >= JOURNAL_END:
                break
            out.append(parse_journal_key(key))
        return out

    def delete(self, inode: int, index: int) -> None:
        old = held_bytes_of(self.get(inode, index))
        self.db.delete(chunk_key(inode, index), self._write_opts)
        with self._lock:
            self._gen += 1
            self._cache.pop((inode, index), None)
            self._held_bytes -= old

    def _cache_insert(self, key: Key, rec: ChunkRecord) -> None:
        """Call with the lock held."""
        if not self._cache_entries:
            self._cache.pop(key, None)
            return
        self._cache[key] = rec
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    def iter_records(
        self, begin: bytes = KEY_PREFIX, end: bytes = KEY_END
    ) -> Iterator[tuple[bytes, ChunkRecord]]:
        """(key, record) in key order over [begin, end), straight from RocksDB."""
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
                if key[:1] != KEY_PREFIX:
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
