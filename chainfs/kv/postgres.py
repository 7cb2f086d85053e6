"""Transactional store on PostgreSQL (``postgresql://user@host:port/db``), via asyncpg.

- One table per store, ``<schema>.kv (key bytea primary key, value bytea,
  ver xid8)``; ``ver`` is the id of the PostgreSQL transaction that last wrote
  the row.
- Snapshot = one REPEATABLE READ, READ ONLY PostgreSQL transaction on a pooled
  connection: every read of a chainfs transaction sees the same state, taken
  at begin. An idle connection waits inside such a transaction already begun
  (its BEGIN rode with the previous ROLLBACK), so begin is one statement that
  fixes the snapshot, learns its id (for the commit) and reads the keys
  ``transact(prefetch=...)`` names: one round trip for all.
- Commit = ONE statement, ``txn_commit(...)``, in its own READ COMMITTED
  PostgreSQL transaction. It travels on the snapshot's own connection, in
  one simple-protocol message with the snapshot's ROLLBACK before it and
  the next snapshot's BEGIN after it (arguments as literals; a failed
  validation raises 40001): one round trip ends a chainfs transaction.
  It first takes transaction-scoped advisory locks: shared on the hash of
  every key read, exclusive on every key written, and on one store-wide lock,
  exclusive when the transaction read a range or cleared one (or locks too
  many keys), else shared; in one global order, so
  commits do not deadlock. Holding them, it validates the read set against
  the snapshot with a fresh view (no row under a read key or in a read range
  was written by a transaction the snapshot does not see, and every key seen
  present still exists), then applies the writes; the locks go at commit. Two
  commits where one read what the other writes thus never overlap, and the
  later one validates against the earlier one's writes: commit order is the
  serial order (FoundationDB's rule, which the shared suite checks). A failed
  validation, and SQLSTATE 40001/40P01, are conflicts that transact() retries.
  (SERIALIZABLE would be simpler but fails blind writes of one key, such as
  a directory's mtime, that FoundationDB's model lets commit side by side,
  and its page-grained predicate locks fail many unrelated commits.)
- Group commit: a commit that arrives while another is in flight waits in a
  bounded queue; the queued ones go together as ``txn_commit_batch(...)``, one
  PostgreSQL transaction (one round trip, one WAL flush) on a connection of
  their own (their snapshots' connections are rolled back apart). It takes
  the union of their locks in the same global order, then validates and
  applies each in turn: a failed validation writes nothing and fails that
  one alone; a later one validates against the earlier ones' writes, so the
  batch's order is their serial order. Each has its own commit slot and
  token. A batch that fails as a whole (an error) goes again one by one.
- Exactly once across a lost reply: each pooled connection owns a row (one
  more per position of a batch it sends) in
  ``<schema>.commit_slots``, and every commit writes a fresh token there in
  the same PostgreSQL transaction. When the reply of a commit is lost (the
  connection broke, the server restarted, a timeout), a new connection
  terminates the old backend if it still runs, waits until it is gone, and
  reads the slot: our token means the commit landed; any other value means
  it never will, and the commit is sent again. After a lost batch, each of
  its transactions is resolved by its own slot; those that never landed go
  again one by one.
- Connections: a bounded pool (``pool_size``); connecting is retried until
  ``op_timeout_ms`` and then fails with UNAVAILABLE.

Options ride in the URL query:
``postgresql://chainfs@127.0.0.1:5432/chainfs?schema=meta&pool_size=16``.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import asyncpg

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv._url import options_from_query
from chainfs.kv.base import (
    KVStore,
    PrefetchRange,
    RetryPolicy,
    Snapshot,
    Transaction,
    TxnConflict,
    TxnTooOld,
    merge_ranges,
)

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# SQLSTATEs of a commit that lost to a concurrent one.
_CONFLICT_STATES = {"40001", "40P01"}


@dataclass
class PostgresOptions:
    # Schema holding this store's tables (several stores may share a database).
    schema: str = "chainfs"
    # Connections this process holds at most; more transactions wait for one.
    pool_size: int = 16
    # One statement on one connection; a commit past it has an unknown outcome.
    request_timeout_ms: int = 10_000
    # Getting a connection, or learning a commit's outcome, including server
    # restarts; then UNAVAILABLE.
    op_timeout_ms: int = 30_000
    # Pause between connection attempts (doubles up to retry_max_ms).
    retry_initial_ms: int = 10
    retry_max_ms: int = 500
    # Keys a commit locks one by one at most; a larger commit takes the
    # store-wide lock exclusively (PostgreSQL's lock table is finite:
    # max_locks_per_transaction x max_connections entries).
    max_key_locks: int = 256
    # Group commit: commits that arrive while another is in flight wait in a
    # queue (at most group_commit_queue_max; past it a commit goes alone) and
    # go together, up to group_commit_max_txns per PostgreSQL transaction
    # (one round trip, one WAL flush). 1 sends every commit alone.
    group_commit_max_txns: int = 32
    group_commit_queue_max: int = 1024
    # A unix socket directory; overrides the URL's host (libpq's ?host=/dir).
    host: str = ""
    password: str = ""

    def validate(self) -> None:
        if not _SCHEMA_NAME.fullmatch(self.schema):
            raise ValueError("schema must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)")
        if self.pool_size < 1 or self.max_key_locks < 1:
            raise ValueError("pool_size and max_key_locks must be >= 1")
        if self.group_commit_max_txns < 1 or self.group_commit_queue_max < 1:
            raise ValueError("group_commit_max_txns and group_commit_queue_max must be >= 1")
        if not 0 < self.request_timeout_ms <= self.op_timeout_ms:
            raise ValueError("need 0 < request_timeout_ms <= op_timeout_ms")
        if not 0 < self.retry_initial_ms <= self.retry_max_ms:
            raise ValueError("need 0 < retry_initial_ms <= retry_max_ms")


_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.kv (
    key bytea PRIMARY KEY, value bytea NOT NULL, ver xid8 NOT NULL);
CREATE TABLE IF NOT EXISTS {schema}.commit_slots (slot text PRIMARY KEY, token text NOT NULL);
-- Locks in one order: the store-wide lock, then key locks sorted by id.
CREATE OR REPLACE FUNCTION {schema}.txn_lock(
    store_lock bigint, store_lock_exclusive boolean, lock_ids bigint[], lock_exclusive boolean[])
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF store_lock_exclusive THEN
        PERFORM pg_advisory_xact_lock(store_lock);
    ELSE
        PERFORM pg_advisory_xact_lock_shared(store_lock);
    END IF;
    FOR i IN 1 .. coalesce(cardinality(lock_ids), 0) LOOP
        IF lock_exclusive[i] THEN
            PERFORM pg_advisory_xact_lock(lock_ids[i]);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(lock_ids[i]);
        END IF;
    END LOOP;
END $$;
CREATE OR REPLACE FUNCTION {schema}.txn_apply(
    snap text, read_keys bytea[], range_begins bytea[], range_ends bytea[],
    present_keys bytea[], put_keys bytea[], put_values bytea[], clear_keys bytea[],
    clear_begins bytea[], clear_ends bytea[], commit_slot text, commit_token text)
RETURNS boolean LANGUAGE plpgsql VOLATILE
-- Its plans are cached generic plans, often made while the table was small:
-- an EXISTS planned then scans the whole table at every commit once it is not.
SET enable_seqscan = off AS $$
DECLARE
    s pg_snapshot := snap::pg_snapshot;
BEGIN
    -- Each statement below sees every commit finished by now (a VOLATILE
    -- function in READ COMMITTED takes a fresh snapshot per statement).
    -- Written since the snapshot: a read key, or any key in a read range.
    IF cardinality(read_keys) > 0 AND EXISTS (
            SELECT 1 FROM {schema}.kv
            WHERE key = ANY(read_keys) AND NOT pg_visible_in_snapshot(ver, s)) THEN
        RETURN false;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(range_begins), 0) LOOP
        IF EXISTS (SELECT 1 FROM {schema}.kv
                   WHERE key >= range_begins[i] AND key < range_ends[i]
                   AND NOT pg_visible_in_snapshot(ver, s)) THEN
            RETURN false;
        END IF;
    END LOOP;
    -- Deleted since the snapshot: a key the transaction saw present.
    IF cardinality(present_keys) > 0
       AND (SELECT count(*) FROM {schema}.kv WHERE key = ANY(present_keys))
           <> cardinality(present_keys) THEN
        RETURN false;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(clear_begins), 0) LOOP
        DELETE FROM {schema}.kv WHERE key >= clear_begins[i] AND key < clear_ends[i];
    END LOOP;
    IF cardinality(clear_keys) > 0 THEN
        DELETE FROM {schema}.kv WHERE key = ANY(clear_keys);
    END IF;
    IF cardinality(put_keys) > 0 THEN
        INSERT INTO {schema}.kv (key, value, ver)
            SELECT k, v, pg_current_xact_id() FROM unnest(put_keys, put_values) AS p(k, v)
            ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, ver = EXCLUDED.ver;
    END IF;
    INSERT INTO {schema}.commit_slots (slot, token) VALUES (commit_slot, commit_token)
        ON CONFLICT (slot) DO UPDATE SET token = EXCLUDED.token;
    RETURN true;
END $$;
CREATE OR REPLACE FUNCTION {schema}.txn_commit(
    snap text, store_lock bigint, store_lock_exclusive boolean,
    lock_ids bigint[], lock_exclusive boolean[],
    read_keys bytea[], range_begins bytea[], range_ends bytea[],
    present_keys bytea[], put_keys bytea[], put_values bytea[], clear_keys bytea[],
    clear_begins bytea[], clear_ends bytea[], commit_slot text, commit_token text)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM {schema}.txn_lock(store_lock, store_lock_exclusive, lock_ids, lock_exclusive);
    RETURN {schema}.txn_apply(snap, read_keys, range_begins, range_ends, present_keys,
        put_keys, put_values, clear_keys, clear_begins, clear_ends, commit_slot, commit_token);
END $$;
-- Several transactions in one: the union of their locks first (one order for
-- all commits, so none deadlock), then each validated and applied in turn,
-- each with its own outcome (a failed validation writes nothing) and slot.
-- counts: 6 per transaction, how many of read_keys, range_begins/ends,
-- present_keys, put_keys/values, clear_keys, clear_begins/ends are its own.
CREATE OR REPLACE FUNCTION {schema}.txn_commit_batch(
    snaps text[], store_lock bigint, store_lock_exclusive boolean,
    lock_ids bigint[], lock_exclusive boolean[], counts int[],
    read_keys bytea[], range_begins bytea[], range_ends bytea[],
    present_keys bytea[], put_keys bytea[], put_values bytea[], clear_keys bytea[],
    clear_begins bytea[], clear_ends bytea[], commit_slots text[], commit_tokens text[])
RETURNS boolean[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    outcomes boolean[] := '{{}}';
    o int[] := ARRAY[0, 0, 0, 0, 0, 0];
    c int[];
BEGIN
    PERFORM {schema}.txn_lock(store_lock, store_lock_exclusive, lock_ids, lock_exclusive);
    FOR t IN 1 .. cardinality(snaps) LOOP
        c := counts[6 * t - 5 : 6 * t];
        outcomes := outcomes || {schema}.txn_apply(snaps[t],
            read_keys[o[1] + 1 : o[1] + c[1]],
            range_begins[o[2] + 1 : o[2] + c[2]], range_ends[o[2] + 1 : o[2] + c[2]],
            present_keys[o[3] + 1 : o[3] + c[3]],
            put_keys[o[4] + 1 : o[4] + c[4]], put_values[o[4] + 1 : o[4] + c[4]],
            clear_keys[o[5] + 1 : o[5] + c[5]],
            clear_begins[o[6] + 1 : o[6] + c[6]], clear_ends[o[6] + 1 : o[6] + c[6]],
            commit_slots[t], commit_tokens[t]);
        FOR j IN 1 .. 6 LOOP
            o[j] := o[j] + c[j];
        END LOOP;
    END LOOP;
    RETURN outcomes;
END $$;
CREATE OR REPLACE FUNCTION {schema}.txn_commit_or_raise(
    snap text, store_lock bigint, store_lock_exclusive boolean,
    lock_ids bigint[], lock_exclusive boolean[],
    read_keys bytea[], range_begins bytea[], range_ends bytea[],
    present_keys bytea[], put_keys bytea[], put_values bytea[], clear_keys bytea[],
    clear_begins bytea[], clear_ends bytea[], commit_slot text, commit_token text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT {schema}.txn_commit(snap, store_lock, store_lock_exclusive, lock_ids,
            lock_exclusive, read_keys, range_begins, range_ends, present_keys, put_keys,
            put_values, clear_keys, clear_begins, clear_ends, commit_slot, commit_token) THEN
        RAISE EXCEPTION 'read set changed since the snapshot'
            USING ERRCODE = 'serialization_failure';
    END IF;
END $$;
"""

