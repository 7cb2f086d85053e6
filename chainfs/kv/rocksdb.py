"""Embedded transactional store on RocksDB (``rocksdb:///abs/dir``), via rocksdict.

- Reads: a RocksDB iterator (a point-in-time view), tagged with the in-process
  commit version it shows.
- Commit: validate the read set against an in-process log of recent commits
  (point reads through a key -> last-write-version map, ranges and clears by
  scanning the entries after the snapshot). Validation happens on the event
  loop without awaiting, so the order of validation is the serial order.
- Group commit: validated transactions queue; one writer task writes all
  queued transactions as ONE WriteBatch with a synced WAL (in a thread of its
  own, which rocksdict runs without the GIL, so the loop keeps running and
  more transactions validate meanwhile), then answers every caller of that
  batch. A disk that does ~3,700 fdatasyncs per second then carries many more
  transactions per second.
- One process owns a directory (RocksDB's LOCK file); a second opener gets
  ``STORE_LOCKED``.

Options ride in the URL query: ``rocksdb:///data/kv?max_batch_txns=512``.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import queue
import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse

import rocksdict

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import base
from chainfs.kv._url import options_from_query
from chainfs.kv.base import KVStore, RetryPolicy, Snapshot, Transaction


@dataclass
class RocksDBOptions:
    # Transactions written by one synced WriteBatch at most: bounds batch memory.
    max_batch_txns: int = 1024
    # Validated, not yet written transactions; more committers wait (backpressure).
    max_pending_txns: int = 8192
    # Recent commits kept to validate read sets; a snapshot older than these
    # gets TXN_TOO_OLD (retried). 100k commits ~ tens of MB of keys at most.
    conflict_log_entries: int = 100_000
    # RocksDB memtable size in bytes before a flush to an SST file.
    write_buffer_size_bytes: int = 64 * 1024 * 1024
    # Write-ahead log files kept for reuse once their memtable is flushed. A
    # synced commit that overwrites a reused file does not change the file's
    # size, so its fdatasync needs no journal commit of the inode (about 1.5x
    # faster on ext4 here); 0 = always fresh files.
    recycle_wal_files: int = 4

    def validate(self) -> None:
        if self.max_batch_txns < 1:
            raise ValueError("max_batch_txns must be >= 1")
        if self.max_pending_txns < self.max_batch_txns:
            raise ValueError("max_pending_txns must be >= max_batch_txns")
        if self.conflict_log_entries < 1:
            raise ValueError("conflict_log_entries must be >= 1")
        if self.write_buffer_size_bytes < 1024 * 1024:
            raise ValueError("write_buffer_size_bytes must be >= 1 MiB")
        if not 0 <= self.recycle_wal_files <= 64:
            raise ValueError("recycle_wal_files must be in 0..64")


@dataclass
class _LogEntry:
    version: int
    keys: frozenset[bytes]  # keys set or cleared one by one
    cleared: list[tuple[bytes, bytes]]  # clear_range spans


@dataclass
class _Pending:
    version: int
    writes: dict[bytes, bytes | None]
    cleared: list[tuple[bytes, bytes]]
    done: asyncio.Future[None] = field(repr=False)
    durable: bool = True


class _RocksSnapshot(Snapshot):
    """One transaction's point-in-time view.

    Point reads go to a RocksDB snapshot: a real point lookup (memtable, bloom
    filters), whose cost does not grow with the deleted keys around it, as a
    seek's does. Range reads use a fresh iterator bounded to the range, so a
    seek stops at the range's end instead of stepping over every tombstone
    beyond it. A fresh iterator shows the store as it is now; that equals the
    snapshot for the range when no commit since the snapshot touched the
    range (the store's conflict log says so). Otherwise the read falls back to
    an unbounded iterator taken together with the snapshot. (rocksdict 0.3.29
    cannot bind an iterator to a snapshot: ``Snapshot.iter()`` reads live data.)
    """

    def __init__(self, store: RocksDBStore, db: rocksdict.Rdict, version: int) -> None:
        self._store = store
        self._db = db
        self.version = version
        self._snap: rocksdict.Snapshot | None
        self._base: rocksdict.RdictIter | None
        self._snap, self._base = _consistent_views(db)

    def _check_open(self) -> rocksdict.RdictIter:
        if self._base is None:
            raise ChainfsError(Code.EBADF, "read from a finished rocksdb transaction")
        return self._base

    async def get(self, key: bytes) -> bytes | None:
        base = self._check_open()
        if self._snap is None:  # no snapshot matching the iterator: seek
            base.seek(key)
            return bytes(base.value()) if base.valid() and base.key() == key else None
        try:
            return bytes(self._snap[key])
        except Exception as e:  # rocksdict raises a bare Exception for a missing key
            if str(e) == "key not found":
                return None
            raise

    async def get_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[tuple[bytes, bytes]]:
        # No await inside: concurrent reads of one transaction cannot interleave here.
        base = self._check_open()
        if self._store.untouched_since(self.version, begin, end):
            ro = rocksdict.ReadOptions()
            ro.set_iterate_lower_bound(begin)
            ro.set_iterate_upper_bound(end)
            return _scan(self._db.iter(ro), begin, end, limit, reverse)
        return _scan(base, begin, end, limit, reverse)

    def close(self) -> None:
        # Dropping the views releases their pinned memtables and files.
        self._snap = None
        self._base = None


def _consistent_views(db: rocksdict.Rdict) -> tuple[rocksdict.Snapshot | None, rocksdict.RdictIter]:
    """A snapshot and an iterator showing the same state, taken with no write
    landing between them (this process is the store's only writer and writes
    land in a worker thread, so a retry is rare). If writes keep landing, the
    iterator alone serves every read (point reads then seek)."""
    for _ in range(_VIEW_ATTEMPTS):
        seq = db.latest_sequence_number()
        snap = db.snapshot()
        it = db.iter()
        if db.latest_sequence_number() == seq:
            return snap, it
    return None, db.iter()


_VIEW_ATTEMPTS = 8


def _scan(
    it: rocksdict.RdictIter, begin: bytes, end: bytes, limit: int, reverse: bool
) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if reverse:
        it.seek_for_prev(end)
        if it.valid() and it.key() >= end:
            it.prev()
        while it.valid():
            k = it.key()
            if k < begin:
                break
            out.append((k, it.value()))
            if limit and len(out) >= limit:
                break
            it.prev()
    else:
        it.seek(begin)
        while it.valid():
            k = it.key()
            if k >= end:
                break
            out.append((k, it.value()))
            if limit and len(out) >= limit:
                break
            it.next()
    return out


class RocksDBStore(KVStore):
    """A RocksDB directory owned by this process."""

    def __init__(
        self, path: str, retry: RetryPolicy | None = None, options: RocksDBOptions | None = None
    ) -> None:
        super().__init__(retry)
        if not os.path.isabs(path):
            raise ChainfsError(Code.EINVAL, f"rocksdb store path must be absolute: {path!r}")
        self.path = path
        self.url = f"rocksdb://{path}"
        self.options = options or RocksDBOptions()
        self.options.validate()
        os.makedirs(path, exist_ok=True)
        self._db: rocksdict.Rdict | None = _open_db(path, self.options)
        self._wopts = rocksdict.WriteOptions()
        self._wopts.sync = True  # durable before the caller hears "committed"
        self._wopts_nosync = rocksdict.WriteOptions()  # a batch of non-durable commits only
        self._applied = 0  # every commit <= this is in RocksDB (and on disk)
        self._validated = 0  # last version handed out by validation
        self._log: list[_LogEntry] = []  # versions _log[0].version .. _validated
        self._last_write: dict[bytes, int] = {}  # key -> version that last wrote it
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # set when _pending has room again
        self._room.set()
        self._failed: ChainfsError | None = None
        self._sync_thread: _SyncThread | None = None  # started by the first commit
        self.stats.update({"batches": 0, "batched_txns": 0, "unsynced_batches": 0})

    @classmethod
    def from_url(cls, url: str, retry: RetryPolicy | None = None) -> RocksDBStore:
        u = urlparse(url)
        if u.scheme != "rocksdb" or u.netloc or not u.path.startswith("/"):
            raise ChainfsError(Code.EINVAL, f"bad rocksdb URL {url!r}: use rocksdb:///absolute/dir")
        return cls(u.path, retry, options_from_query(RocksDBOptions, u.query, url))

    # -- primitives ----------------------------------------------------------
    def _check_usable(self) -> rocksdict.Rdict:
        if self._failed is not None:
            raise self._failed
        if self._db is None:
            raise ChainfsError(Code.EBADF, f"rocksdb store {self.path} is closed")
        return self._db

    async def _begin(self) -> Snapshot:
        db = self._check_usable()
        # A view taken after a batch landed but before _applied moved claims
        # an older version: that only adds conflicts, never hides one.
        return _RocksSnapshot(self, db, self._applied)

    def untouched_since(self, version: int, begin: bytes, end: bytes) -> bool:
        """True when no commit after ``version`` (validated, written or not)
        set or cleared a key in [begin, end)."""
        if version == self._validated:
            return True
        oldest = self._log[0].version if self._log else self._validated + 1
        if version + 1 < oldest:
            return False  # older than the log: unknown, so assume touched
        for entry in self._log[version + 1 - oldest :]:
            for k in entry.keys:  # a plain loop: no generator per entry
                if begin <= k < end:
                    return False
            for cb, ce in entry.cleared:
                if cb < end and begin < ce:
                    return False
        return True

    async def _commit(self, snapshot: Snapshot, tx: Transaction) -> None:
        assert isinstance(snapshot, _RocksSnapshot)
        while len(self._pending) >= self.options.max_pending_txns:
            self._room.clear()
            await self._room.wait()
        self._check_usable()
        # No await from here to the append: validation order == serial order.
        self._validate(snapshot.version, tx)
        self._validated += 1
        version = self._validated
        keys = frozenset(tx.writes)
        self._log.append(_LogEntry(version, keys, list(tx.cleared_ranges)))
        for k in keys:
            self._last_write[k] = version
        self._trim_log()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Pending(version, dict(tx.writes), list(tx.cleared_ranges), done, tx.durable)
        )
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        # The write goes ahead even if this caller is cancelled (its future is then
        # cancelled and the writer skips answering it): no shield, which would cost
        # a second future and one more loop iteration per commit.
        await done

    def _validate(self, read_version: int, tx: Transaction) -> None:
        if read_version == self._validated:
            return  # nothing committed since the snapshot
        assert read_version < self._validated
        oldest = self._log[0].version if self._log else self._validated + 1
        if read_version + 1 < oldest:
            raise base.TxnTooOld(
                f"snapshot at commit {read_version} is older than the conflict log "
                f"(from {oldest}); retrying"
            )
        reads = tx.reads
        for k in reads.keys:
            if self._last_write.get(k, 0) > read_version:
                raise base.TxnConflict(f"key {k!r} changed since the snapshot")
        # Disjoint sorted ranges: a key is in one iff it is below the end of
        # the last range starting at or before it (one bisect per key).
        ranges = base.merge_ranges(sorted(reads.ranges))
        starts = [b for b, _ in ranges]
        ends = [e for _, e in ranges]
        for entry in self._log[read_version + 1 - oldest :]:
            if ranges:
                for k in entry.keys:
                    i = bisect.bisect_right(starts, k)
                    if i and k < ends[i - 1]:
                        raise base.TxnConflict(
                            f"key {k!r} in a range read changed since the snapshot"
                        )
            for cb, ce in entry.cleared:
                if any(cb <= k < ce for k in reads.keys):
                    raise base.TxnConflict("a key read was cleared since the snapshot")
                if any(b < ce and cb < e for b, e in ranges):
                    raise base.TxnConflict("a range read was cleared since the snapshot")

    def _trim_log(self) -> None:
        bound = self.options.conflict_log_entries
        if len(self._log) <= 2 * bound:
            return
        drop = self._log[: len(self._log) - bound]
        for entry in drop:
            for k in entry.keys:
                if self._last_write.get(k) == entry.version:
                    del self._last_write[k]
        del self._log[: len(drop)]

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending and self._failed is None:
                batch = self._pending[: self.options.max_batch_txns]
                del self._pending[: len(batch)]
                self._room.set()
                wb = rocksdict.WriteBatch(raw_mode=True)
                for p in batch:
                    for b, e in p.cleared:
                        wb.delete_range(b, e)
                    for k, v in p.writes.items():
                        if v is None:
                            wb.delete(k)
                        else:
                            wb.put(k, v)
                db = self._db
                assert db is not None
                if self._sync_thread is None:
                    self._sync_thread = _SyncThread(db)
                try:
                    sync = any(p.durable for p in batch)
                    wopts = self._wopts if sync else self._wopts_nosync
                    await self._sync_thread.write(loop, wb, wopts)
                except Exception as e:
                    # RocksDB is in an unknown state: stop accepting commits.
                    self._failed = ChainfsError(
                        Code.EIO, f"rocksdb store {self.path}: write failed: {e}"
                    )
                    for p in batch + self._pending:
                        if not p.done.done():
                            p.done.set_exception(self._failed)
                    self._pending.clear()
                    self._room.set()
                    return
                self._applied = batch[-1].version
                self.stats["batches"] += 1
                self.stats["batched_txns"] += len(batch)
                if not sync:
                    self.stats["unsynced_batches"] += 1
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)
        finally:
            self._writer = None

    async def close(self) -> None:
        """Wait for queued commits, then release the directory (and its lock)."""
        if self._db is None:
            return
        while self._writer is not None:
            await asyncio.shield(self._writer)
        if self._sync_thread is not None:
            self._sync_thread.stop()
            self._sync_thread = None
        db, self._db = self._db, None
        db.close()


class _SyncThread:
    """The thread that writes batches for the writer task, one at a time.

    Cheaper per batch than ``run_in_executor``, which builds a
    concurrent.futures.Future (with its Condition), a work item and a chained
    asyncio future per call: here one asyncio future, one queue put and one
    ``call_soon_threadsafe``."""

    def __init__(self, db: rocksdict.Rdict) -> None:
        self._db = db
        # Unbounded in type, one batch in practice: the writer task awaits each
        # write (a second only if a cancelled writer's batch is still in flight).
        self._queue: queue.SimpleQueue[_WriteJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-rocksdb-sync", daemon=True)
        self._thread.start()

    def write(
        self,
        loop: asyncio.AbstractEventLoop,
        wb: rocksdict.WriteBatch,
        wopts: rocksdict.WriteOptions,
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((loop, done, wb, wopts))
        return done

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            loop, done, wb, wopts = job
            error: BaseException | None = None
            try:
                self._db.write(wb, wopts)
            except BaseException as e:
                error = e
            try:
                loop.call_soon_threadsafe(_settle, done, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


_WriteJob = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[None]", rocksdict.WriteBatch, rocksdict.WriteOptions
]


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # the writer task was cancelled
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _open_db(path: str, options: RocksDBOptions) -> rocksdict.Rdict:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(options.write_buffer_size_bytes)
    opts.set_recycle_log_file_num(options.recycle_wal_files)
    try:
        return rocksdict.Rdict(path, opts)
    except Exception as e:
        msg = str(e)
        if "lock" in msg.lower():
            who = "this process" if "current process" in msg else "another process"
            raise ChainfsError(
                Code.STORE_LOCKED,
                f"rocksdb store {path} is in use by {who} (its LOCK file is held)",
                path=path,
            ) from None
        raise ChainfsError(Code.EIO, f"cannot open rocksdb store {path}: {msg}", path=path) from e
