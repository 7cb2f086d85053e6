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
* a small overwrite of committed bytes (at most ``journal_write_max_bytes``)
  is journaled and written in place at commit (below);
* any other overwrite reads the committed bytes, patches them in memory and
  writes a new file (read-modify-write, as 3FS does).

Small overwrites in place (a pending-block journal). Copying a 4 MiB chunk for
every 4 KiB write made each replica move 8 MiB per write. Instead:

1. prepare: the CRC blocks the write touches get their new CRCs (the first and
   last are read and verified, as for any partial write); the pending record
   (``pending_journal``) and the written bytes (the journal, under
   :func:`journal_key`) go into RocksDB in one atomic batch. The chunk file is
   not touched: readers of the committed version still find its bytes there.
2. commit: the record becomes the new committed version with
   ``journal_applying`` set (the decision, one metadata write); the journal is
   written into the chunk file at its offset; then one atomic batch clears the
   flag and drops the journal. Readers that meet the flag answer NOT_COMMITTED
   (the bytes under it may be half written), like a pending version; a read
   that a commit overtook notices that the record changed and reads again.
3. abort or a newer update drops the journal with the pending record.

The drop in step 2 is not synced on a durable target: the decided record and
the in-place bytes are durable before it, and if a power loss drops it,
recovery finds the decided record with its journal and writes the same bytes
again. Any later change of the chunk's committed bytes comes after a synced
record write, which makes the drop durable too (RocksDB's WAL is one ordered
log).

A crash before the decision leaves the old bytes untouched in the file and
the pending version complete in RocksDB (kept: the chain re-drives it, or a
new update drops it); a crash after it leaves ``journal_applying``, and
recovery writes the journal again (idempotent) before serving. Either way a
chunk reads back as one version, never a mix, and its per-block CRCs hold.

A new file written from a page-aligned buffer (the data plane's pooled receive
buffers are) goes to disk with O_DIRECT: no copy into the page cache.

Commit is one metadata write (the atomic switch); the file a version no longer
uses is unlinked afterwards.

Committed at once (``commit_at``, a chain's tail: it waits for no successor,
so its prepare and commit are one step): the new bytes are written exactly as
for a pending version (durable first on a durable target), then one record
write makes them the committed version, with the request that made it
(``committed_client``/``committed_request``, so a retry is recognised). A
journaled overwrite writes the decided record (``journal_applying``) and its
journal in one atomic batch, then proceeds as at step 2 of a commit. A crash
before the record write leaves the old version (the new file is an orphan,
bytes past the committed end are trimmed); one after it, the new version.
There is no pending version at the tail for the head to re-drive: the head's
retry finds the version committed there and is acknowledged.

Recovery at open resolves what a crash left: journals of decided versions are
written again, pending versions whose data is complete are kept (the chain
re-drives them), incomplete ones are discarded, files and journals nothing
refers to are deleted, and the invariants of every record are asserted.

The engine's parts: :mod:`chunk_record` (the record and its key),
:mod:`record_store` (RocksDB behind an LRU), :mod:`chunk_files` (content files,
O_DIRECT writes, cached read descriptors) and :mod:`block_crcs` (per-block
CRC32C arithmetic). This module holds the update/commit/read/recovery logic.