# The snapshot is taken by the first statement after it (_SNAPSHOT_AND_GET).
_BEGIN = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# Ends a snapshot and begins the next one's transaction, in one round trip.
_ROLLBACK_AND_BEGIN = "ROLLBACK; " + _BEGIN
# Fixes the snapshot, learns its id and reads the keys of ``$1`` that exist
# (one row at least: key NULL when none does).
_SNAPSHOT_AND_GET = (
    "SELECT s.snap, k.key, k.value FROM (SELECT pg_current_snapshot()::text AS snap) s "
    "LEFT JOIN kv k ON k.key = ANY($1)"
)
_GET = "SELECT value FROM kv WHERE key = $1"
_GET_MANY = "SELECT key, value FROM kv WHERE key = ANY($1)"
_RANGE = "SELECT key, value FROM kv WHERE key >= $1 AND key < $2 ORDER BY key {order} LIMIT $3"
_COMMIT = "SELECT txn_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
_COMMIT_BATCH = "SELECT txn_commit_batch(" + ", ".join(f"${i}" for i in range(1, 18)) + ")"
# Which of ``$1`` (read keys never fetched) the snapshot holds.
_HELD = "SELECT array(SELECT key FROM kv WHERE key = ANY($1))"


def _sql_text(s: str) -> str:
    # standard_conforming_strings (on since PostgreSQL 9.1): only quotes need doubling.
    assert "\\" not in s and "\0" not in s, s
    return "'" + s.replace("'", "''") + "'"


def _sql_bytea_array(values: list[bytes]) -> str:
    if not values:
        return "'{}'::bytea[]"
    return "ARRAY[" + ",".join(f"'\\x{v.hex()}'" for v in values) + "]::bytea[]"


def _commit_script(args: list[Any], slot: str, token: str) -> str:
    """txn_commit_or_raise(args..., slot, token) as one simple-protocol message that
    first ends the snapshot's transaction and afterwards begins the next one's.
    Literals, not parameters: a message with several statements takes none."""
    (snap, store_lock, store_exclusive, lock_ids, lock_exclusive, *keys) = args
    assert len(keys) == 9, len(keys)
    lits = [
        _sql_text(snap),
        str(int(store_lock)),
        "true" if store_exclusive else "false",
        "ARRAY[" + ",".join(str(int(i)) for i in lock_ids) + "]::bigint[]",
        "ARRAY[" + ",".join("true" if x else "false" for x in lock_exclusive) + "]::boolean[]",
        *(_sql_bytea_array(k) for k in keys),
        _sql_text(slot),
        _sql_text(token),
    ]
    call = "SELECT txn_commit_or_raise(" + ", ".join(lits) + ")"
    return f"ROLLBACK; BEGIN; {call}; COMMIT; {_BEGIN}"


def _is_lost(e: BaseException) -> bool:
    """The connection broke or a statement timed out (a commit's outcome is unknown)."""
    if isinstance(e, asyncpg.PostgresError):
        state = e.sqlstate or ""
        return state.startswith("08") or state in ("57P01", "57P02", "57P03")
    # InternalClientError: the protocol is out of step (a FATAL arrived on an
    # idle connection when its backend died); the connection is unusable.
    return isinstance(
        e, OSError | asyncio.TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError
    )