Methods are synchronous (run them in an I/O thread); the caller serializes
updates of one chunk (CRAQ's chunk lock). Reads need no lock: a read that races
a commit notices it and retries.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import cached_property, partial
from pathlib import Path

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service import block_crcs, crc, fault_points
from chainfs.storage_service.block_crcs import OldBlock
from chainfs.storage_service.chunk_files import CHUNK_DIR_MODE, ChunkFiles, FdCache
from chainfs.storage_service.chunk_record import (
    KEY_END,
    KEY_PREFIX,
    NO_CLIENT,
    NO_ORIGIN,
    ChunkRecord,
    Origin,
    check_chunk_size,
    chunk_key,
    parse_key,
)
from chainfs.storage_service.config import EngineOptions
from chainfs.storage_service.record_store import RecordStore

# Re-exported: older importers (the scrubber) name these from here.
__all__ = ["ChunkEngine", "ChunkRecord", "EngineOptions", "chunk_key", "parse_key"]

log = logging.getLogger(__name__)

_STAT_CACHE_S = 0.1  # statvfs result reused for this long (seconds)
_READ_RACE_RETRIES = 8  # re-reads of a chunk whose file changed under a read
_NO_BYTES = memoryview(b"")


class ChunkEngine:
    """Chunk data files + chunk metadata in RocksDB for one target directory."""

    def __init__(
        self,
        path: str | Path,
        options: EngineOptions | None = None,
        fd_cache: FdCache | None = None,
    ) -> None:
        """``fd_cache``: the node's descriptors shared by its targets (None: one of
        this engine's own, of ``options.open_files``)."""
        self.path = Path(path)
        self.options = options or EngineOptions()
        self.path.mkdir(mode=CHUNK_DIR_MODE, parents=True, exist_ok=True)
        self.files = ChunkFiles(self.path, self.options, fd_cache)
        self.records = RecordStore(self.path, self.options.durable, self.options.meta_cache_entries)
        self._closed = False
        self._stat_lock = threading.Lock()
        self._stat_at = 0.0
        self._stat = (0, 1)
        self._edges = threading.local()  # per-thread buffers of edge CRC blocks
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
            self.files.close()
            self.records.close()

    # ---- files and records -------------------------------------------------

    file_path_in = staticmethod(ChunkFiles.path_in)

    def file_path(self, inode: int, index: int, gen: int) -> str:
        return self.files.path(inode, index, gen)

    def get(self, inode: int, index: int) -> ChunkRecord | None:
        return self.records.get(inode, index)

    def iter_records(
        self, begin: bytes = KEY_PREFIX, end: bytes = KEY_END
    ) -> Iterator[tuple[bytes, ChunkRecord]]:
        return self.records.iter_records(begin, end)

    def list_chunks(
        self, inode: int, begin_index: int = 0, end_index: int = 1 << 32, limit: int = 0
    ) -> list[tuple[int, ChunkRecord]]:
        """Chunks of ``inode`` with index in [begin_index, end_index), in index order."""
        return self.records.list_chunks(inode, begin_index, end_index, limit)

    def last_chunk(self, inode: int) -> tuple[int, ChunkRecord] | None:
        """The highest-index chunk of ``inode`` that has a committed version."""
        return self.records.last_chunk(inode)

    def _new_file(
        self, inode: int, index: int, gen: int, offset: int, data: memoryview, final: int
    ) -> None:
        """File ``gen`` holding ``data`` at ``offset`` (zeros elsewhere up to ``final``);
        on a durable target its directory entry is made durable too."""
        self.files.write(inode, index, gen, offset, data, 0, final)
        if self.options.durable:
            self.files.fsync_dir_of(inode)

    # ---- space -------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(bytes of chunk data this target holds, capacity of its file system)."""
        return self.records.held_bytes, self.disk_usage()[1]

    @cached_property
    def fs_id(self) -> str:
        """Which file system holds the target: targets with one fs_id share a disk."""
        return f"{socket.gethostname()}:{os.stat(self.path).st_dev}"

    def disk_usage(self) -> tuple[int, int]:
        """(used bytes, capacity bytes) of the target's file system (shared with
        anything else on that disk: what decides when it is full)."""
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
        used, capacity = self.disk_usage()
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
        rec = self._settled(inode, index)
        if rec is None or (rec.committed_version == 0 and not rec.has_pending):
            self._check_space(inode, index)
            rec = ChunkRecord(chunk_size=chunk_size)
        elif rec.chunk_size != chunk_size:
            raise ChainfsError(
                Code.EINVAL,
                f"chunk ({inode}, {index}) has chunk size {rec.chunk_size}, request says "
                f"{chunk_size}",
            )
        if version != rec.committed_version + 1:
            raise ChainfsError(
                Code.EINVAL,
                f"chunk ({inode}, {index}): update version {version} does not follow "
                f"committed {rec.committed_version}",
            )
        if rec.has_pending:
            rec = self._drop_pending(inode, index, rec)
        return rec

    def _settled(self, inode: int, index: int) -> ChunkRecord | None:
        """The chunk's record for an update to start from: a commit whose in-place
        write failed (``journal_applying`` while the target runs on) is finished first."""
        rec = self.get(inode, index)
        if rec is not None and rec.journal_applying:
            rec = self._apply_journal(inode, index, rec)
        return rec

    def _drop_pending(self, inode: int, index: int, rec: ChunkRecord) -> ChunkRecord:
        """Forget the pending version (its file, its journal, or bytes written past the
        committed end)."""
        assert rec.has_pending
        if rec.pending_file_gen and rec.pending_file_gen != rec.file_gen:
            self.files.unlink(inode, index, rec.pending_file_gen)
        elif rec.file_gen and rec.pending_file_gen == rec.file_gen and not rec.pending_journal:
            # In-place append or extension: cut the file back to the committed length.
            self.files.truncate(inode, index, rec.file_gen, rec.length)
        new = replace(
            rec,
            pending_version=0,
            pending_length=0,
            pending_crc32c=0,
            pending_file_gen=0,
            pending_remove=False,
            pending_client=NO_CLIENT,
            pending_request=0,
            pending_block_crcs=b"",
            pending_journal=False,
        )
        if rec.pending_journal:
            # Record and journal go together: never a journaled record without its journal.
            self.records.put_dropping_journal(inode, index, new, rec.pending_version)
        return new

    def _set_pending(
        self,
        inode: int,
        index: int,
        rec: ChunkRecord,
        version: int,
        length: int,
        crc32c: int,
        file_gen: int,
        block_crcs: bytes,
        origin: Origin,
        journal: tuple[int, memoryview] | None = None,
        commit_at: int | None = None,
    ) -> ChunkRecord:
        """Record pending ``version``; with ``journal`` (offset, bytes) a journaled one,
        the record and its journal in one atomic write. ``commit_at`` (a chain
        version): record ``version`` as committed at once instead (see
        :meth:`_commit_now`)."""
        new = replace(
            rec,
            block_size=self._block_size(rec),
            pending_block_crcs=block_crcs,
            pending_version=version,
            pending_length=length,
            pending_crc32c=crc32c,
            pending_file_gen=file_gen,
            pending_remove=False,
            pending_client=origin.client,
            pending_request=origin.request,
            pending_journal=journal is not None,
        )
        if commit_at is not None:
            return self._commit_now(inode, index, rec, new, commit_at, journal)
        if journal is None:
            self.records.put(inode, index, new)
        else:
            self.records.put_with_journal(inode, index, new, *journal)
        return new

    def _commit_now(
        self,
        inode: int,
        index: int,
        base: ChunkRecord,
        pending: ChunkRecord,
        chain_version: int,
        journal: tuple[int, memoryview] | None,
    ) -> ChunkRecord:
        """Record ``pending`` (never stored) as the committed version: one record write
        instead of a pending one and then a commit (a chain's tail, which waits for
        no successor). The new bytes are already where :meth:`commit` expects them
        (durable first on a durable target), so a crash before the record write
        leaves ``base`` with a file or bytes past its end that recovery deletes or
        trims, and one after it the new version: never a mix. A journaled
        overwrite stores the decided record (``journal_applying``) with its journal
        in one atomic batch, then writes the journal in place like a commit."""
        new = self._committed(pending, chain_version)
        if journal is not None:
            new = replace(new, journal_applying=True)
            self.records.put_with_journal(inode, index, new, *journal)
        else:
            self.records.put(inode, index, new)
        return self._finish_decided(inode, index, base, new)

    def _finish_decided(
        self, inode: int, index: int, old: ChunkRecord, new: ChunkRecord
    ) -> ChunkRecord:
        """Bring the chunk file in line with ``new``, whose record is written (the
        version is decided): its journal written in place, or the bytes only
        ``old`` used dropped. An error now (ENOSPC writing into a hole) is
        INTERNAL, never an error that reads as "nothing applied": the chain
        would abort a version committed here. An update finds the record still
        applying and finishes it first (_settled); so does recovery."""
        try:
            if new.journal_applying:
                return self._apply_journal(inode, index, new)
            self._drop_old_bytes(inode, index, old, new)
            return new
        except OSError as e:
            raise ChainfsError(
                Code.INTERNAL,
                f"chunk ({inode}, {index}) v{new.committed_version} is committed on "
                f"{self.path}, finishing it failed: {e}",
            ) from e

    @staticmethod
    def _committed(rec: ChunkRecord, chain_version: int) -> ChunkRecord:
        """The committed record that ``rec``'s pending version becomes."""
        return ChunkRecord(
            committed_version=rec.pending_version,
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

    def _drop_old_bytes(self, inode: int, index: int, old: ChunkRecord, new: ChunkRecord) -> None:
        """After ``new`` is committed: the file or the bytes only ``old`` used."""
        if old.file_gen and old.file_gen != new.file_gen:
            self.files.unlink(inode, index, old.file_gen)
        elif new.file_gen and new.length < old.length:
            self.files.truncate(inode, index, new.file_gen, new.length)

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
            got = self.files.read(inode, index, rec.file_gen, 0, buf)
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

    def _old_blocks(
        self, inode: int, index: int, rec: ChunkRecord, src: memoryview | None = None
    ) -> OldBlock:
        """Reader of ``rec``'s committed blocks for :mod:`block_crcs` (from ``src``, the
        committed bytes already in memory, or else the file)."""
        return partial(self._old_block, inode, index, rec, src)

    def _old_block(
        self, inode: int, index: int, rec: ChunkRecord, src: memoryview | None, block: int
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
            if self.files.read(inode, index, rec.file_gen, start, view) != n:
                raise self._damaged(inode, index, rec, f"file shorter than its length {rec.length}")
        if crc.value(view) != crc.block_crc(rec.block_crcs, block):
            raise self._damaged(inode, index, rec, f"block {block} does not match its CRC32C")
        return view

    def prepare_write(
        self,
        inode: int,
        index: int,
        offset: int,
        data: memoryview,
        data_crc: int,
        chunk_size: int,
        version: int,
        origin: Origin = NO_ORIGIN,
        commit_at: int | None = None,
    ) -> ChunkRecord:
        """Apply a write of ``data`` at ``offset`` as pending ``version`` (= committed + 1).
        ``commit_at`` (a chain version): as committed ``version`` at once, one record
        write instead of this and :meth:`commit` (a tail: nobody to wait for)."""
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
            self._new_file(inode, index, gen, 0, data, length)
            new_len, new_crc = length, data_crc
            blocks = crc.block_crcs(data, self._block_size(rec))
        elif offset >= committed_len and rec.file_gen:
            # Append (maybe past a hole): in place, beyond what readers look at.
            rec = self._with_block_crcs(inode, index, rec)
            blocks = block_crcs.after_write(rec, offset, data, self._old_blocks(inode, index, rec))
            gen = rec.file_gen
            self.files.write(inode, index, gen, offset, data, committed_len, end)
            new_len = end
            new_crc = crc.combine(
                crc.extend_zeros(rec.crc32c, offset - committed_len), data_crc, length
            )
        elif offset >= committed_len:
            # No file yet (new or empty chunk) and a write not at 0: hole + data, new file.
            rec = replace(rec, block_size=self._block_size(rec))
            blocks = block_crcs.after_write(rec, offset, data, self._old_blocks(inode, index, rec))
            gen = version
            self._new_file(inode, index, gen, offset, data, end)
            new_len = end
            new_crc = crc.combine(crc.zeros(offset), data_crc, length)
        elif length <= self.options.journal_write_max_bytes:
            return self._prepare_journaled(
                inode, index, rec, offset, data, version, origin, commit_at
            )
        else:
            # A large overwrite inside the committed bytes: read-modify-write into a new file.
            new_len = max(committed_len, end)
            buf = bytearray(new_len)
            view = memoryview(buf)
            got = self.files.read(inode, index, rec.file_gen, 0, view[:committed_len])
            if got != committed_len:
                raise ChainfsError(
                    Code.EIO, f"chunk ({inode}, {index}) file shorter than its length"
                )
            # The blocks around the write are checked against their CRCs before
            # their bytes go into the new version (never bless damaged bytes).
            rec = self._with_block_crcs(inode, index, rec, view[:committed_len])
            old_blocks = self._old_blocks(inode, index, rec, view[:committed_len])
            blocks = block_crcs.after_write(rec, offset, data, old_blocks)
            view[offset:end] = data
            new_crc = crc.combine_blocks(blocks, rec.block_size, new_len)
            gen = version
            self._new_file(inode, index, gen, 0, view, new_len)
        return self._set_pending(
            inode, index, rec, version, new_len, new_crc, gen, blocks, origin, None, commit_at
        )

    def _prepare_journaled(
        self,
        inode: int,
        index: int,
        rec: ChunkRecord,
        offset: int,
        data: memoryview,
        version: int,
        origin: Origin,
        commit_at: int | None = None,
    ) -> ChunkRecord:
        """A small overwrite of committed bytes as a journaled pending version: the bytes
        go into the metadata store with the record (one atomic write); the chunk file,
        which readers of the committed version use, stays untouched until commit."""
        rec = self._with_block_crcs(inode, index, rec)
        # The edge blocks are read and checked first (never bless damaged bytes).
        blocks = block_crcs.after_write(rec, offset, data, self._old_blocks(inode, index, rec))
        new_len = max(rec.length, offset + len(data))
        new_crc = crc.combine_blocks(blocks, rec.block_size, new_len)
        new = self._set_pending(
            inode,
            index,
            rec,
            version,
            new_len,
            new_crc,
            rec.file_gen,
            blocks,
            origin,
            (offset, data),
            commit_at,
        )
        if commit_at is None:
            fault_points.stall("journal-prepared", f"{self.path} {inode} {index} v{version}")
        return new

    def _apply_journal(self, inode: int, index: int, rec: ChunkRecord) -> ChunkRecord:
        """Write the journal of ``rec`` (committed, ``journal_applying``) into the chunk
        file, then clear the flag and drop the journal in one atomic write. Idempotent:
        recovery runs it again for a record a crash left applying."""
        assert rec.journal_applying, rec
        journal = self.records.get_journal(inode, index, rec.committed_version)
        if journal is None:
            raise AssertionError(f"chunk ({inode}, {index}) v{rec.committed_version}: no journal")
        offset, data = journal
        view = memoryview(data)
        if fault_points.armed("journal-torn"):
            half = len(view) // 2  # a torn in-place write: half the new bytes, then the crash
            self.files.write_in_place(inode, index, rec.file_gen, offset, view[:half])
            fault_points.stall(
                "journal-torn", f"{self.path} {inode} {index} v{rec.committed_version}"
            )
        self.files.write_in_place(inode, index, rec.file_gen, offset, view)
        done = replace(rec, journal_applying=False)
        # Not synced: the decided record (``journal_applying``, synced) and the
        # in-place bytes (fdatasync on a durable target) are durable already. If a
        # power loss drops this write, the store is back at that decided record
        # with its journal, and recovery writes the same bytes again before
        # serving. Nothing later can depend on the drop being durable: every
        # later change of this chunk's committed bytes comes after a synced
        # record write, which makes this one durable too (one ordered WAL).
        self.records.put_dropping_journal(inode, index, done, rec.committed_version, sync=False)
        return done

    def prepare_truncate(
        self,
        inode: int,
        index: int,
        length: int,
        chunk_size: int,
        version: int,
        origin: Origin = NO_ORIGIN,
        commit_at: int | None = None,
    ) -> ChunkRecord:
        """Make the chunk ``length`` bytes long (cut or zero-extended) as pending ``version``
        (committed at once with ``commit_at``, as in :meth:`prepare_write`)."""
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
            blocks = block_crcs.after_truncate(rec, length, self._old_blocks(inode, index, rec))
            # Zeros past the committed end (cut first: an abandoned update may have
            # left bytes there); on disk before the record on a durable target.
            if gen:
                self.files.write(inode, index, gen, committed_len, _NO_BYTES, committed_len, length)
            else:
                gen = version
                self._new_file(inode, index, gen, 0, _NO_BYTES, length)
            new_crc = crc.extend_zeros(rec.crc32c, length - committed_len)
        else:
            # Shrink: the file keeps its bytes until commit (readers may still use them).
            blocks = block_crcs.after_truncate(rec, length, self._old_blocks(inode, index, rec))
            new_crc = crc.combine_blocks(blocks, rec.block_size, length)
        return self._set_pending(
            inode, index, rec, version, length, new_crc, gen, blocks, origin, None, commit_at
        )

    def prepare_replace(
        self,
        inode: int,
        index: int,
        data: memoryview,
        data_crc: int,
        chunk_size: int,
        version: int,
        origin: Origin = NO_ORIGIN,
        commit_at: int | None = None,
    ) -> ChunkRecord:
        """Full-chunk replace at ``version`` whatever the local versions (sync, gap repair);
        committed at once with ``commit_at``, as in :meth:`prepare_write`."""
        check_chunk_size(chunk_size)
        if len(data) > chunk_size:
            raise ChainfsError(Code.EINVAL, f"{len(data)} bytes exceed chunk size {chunk_size}")
        rec = self._settled(inode, index)
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
        self._new_file(inode, index, version, 0, data, len(data))
        rec = replace(rec, chunk_size=chunk_size)
        blocks = crc.block_crcs(data, self._block_size(rec))
        return self._set_pending(
            inode,
            index,
            rec,
            version,
            len(data),
            data_crc,
            version,
            blocks,
            origin,
            None,
            commit_at,
        )

    def prepare_remove(
        self, inode: int, index: int, origin: Origin = NO_ORIGIN
    ) -> ChunkRecord | None:
        """Mark the chunk as being removed (reads answer NOT_COMMITTED); None if absent."""
        rec = self._settled(inode, index)
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
            pending_client=origin.client,
            pending_request=origin.request,
            pending_block_crcs=b"",
        )
        self.records.put(inode, index, new)
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
            self.records.delete(inode, index)
            self.files.unlink(inode, index, rec.file_gen)
            return None
        new = self._committed(rec, chain_version)
        if rec.pending_journal:
            # The switch: from here the new version is decided (recovery finishes it).
            new = replace(new, journal_applying=True)
        self.records.put(inode, index, new)
        return self._finish_decided(inode, index, rec, new)

    def abort(self, inode: int, index: int) -> ChunkRecord | None:
        """Discard the pending version (the committed one stays)."""
        rec = self.get(inode, index)
        if rec is None or not rec.has_pending:
            return rec
        new = self._drop_pending(inode, index, rec)
        if new.committed_version == 0:
            self.records.delete(inode, index)
            return None
        self.records.put(inode, index, new)
        return new

    # ---- reads -------------------------------------------------------------

    read_span = staticmethod(block_crcs.read_span)
    read_plan = staticmethod(block_crcs.read_plan)

    def _edge_buffers(self, head: int, tail: int) -> tuple[memoryview, memoryview]:
        """Per-thread buffers for the bytes of the edge CRC blocks outside a read."""
        if not head and not tail:  # a read of whole blocks (every small KV value)
            return _NO_BYTES, _NO_BYTES
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

        ``scratch``: a buffer to read into (``read_plan``'s buffer bytes) instead
        of a new one; the result may be a slice of it. A scratch too small for
        the record found (it changed since the caller sized it) is NOT_COMMITTED.
        With ``verify`` the CRC
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
            if rec.journal_applying:
                raise ChainfsError(
                    Code.NOT_COMMITTED,
                    f"chunk ({inode}, {index}) v{rec.committed_version} is being written",
                )
            start = min(offset, rec.length)
            end = min(offset + length, rec.length)
            if end == start:
                return rec, memoryview(b"")
            lo, hi, _ = block_crcs.read_plan(rec, offset, length, verify)
            # [bstart, bend) goes into ``out``; the rest of [lo, hi) into edge buffers.
            bstart, bend = (start, end) if rec.has_block_crcs else (lo, hi)
            n = bend - bstart
            if scratch is None:
                out = memoryview(bytearray(n))
            elif len(scratch) >= n:
                out = scratch[:n]
            else:  # the caller sized its buffer from an older record: never allocate past it
                raise ChainfsError(
                    Code.NOT_COMMITTED, f"chunk ({inode}, {index}) changed while the read was sized"
                )
            head, tail = self._edge_buffers(bstart - lo, hi - bend)
            try:
                whole = not head and not tail
                bufs = [out] if whole else [head, out, tail]
                got = self.files.readv(inode, index, rec.file_gen, lo, bufs, nowait)
                if got == hi - lo:
                    bad = None
                    if verify:
                        if whole:
                            segments = [(bstart, out)]
                        else:
                            parts = [(lo, head), (bstart, out), (bend, tail)]
                            segments = [(at, v) for at, v in parts if len(v)]
                        bad = block_crcs.bad_block(rec, segments)
                    if bad is None and self._record_unchanged(inode, index, rec):
                        # Unchanged after the read: no in-place commit wrote under it.
                        return rec, out[start - bstart : end - bstart]
                    if bad is None:
                        continue
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
        if rec.pending_journal:
            # The committed bytes with the journaled write over them.
            got = self.files.read(inode, index, rec.file_gen, 0, buf[: rec.length])
            journal = self.records.get_journal(inode, index, rec.pending_version)
            if got == rec.length and journal is not None:
                offset, data = journal
                buf[offset : offset + len(data)] = data
                got = rec.pending_length
        else:
            got = self.files.read(inode, index, rec.pending_file_gen, 0, buf) if len(buf) else 0
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
        stats = {
            "chunks": 0,
            "pending_kept": 0,
            "pending_dropped": 0,
            "orphans": 0,
            "trimmed": 0,
            "journals_applied": 0,
        }
        referenced: set[str] = set()
        journals: set[tuple[int, int, int]] = set()
        for key, rec in list(self.iter_records()):
            inode, index = parse_key(key)
            stats["chunks"] += 1
            rec.check()
            if rec.journal_applying:
                # Decided before the crash; its in-place write may be torn: write it again.
                rec = self._apply_journal(inode, index, rec)
                stats["journals_applied"] += 1
            if rec.has_pending and not rec.pending_remove:
                ok = self._pending_complete(inode, index, rec)
                if ok:
                    stats["pending_kept"] += 1
                else:
                    stats["pending_dropped"] += 1
                    new = self._drop_pending(inode, index, rec)
                    if new.committed_version == 0:
                        self.records.delete(inode, index)
                        continue
                    self.records.put(inode, index, new)
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
            if rec.pending_journal:
                journals.add((inode, index, rec.pending_version))
        for f in self.files.all_files():
            if str(f) not in referenced:
                f.unlink()
                stats["orphans"] += 1
        for inode, index, version in self.records.journal_keys():
            if (inode, index, version) not in journals:
                self.records.delete_journal(inode, index, version)
                stats["orphans"] += 1
        self.recovered = stats
        if any(stats[k] for k in stats if k != "chunks"):
            log.info("target %s recovered: %s", self.path, stats)

    def _pending_complete(self, inode: int, index: int, rec: ChunkRecord) -> bool:
        if rec.pending_journal:  # written with its record in one atomic batch
            return self.records.get_journal(inode, index, rec.pending_version) is not None
        got = self.files.crc_of(inode, index, rec.pending_file_gen, rec.pending_length)
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