@dataclass(eq=False)  # identity: pooled connections are kept in sets
class _Conn:
    raw: asyncpg.Connection
    slot: str  # this connection's commit_slots row
    backend_pid: int
    backend_start: Any  # with the pid, names the backend even after pid reuse
    lease: asyncio.Semaphore | None = None  # the pool bound it was taken under
    # Inside a snapshot's REPEATABLE READ transaction (_BEGIN); when idle, one
    # not read from yet (its snapshot is taken by the next statement).
    begun: bool = False


@dataclass(eq=False)
class _Pending:
    """A commit waiting in the group-commit queue."""

    args: list[Any]
    outcome: asyncio.Future[bool]


class _PgSnapshot(Snapshot):
    def __init__(self, store: PostgresStore, conn: _Conn, snap_id: str) -> None:
        self.store = store
        self.conn: _Conn | None = conn
        store._pool.snapshots_held.set(store._pool.snapshots_held.get() + 1)
        self.snap_id = snap_id  # pg_current_snapshot()
        self.fetched: set[bytes] = set()  # keys point-read at the snapshot
        self.present: set[bytes] = set()  # keys the snapshot showed to exist

    def _live(self) -> _Conn:
        if self.conn is None:
            raise ChainfsError(Code.EBADF, "read from a finished postgresql transaction")
        return self.conn

    async def _query(self, sql: str, *args: Any) -> list[Any]:
        conn = self._live()
        try:
            return list(await conn.raw.fetch(sql, *args, timeout=self.store._timeout_s))
        except Exception as e:
            if not _is_lost(e):
                raise
            self._drop()
            self.store._pool.discard(conn)
            raise TxnTooOld(f"postgresql snapshot lost ({e!r}); retrying") from None

    def read_ahead(self, keys: list[bytes], rows: list[Any]) -> None:
        """Take the rows _SNAPSHOT_AND_GET found of ``keys``."""
        found = {bytes(r[1]): bytes(r[2]) for r in rows if r[1] is not None}
        self.ahead = {k: found.get(k) for k in keys}
        self.fetched.update(keys)
        self.present.update(found)

    async def get(self, key: bytes) -> bytes | None:
        rows = await self._query(_GET, key)
        self.fetched.add(key)
        if not rows:
            return None
        self.present.add(key)
        return bytes(rows[0][0])

    async def get_many(self, keys: list[bytes]) -> dict[bytes, bytes | None]:
        rows = await self._query(_GET_MANY, keys)
        found = {bytes(k): bytes(v) for k, v in rows}
        self.fetched.update(keys)
        self.present.update(found)
        return {k: found.get(k) for k in keys}

    async def get_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[tuple[bytes, bytes]]:
        sql = _RANGE.format(order="DESC" if reverse else "ASC")
        rows = await self._query(sql, begin, end, limit or None)
        out = [(bytes(k), bytes(v)) for k, v in rows]
        self.present.update(k for k, _ in out)
        return out

    async def finish(self, unseen: list[bytes]) -> tuple[str, set[bytes], _Conn | None]:
        """End the snapshot: its id, which of ``unseen`` it holds, and its
        connection (still inside the snapshot's transaction) for the commit."""
        held: set[bytes] = set()
        if unseen:
            rows = await self._query(_HELD, unseen)
            held = {bytes(k) for k in rows[0][0]}
        return self.snap_id, held, self._drop()

    def _drop(self) -> _Conn | None:
        conn, self.conn = self.conn, None
        if conn is not None:
            held = self.store._pool.snapshots_held
            held.set(held.get() - 1)
        return conn

    def close(self) -> None:
        # transact() closes synchronously: the ROLLBACK (and the next BEGIN) run
        # as a task that returns the connection to the pool when done.
        conn = self._drop()
        if conn is not None:
            self.store._pool.spawn_release(conn)


class _Pool:
    """At most ``size`` connections for transactions, and ``size`` more for
    transactions run inside another one's function (meta's inode allocator
    does that): were both drawn from one bound, ``size`` outer transactions
    each waiting for an inner one would wait for each other forever.
    Idle connections are reused."""

    def __init__(self, store: PostgresStore, size: int) -> None:
        self.store = store
        self.size = size
        # Snapshots and commits each need their kind of connection: up to twice
        # ``size`` stay open (no more are made while one could be turned).
        self.max_idle = 2 * size
        self._slots = asyncio.Semaphore(size)
        self._nested_slots = asyncio.Semaphore(size)
        # Snapshots this task holds open (a transaction's, while its fn runs).
        self.snapshots_held = contextvars.ContextVar(f"pg-held-{id(self)}", default=0)
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._releases: set[asyncio.Task[None]] = set()
        self._slot_names = (f"{store.store_id}/{i}" for i in itertools.count())

    async def acquire(self, snapshot: bool = False) -> _Conn:
        """A connection inside a begun snapshot transaction, or (``snapshot`` false)
        outside any transaction."""
        for _ in range(self.max_idle + 1):
            conn = await self._lease(snapshot)
            if conn.begun == snapshot:
                return conn
            try:
                sql = _BEGIN if snapshot else "ROLLBACK"
                await conn.raw.execute(sql, timeout=self.store._timeout_s)
            except Exception as e:
                self.discard(conn)
                if not _is_lost(e):
                    raise
                self.store.stats["reconnects"] += 1
                continue
            conn.begun = snapshot
            return conn
        raise TxnTooOld("postgresql connections keep breaking; retrying")

    def _take_idle(self, begun: bool) -> _Conn | None:
        """An idle connection in the state asked for; else, below ``max_idle``
        connections, None (make a new one); else one to turn (a round trip)."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i].begun == begun:
                return self._idle.pop(i)
        if len(self._all) < self.max_idle or not self._idle:
            return None
        return self._idle.pop()

    async def _lease(self, begun: bool) -> _Conn:
        deadline = time.monotonic() + self.store.options.op_timeout_ms / 1000.0
        lease = self._nested_slots if self.snapshots_held.get() > 0 else self._slots
        try:
            await asyncio.wait_for(lease.acquire(), self.store.options.op_timeout_ms / 1000)
        except TimeoutError:
            raise ChainfsError(
                Code.UNAVAILABLE,
                f"no postgresql connection free in {self.store.options.op_timeout_ms} ms "
                f"(pool_size={self.size})",
            ) from None
        try:
            idle = self._take_idle(begun)
            if idle is not None:
                conn = idle
            else:
                conn = await self.store._connect(deadline)
                self._all.add(conn)
        except BaseException:
            lease.release()
            raise
        conn.lease = lease
        return conn

    def _unlease(self, conn: _Conn) -> None:
        assert conn.lease is not None, "connection released twice"
        conn.lease.release()
        conn.lease = None

    def release(self, conn: _Conn) -> None:
        self._unlease(conn)
        self._idle.append(conn)

    def discard(self, conn: _Conn) -> None:
        """Drop a broken connection (its slot stays with the store's slot names)."""
        self._unlease(conn)
        self._all.discard(conn)
        conn.raw.terminate()

    async def release_after(self, conn: _Conn, sql: str, begun: bool) -> None:
        """Run ``sql`` (ending a transaction, beginning the next if ``begun``),
        then return the connection to the pool."""
        try:
            await conn.raw.execute(sql, timeout=self.store._timeout_s)
        except Exception as e:
            self.discard(conn)
            if not _is_lost(e):
                raise
            return
        conn.begun = begun
        self.release(conn)

    def spawn_release(self, conn: _Conn) -> None:
        """End a snapshot's transaction and begin the next one's."""
        release = self.release_after(conn, _ROLLBACK_AND_BEGIN, begun=True)
        task = asyncio.get_running_loop().create_task(release)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def new_slot(self) -> str:
        return next(self._slot_names)

    async def close(self) -> list[_Conn]:
        """Wait for pending releases; returns the idle connections (the caller closes them)."""
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in self._all - set(idle):
            conn.raw.terminate()  # still inside a transaction of an unfinished caller
        self._all.clear()
        return idle


class PostgresStore(KVStore):
    """A schema in a PostgreSQL database."""

    prefetches = True

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        database: str,
        retry: RetryPolicy | None = None,
        options: PostgresOptions | None = None,
    ) -> None:
        super().__init__(retry)
        self.options = options or PostgresOptions()
        self.options.validate()
        self.host = self.options.host or host
        if not self.host or not database:
            raise ChainfsError(Code.EINVAL, "postgresql store needs a host and a database")
        self.port, self.user, self.database = port, user, database
        where = f"{host}:{port}" if host else ""
        self.url = f"postgresql://{user}@{where}/{database}?schema={self.options.schema}"
        self.store_id = uuid.uuid4().hex[:16]
        self._timeout_s = self.options.request_timeout_ms / 1000.0
        self._pool = _Pool(self, self.options.pool_size)
        self._tokens = itertools.count(1)
        # Lock ids are database-wide: the schema keeps stores apart.
        self._lock_salt = hashlib.blake2b(self.options.schema.encode(), digest_size=16).digest()
        self._max_key_locks = self.options.max_key_locks
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()
        self._closed = False
        # Group commit: commits waiting for the one in flight, and its task.
        self._commit_queue: list[_Pending] = []
        self._commits_in_flight = 0
        self._flusher: asyncio.Task[None] | None = None
        self.stats.update(
            {"reconnects": 0, "lost_replies": 0, "commit_batches": 0, "batched_commits": 0}
        )

    @classmethod
    def from_url(cls, url: str, retry: RetryPolicy | None = None) -> PostgresStore:
        u = urlparse(url)
        database = u.path.strip("/")
        if u.scheme not in SCHEMES or "/" in database:
            raise ChainfsError(
                Code.EINVAL, f"bad postgresql URL {url!r}: use postgresql://user@host:port/db"
            )
        try:
            port = u.port or 5432
        except ValueError:
            raise ChainfsError(Code.EINVAL, f"bad port in postgresql URL {url!r}") from None
        options = options_from_query(PostgresOptions, u.query, url)
        if u.password and not options.password:
            options.password = unquote(u.password)
        user = unquote(u.username or "postgres")
        return cls(u.hostname or "", port, user, unquote(database), retry, options)

    # -- connections -----------------------------------------------------------
    async def _connect_once(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.options.password or None,
            database=self.database,
            timeout=self._timeout_s,
            command_timeout=self._timeout_s,
            server_settings={
                "search_path": self.options.schema,
                "default_transaction_isolation": "read committed",
                # Every query here looks keys up in the primary key. A prepared
                # one's generic plan, made while the table was small, would
                # otherwise scan the whole table at every begin once it is not.
                "enable_seqscan": "off",
            },
        )

    async def _connect(self, deadline: float) -> _Conn:
        """A new connection, retried (server restarting) until ``deadline``."""
        if self._closed:
            raise ChainfsError(Code.EBADF, f"postgresql store {self.url} is closed")
        delay_ms = float(self.options.retry_initial_ms)
        while True:
            try:
                raw = await self._connect_once()
                break
            except Exception as e:
                if not _is_lost(e) or time.monotonic() >= deadline:
                    raise self._unavailable("connect", e) from None
                self.stats["reconnects"] += 1
                await asyncio.sleep(random.uniform(delay_ms / 2, delay_ms) / 1000.0)
                delay_ms = min(delay_ms * 2, self.options.retry_max_ms)
        try:
            await self._ensure_schema(raw)
            row = await raw.fetchrow(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
        except BaseException:
            raw.terminate()
            raise
        return _Conn(raw, self._pool.new_slot(), int(row["pid"]), row["backend_start"])

    async def _ensure_schema(self, raw: asyncpg.Connection) -> None:
        if self._schema_ready:
            return
        async with self._schema_lock:
            if self._schema_ready:
                return
            # Concurrent openers of one schema take turns (DDL races otherwise).
            async with raw.transaction():
                await raw.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.options.schema)
                await raw.execute(_SCHEMA_SQL.format(schema=self.options.schema))
            self._schema_ready = True

    def _unavailable(self, what: str, e: BaseException) -> ChainfsError:
        return ChainfsError(
            Code.UNAVAILABLE,
            f"postgresql at {self.url} unreachable ({what}; gave up after "
            f"{self.options.op_timeout_ms} ms): {e!r}",
        )

    # -- transactions ----------------------------------------------------------
    async def _begin(self) -> Snapshot:
        return await self._begin_reading([])

    async def _begin_reading(
        self, keys: list[bytes], ranges: list[PrefetchRange] | None = None
    ) -> Snapshot:
        # Only keys are read ahead here; each range scan stays its own query.
        # Idle connections may all be dead after a server restart: try the next.
        for _ in range(self._pool.max_idle + 1):
            conn = await self._pool.acquire(snapshot=True)
            try:
                rows = await conn.raw.fetch(_SNAPSHOT_AND_GET, keys, timeout=self._timeout_s)
            except Exception as e:
                self._pool.discard(conn)
                if not _is_lost(e):
                    raise
                self.stats["reconnects"] += 1
                continue
            snap = _PgSnapshot(self, conn, str(rows[0][0]))
            if keys:
                snap.read_ahead(keys, rows)
            return snap
        raise TxnTooOld("postgresql connections keep breaking at begin; retrying")

    async def _commit(self, snapshot: Snapshot, tx: Transaction) -> None:
        assert isinstance(snapshot, _PgSnapshot)
        reads = tx.reads
        ranges = merge_ranges(sorted(reads.ranges))
        unseen = sorted(reads.keys - snapshot.fetched - snapshot.present)
        snap_id, unseen_present, conn = await snapshot.finish(unseen)
        present = {
            k
            for k in snapshot.present | unseen_present
            if k in reads.keys or any(b <= k < e for b, e in ranges)
        }
        puts = [(k, v) for k, v in tx.writes.items() if v is not None]
        store_exclusive, lock_ids, lock_exclusive = self._locks(tx, bool(ranges))
        args = [
            snap_id,
            self._lock_id(b""),
            store_exclusive,
            lock_ids,
            lock_exclusive,
            sorted(reads.keys),
            [b for b, _ in ranges],
            [e for _, e in ranges],
            sorted(present),
            [k for k, _ in puts],
            [v for _, v in puts],
            [k for k, v in tx.writes.items() if v is None],
            [b for b, _ in tx.cleared_ranges],
            [e for _, e in tx.cleared_ranges],
        ]
        if not await self._commit_grouped(args, conn):
            raise TxnConflict()

    def _lock_id(self, key: bytes) -> int:
        """The advisory lock standing for ``key`` (b"": the store-wide lock)."""
        digest = hashlib.blake2b(key, digest_size=8, key=self._lock_salt).digest()
        return int.from_bytes(digest, "big", signed=True)

    def _locks(self, tx: Transaction, read_ranges: bool) -> tuple[bool, list[int], list[bool]]:
        """(store-wide lock exclusive?, key lock ids in order, each exclusive?)."""
        writes = tx.writes.keys()
        if read_ranges or tx.cleared_ranges or len(tx.reads.keys | writes) > self._max_key_locks:
            return True, [], []  # exclusive store-wide lock: no key locks needed
        modes: dict[int, bool] = {self._lock_id(k): False for k in tx.reads.keys}
        for k in writes:
            modes[self._lock_id(k)] = True  # a hash collision with a read: exclusive wins
        ids = sorted(modes)
        return False, ids, [modes[i] for i in ids]

    async def _commit_grouped(self, args: list[Any], snapshot_conn: _Conn | None) -> bool:
        """Commit alone when no other commit is in flight; else wait in the queue
        and go with the others that arrived meanwhile (one round trip)."""
        queue = self._commit_queue
        if (
            self._commits_in_flight == 0
            or self.options.group_commit_max_txns == 1
            or len(queue) >= self.options.group_commit_queue_max
        ):
            self._commits_in_flight += 1
            try:
                return await self._commit_once(args, snapshot_conn)
            finally:
                self._commits_in_flight -= 1
                self._start_flusher()
        if snapshot_conn is not None:
            self._pool.spawn_release(snapshot_conn)  # the batch goes on another connection
        pending = _Pending(args, asyncio.get_running_loop().create_future())
        queue.append(pending)
        self._start_flusher()
        return await pending.outcome

    def _start_flusher(self) -> None:
        if not self._commit_queue or self._flusher is not None:
            return
        # Its connections come from the nested bound: outer transactions that
        # hold every other one may be waiting for a queued (inner) commit.
        context = contextvars.copy_context()
        context.run(self._pool.snapshots_held.set, 1)
        self._flusher = asyncio.get_running_loop().create_task(self._flush(), context=context)

    async def _flush(self) -> None:
        """Send the queue in batches until it is empty."""
        try:
            while self._commit_queue:
                batch = self._commit_queue[: self.options.group_commit_max_txns]
                del self._commit_queue[: len(batch)]
                self._commits_in_flight += 1
                try:
                    await self._commit_batch(batch)
                except BaseException as e:
                    for p in batch:
                        if not p.outcome.done():
                            p.outcome.set_exception(e)
                    if not isinstance(e, Exception):
                        raise
                finally:
                    self._commits_in_flight -= 1
        finally:
            self._flusher = None

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        """One PostgreSQL transaction for ``batch``: each gets its own outcome.
        A batch that fails as a whole (an error, a deadlock) goes again one by
        one; after a lost reply, those whose slot holds their token landed."""
        if len(batch) == 1:
            return await self._commit_alone(batch)
        deadline = time.monotonic() + self.options.op_timeout_ms / 1000.0
        conn = await self._pool.acquire()
        slots = [f"{conn.slot}.{i}" for i in range(len(batch))]
        tokens = [f"{slot}/{next(self._tokens)}" for slot in slots]
        try:
            outcomes = await self._send_batch(conn, [p.args for p in batch], slots, tokens)
        except Exception as e:
            if not _is_lost(e):
                self._pool.release(conn)
                return await self._commit_alone(batch)
            self._pool.discard(conn)
            self.stats["lost_replies"] += 1
            landed = await self._landed(conn, slots, tokens, deadline)
            resend = []
            for p, ok in zip(batch, landed, strict=True):
                if not ok:
                    resend.append(p)  # it never landed and never will
                elif not p.outcome.done():
                    p.outcome.set_result(True)
            return await self._commit_alone(resend)
        self._pool.release(conn)
        self.stats["commit_batches"] += 1
        self.stats["batched_commits"] += len(batch)
        for p, ok in zip(batch, outcomes, strict=True):
            if not p.outcome.done():
                p.outcome.set_result(bool(ok))

    async def _send_batch(
        self, conn: _Conn, txns: list[list[Any]], slots: list[str], tokens: list[str]
    ) -> list[bool]:
        args = self._batch_args(txns)
        outcomes = await conn.raw.fetchval(
            _COMMIT_BATCH, *args, slots, tokens, timeout=self._timeout_s
        )
        return [bool(ok) for ok in outcomes]

    async def _commit_alone(self, batch: list[_Pending]) -> None:
        async def one(p: _Pending) -> None:
            try:
                ok = await self._commit_once(p.args, None)
            except Exception as e:
                if not p.outcome.done():
                    p.outcome.set_exception(e)
                return
            if not p.outcome.done():
                p.outcome.set_result(ok)

        await asyncio.gather(*(one(p) for p in batch))

    def _batch_args(self, txns: list[list[Any]]) -> list[Any]:
        """txn_commit_batch's arguments (but the slots and tokens) for ``txns``:
        the union of their locks, and their key lists end to end."""
        store_exclusive = any(a[2] for a in txns)
        modes: dict[int, bool] = {}
        if not store_exclusive:
            for a in txns:
                for lock_id, exclusive in zip(a[3], a[4], strict=True):
                    modes[lock_id] = modes.get(lock_id, False) or exclusive
            if len(modes) > self._max_key_locks:
                store_exclusive, modes = True, {}
        ids = sorted(modes)
        counts: list[int] = []
        lists: list[list[Any]] = [[] for _ in range(9)]
        for a in txns:
            keys = a[5:]
            assert len(keys) == 9, len(keys)
            counts += [len(keys[i]) for i in (0, 1, 3, 4, 6, 7)]
            for i, values in enumerate(keys):
                lists[i].extend(values)
        return [
            [a[0] for a in txns],
            txns[0][1],
            store_exclusive,
            ids,
            [modes[i] for i in ids],
            counts,
            *lists,
        ]

    async def _commit_once(self, args: list[Any], snapshot_conn: _Conn | None) -> bool:
        """Run txn_commit exactly once; True if its validation held (it committed).
        First on ``snapshot_conn`` (ending its snapshot in the same round trip)."""
        deadline = time.monotonic() + self.options.op_timeout_ms / 1000.0
        first = snapshot_conn
        while True:
            conn, first = (first, None) if first is not None else (await self._pool.acquire(), None)
            token = f"{conn.slot}/{next(self._tokens)}"
            try:
                ok = await self._send_commit(conn, args, token)
            except Exception as e:
                if isinstance(e, asyncpg.PostgresError) and e.sqlstate in _CONFLICT_STATES:
                    self._release_after_commit(conn)
                    return False
                if not _is_lost(e):
                    self._release_after_commit(conn)
                    raise
                self._pool.discard(conn)
                self.stats["lost_replies"] += 1
                if (await self._landed(conn, [conn.slot], [token], deadline))[0]:
                    return True
                continue  # it never landed and never will: send it again
            self._pool.release(conn)
            return ok

    def _release_after_commit(self, conn: _Conn) -> None:
        """Back to the pool after a failed commit (a snapshot's connection is
        still, or again, inside a transaction: rolled back first)."""
        if conn.begun:
            self._pool.spawn_release(conn)
        else:
            self._pool.release(conn)

    async def _send_commit(self, conn: _Conn, args: list[Any], token: str) -> bool:
        if not conn.begun:
            return bool(await conn.raw.fetchval(_COMMIT, *args, conn.slot, token))
        # A snapshot's connection: ends it, commits, begins the next (or raises 40001).
        await conn.raw.execute(_commit_script(args, conn.slot, token), timeout=self._timeout_s)
        return True

    async def _landed(
        self, lost: _Conn, slots: list[str], tokens: list[str], deadline: float
    ) -> list[bool]:
        """After a lost reply: wait until the old backend is gone, then read its
        slots; each commit landed if its slot holds its token."""
        while True:
            try:
                conn = await self._pool.acquire()
            except ChainfsError as e:
                raise self._outcome_unknown(e) from None
            try:
                gone = not await conn.raw.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE pid = $1 AND backend_start = $2",
                    lost.backend_pid,
                    lost.backend_start,
                )
                rows = await conn.raw.fetch(
                    "SELECT slot, token FROM commit_slots WHERE slot = ANY($1)", slots
                )
            except Exception as e:
                self._pool.discard(conn)
                if not _is_lost(e) or time.monotonic() >= deadline:
                    raise self._outcome_unknown(e) from None
                continue
            self._pool.release(conn)
            if gone:
                found = {str(r[0]): str(r[1]) for r in rows}
                return [found.get(s) == t for s, t in zip(slots, tokens, strict=True)]
            if time.monotonic() >= deadline:
                raise self._outcome_unknown(TimeoutError("old backend still running"))
            await asyncio.sleep(self.options.retry_initial_ms / 1000.0)

    def _outcome_unknown(self, e: BaseException) -> ChainfsError:
        return ChainfsError(
            Code.UNAVAILABLE,
            f"postgresql at {self.url}: commit sent, outcome unknown (gave up after "
            f"{self.options.op_timeout_ms} ms): {e!r}",
        )

    async def close(self) -> None:
        """Drop this store's commit slots (best effort) and close its connections."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        idle = await self._pool.close()
        if idle:
            try:
                if idle[0].begun:
                    await idle[0].raw.execute("ROLLBACK", timeout=self._timeout_s)
                await idle[0].raw.execute(
                    "DELETE FROM commit_slots WHERE slot LIKE $1",
                    self.store_id + "/%",
                    timeout=self._timeout_s,
                )
            except Exception as e:
                if not _is_lost(e) and not isinstance(e, asyncpg.PostgresError):
                    raise
                # Unreachable server: this store's few small slot rows stay behind.
                log.warning("postgresql store %s: commit slots not removed: %r", self.url, e)
        for conn in idle:
            try:
                await asyncio.wait_for(conn.raw.close(), self._timeout_s)
            except Exception:
                conn.raw.terminate()
