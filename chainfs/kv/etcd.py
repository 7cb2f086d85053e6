"""Distributed transactional store on etcd (``etcd://h:p[,h:p...]/prefix``), via aetcd.

- Snapshot = one etcd revision: the first read of a transaction is
  linearizable at the latest revision and fixes it; every later read is at
  that revision (a compacted revision -> TXN_TOO_OLD, retried).
- Read ahead: the keys ``transact(prefetch=...)`` names are read at begin in
  one read-only Txn of point Ranges (one round trip, linearizable, one
  revision), which is that first read. Their mod_revisions are kept like a
  point read's, but only the keys ``fn`` then reads are compared at commit.
- Commit = ONE etcd Txn. Compares: the mod_revision of every key read (0 for
  a key that was absent, so it must still be absent), "mod_revision <
  snapshot+1" over every range read (catches keys created or changed in it),
  and the mod_revision of every key seen in a range (catches deletions, which
  leave no trace a range compare could see). Success ops: delete ranges
  (split around keys the same Txn puts: etcd rejects a put inside a deleted
  range), deletes, puts.
- Exactly once across failover: each in-flight commit owns a marker key
  (``<prefix>/t/<store id>/<slot>``) whose mod_revision the Txn compares and
  whose value it sets to a per-commit token. When a Txn's outcome is unknown
  (the member died, the leader changed, a timeout), a fence Txn on the next
  member bumps the marker unless the token is already there: afterwards the
  lost Txn can never apply, so we know whether it did and can resend it.
- Endpoints are tried in turn; every read or commit is bounded by
  ``op_timeout_ms`` and then fails with UNAVAILABLE naming the endpoints.
- History is compacted by the store itself (``compact_interval_ms``): etcd keeps
  every revision of every deleted key until a compaction, and a range read
  walks them all, so a store that has seen many creates and unlinks gets slower
  whatever ``--auto-compaction-*`` the operator set. Every interval the store
  compacts at the revision it saw one interval earlier, but never past the
  snapshot of a transaction still open in this process; another process's
  transaction older than that gets TXN_TOO_OLD and is retried. Several stores
  compacting the same cluster is harmless (an older target is a no-op).

User keys live under ``<prefix>/d/``. Options ride in the URL query:
``etcd://127.0.0.1:2379/chainfs?op_timeout_ms=5000``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aetcd
import grpc
from aetcd import rpc

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
    prefix_end,
)

log = logging.getLogger(__name__)

_MOD = rpc.Compare.MOD
_EQUAL = rpc.Compare.EQUAL
_LESS = rpc.Compare.LESS

COMPACT_INTERVAL_MS_MIN = 100
COMPACT_INTERVAL_MS_MAX = 3_600_000


@dataclass
class EtcdOptions:
    # One RPC attempt on one member; a slow or dead member is left after this.
    request_timeout_ms: int = 2000
    # A whole read or commit, including failover and leader elections; then UNAVAILABLE.
    op_timeout_ms: int = 15000
    # Pause between attempts after a failure (doubles up to retry_max_ms).
    retry_initial_ms: int = 10
    retry_max_ms: int = 500
    # Ops in one commit Txn (compares + writes); must not exceed the cluster's
    # --max-txn-ops (etcd's default is only 128).
    max_txn_ops: int = 10_000
    # Keys fetched per Range RPC when a scan has no limit.
    range_page_keys: int = 1000
    # Commits in flight at once from this process (each holds one marker key).
    max_inflight_commits: int = 1024
    # Largest gRPC message either way (large values, big range pages).
    max_message_bytes: int = 64 * 1024 * 1024
    # gRPC reconnect backoff cap: a restarted member is used again within this.
    reconnect_backoff_max_ms: int = 1000
    # Compact etcd's history every this often, keeping one interval of it (and
    # every revision a transaction open in this process reads); 0 = never (leave
    # it to etcd's --auto-compaction-*). A transaction of another process that
    # runs longer than this may be retried once.
    compact_interval_ms: int = 10_000

    def validate(self) -> None:
        if not 0 < self.request_timeout_ms <= self.op_timeout_ms:
            raise ValueError("need 0 < request_timeout_ms <= op_timeout_ms")
        if not 0 < self.retry_initial_ms <= self.retry_max_ms:
            raise ValueError("need 0 < retry_initial_ms <= retry_max_ms")
        if self.max_txn_ops < 2:
            raise ValueError("max_txn_ops must be >= 2")
        if self.range_page_keys < 1 or self.max_inflight_commits < 1:
            raise ValueError("range_page_keys and max_inflight_commits must be >= 1")
        if self.compact_interval_ms != 0 and not (
            COMPACT_INTERVAL_MS_MIN <= self.compact_interval_ms <= COMPACT_INTERVAL_MS_MAX
        ):
            raise ValueError(
                f"compact_interval_ms must be 0 (off) or in [{COMPACT_INTERVAL_MS_MIN}, "
                f"{COMPACT_INTERVAL_MS_MAX}]"
            )


class _Retryable(Exception):
    """A failure worth another attempt (elsewhere); the outcome of a write is unknown."""


def _classify(e: grpc.aio.AioRpcError, what: str) -> Exception:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return TxnTooOld(f"etcd revision compacted ({details}); retrying")
    if code == grpc.StatusCode.INVALID_ARGUMENT and (
        "too many operations" in details or "too large" in details
    ):
        return ChainfsError(Code.E2BIG, f"etcd rejected {what}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in details:
        return ChainfsError(Code.ENOSPC, f"etcd: {details}")
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # "too many requests"
        grpc.StatusCode.OUT_OF_RANGE,  # future revision on a lagging member
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    ):
        return _Retryable(f"{code.name}: {details}")
    return ChainfsError(Code.EIO, f"etcd {what} failed: {code.name}: {details}")


@dataclass
class _Slot:
    key: bytes
    mod_revision: int  # the marker key's current mod_revision (0: absent)


class _EtcdSnapshot(Snapshot):
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.revision: int | None = None  # fixed by the first read
        # Latest revision this process had seen at begin: the snapshot point of a
        # transaction that only declares conflict keys without reading.
        self.floor = store._known_revision
        self._first_read = asyncio.Lock()
        self.mods: dict[bytes, int] = {}  # user key -> mod_revision seen (0: absent)
        store._open_snapshots.add(self)  # compaction stays behind it until close

    def close(self) -> None:
        self.store._open_snapshots.discard(self)

    @property
    def oldest_revision(self) -> int:
        """The revision this snapshot reads or will read at (0: not known yet)."""
        return self.revision if self.revision is not None else self.floor

    async def _range(self, req: Any) -> Any:
        if self.revision is None:
            async with self._first_read:
                if self.revision is None:
                    resp = await self.store._read(req)
                    self.revision = int(resp.header.revision)
                    return resp
        req.revision = self.revision
        return await self.store._read(req)

    async def read_ahead(self, keys: list[bytes], ranges: list[PrefetchRange]) -> None:
        """Read ``keys`` and ``ranges`` as this snapshot's first read (transact's prefetch)."""
        assert self.revision is None, "read ahead must be the snapshot's first read"
        self.ahead = await self._point_reads(list(dict.fromkeys(keys)), ranges)

    async def get_many(self, keys: list[bytes]) -> dict[bytes, bytes | None]:
        if self.revision is None:
            async with self._first_read:
                if self.revision is None:
                    return await self._point_reads(keys)
        return await self._point_reads(keys)

    async def _point_reads(
        self, keys: list[bytes], ranges: Sequence[PrefetchRange] = ()
    ) -> dict[bytes, bytes | None]:
        """``keys`` (distinct) read in one read-only Txn of point Ranges (more
        only past max_txn_ops keys), at the snapshot's revision; the first
        read fixes it. Their mod_revisions are kept like a point read's: a key
        is compared at commit only if the transaction reads it. ``ranges`` ride
        in the same Txn (into ``ahead_ranges``), their pairs kept alike."""
        store = self.store
        strip = len(store._data)
        out: dict[bytes, bytes | None] = {}
        found: dict[tuple[bytes, bytes], tuple[int, list[tuple[bytes, bytes]], bool]] = {}
        wanted: list[bytes | PrefetchRange] = [*ranges, *keys]
        per_txn = store.options.max_txn_ops
        for i in range(0, len(wanted), per_txn):
            part = wanted[i : i + per_txn]
            rev = self.revision or 0
            ops = [
                rpc.RequestOp(request_range=rpc.RangeRequest(key=store._dkey(w), revision=rev))
                if isinstance(w, bytes)
                else rpc.RequestOp(
                    request_range=rpc.RangeRequest(
                        key=store._dkey(w[0]), range_end=store._dkey(w[1]), limit=w[2], revision=rev
                    )
                )
                for w in part
            ]
            resp = await store._read(rpc.TxnRequest(success=ops), "Txn")
            assert resp.succeeded and len(resp.responses) == len(part)
            if self.revision is None:
                self.revision = int(resp.header.revision)
            for w, r in zip(part, resp.responses, strict=True):
                rr = r.response_range
                if isinstance(w, bytes):
                    self.mods[w] = int(rr.kvs[0].mod_revision) if rr.kvs else 0
                    out[w] = bytes(rr.kvs[0].value) if rr.kvs else None
                    continue
                rows = []
                for kv in rr.kvs:
                    k = bytes(kv.key[strip:])
                    self.mods[k] = int(kv.mod_revision)
                    rows.append((k, bytes(kv.value)))
                found[(w[0], w[1])] = (w[2], rows, not rr.more)
        if found:
            self.ahead_ranges = found
        return out

    async def get(self, key: bytes) -> bytes | None:
        resp = await self._range(rpc.RangeRequest(key=self.store._dkey(key)))
        if resp.kvs:
            kv = resp.kvs[0]
            self.mods[key] = int(kv.mod_revision)
            return bytes(kv.value)
        self.mods[key] = 0
        return None

    async def get_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[tuple[bytes, bytes]]:
        store = self.store
        page = store.options.range_page_keys
        out: list[tuple[bytes, bytes]] = []
        lo, hi = store._dkey(begin), store._dkey(end)
        strip = len(store._data)
        while True:
            want = page if limit == 0 else min(page, limit - len(out))
            req = rpc.RangeRequest(key=lo, range_end=hi, limit=want)
            if reverse:
                req.sort_order = rpc.RangeRequest.DESCEND
                req.sort_target = rpc.RangeRequest.KEY
            resp = await self._range(req)
            for kv in resp.kvs:
                k = bytes(kv.key[strip:])
                self.mods[k] = int(kv.mod_revision)
                out.append((k, bytes(kv.value)))
            if not resp.more or not resp.kvs or (limit and len(out) >= limit):
                return out
            last = bytes(resp.kvs[-1].key)
            if reverse:
                hi = last
            else:
                lo = last + b"\x00"


class EtcdStore(KVStore):
    """A key prefix in an etcd cluster."""

    prefetches = True  # transact's prefetch keys cost one read-only Txn at begin

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        prefix: str,
        retry: RetryPolicy | None = None,
        options: EtcdOptions | None = None,
    ) -> None:
        super().__init__(retry)
        if not endpoints:
            raise ChainfsError(Code.EINVAL, "etcd store needs at least one endpoint")
        if not prefix.strip("/"):
            raise ChainfsError(Code.EINVAL, "etcd store needs a key prefix (etcd://h:p/prefix)")
        self.endpoints = endpoints
        self.prefix = prefix.strip("/")
        self.options = options or EtcdOptions()
        self.options.validate()
        self.url = f"etcd://{self.endpoints_str}/{self.prefix}"
        root = self.prefix.encode() + b"/"
        self._data = root + b"d/"
        self._markers = root + b"t/" + uuid.uuid4().hex[:16].encode() + b"/"
        self._clients: list[aetcd.Client | None] = [None] * len(endpoints)
        self._current = 0
        self._slots: list[_Slot] = []
        self._slot_numbers = itertools.count()
        self._tokens = itertools.count(1)
        self._inflight = asyncio.Semaphore(self.options.max_inflight_commits)
        self._known_revision = 0  # highest revision in any response so far
        self._used_markers = False
        self._closed = False
        # Compaction: snapshots open in this process (a weak set: a snapshot
        # dropped unclosed must not hold history forever), the revision seen at
        # the last tick (the next target) and the highest revision compacted.
        self._open_snapshots: weakref.WeakSet[_EtcdSnapshot] = weakref.WeakSet()
        self._compact_next_s = time.monotonic() + self.options.compact_interval_ms / 1000.0
        self._compact_mark = 0
        self._compact_task: asyncio.Task[None] | None = None
        self.compacted_revision = 0
        # reads: read RPCs answered (a Range, or a read-only Txn reading ahead).
        self.stats.update({"failovers": 0, "fences": 0, "compactions": 0, "reads": 0})

    @property
    def endpoints_str(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    @classmethod
    def from_url(cls, url: str, retry: RetryPolicy | None = None) -> EtcdStore:
        u = urlparse(url)
        if u.scheme != "etcd" or not u.netloc:
            raise ChainfsError(Code.EINVAL, f"bad etcd URL {url!r}: use etcd://h:p[,h:p...]/prefix")
        endpoints: list[tuple[str, int]] = []
        for part in u.netloc.split(","):
            host, sep, port = part.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ChainfsError(Code.EINVAL, f"bad etcd endpoint {part!r} in {url!r}")
            endpoints.append((host.strip("[]"), int(port)))
        return cls(endpoints, u.path, retry, options_from_query(EtcdOptions, u.query, url))

    def _dkey(self, key: bytes) -> bytes:
        return self._data + key

    # -- RPC plumbing ----------------------------------------------------------
    async def _stub(self, i: int) -> Any:
        client = self._clients[i]
        if client is None:
            host, port = self.endpoints[i]
            backoff = self.options.reconnect_backoff_max_ms
            client = aetcd.Client(
                host,
                port,
                options={
                    "grpc.max_receive_message_length": self.options.max_message_bytes,
                    "grpc.max_send_message_length": self.options.max_message_bytes,
                    "grpc.initial_reconnect_backoff_ms": min(100, backoff),
                    "grpc.min_reconnect_backoff_ms": min(100, backoff),
                    "grpc.max_reconnect_backoff_ms": backoff,
                },
            )
            self._clients[i] = client
        await client.connect()  # lazy: creates the channel once; no I/O yet
        return client.kvstub

    async def _attempt(self, method: str, req: Any, deadline: float) -> Any:
        """One RPC on the current member; failures worth another try raise _Retryable."""
        if self._closed:
            raise ChainfsError(Code.EBADF, f"etcd store {self.url} is closed")
        # At least a short try even at the deadline, so the error says what failed.
        remaining = max(deadline - time.monotonic(), 0.05)
        timeout = min(self.options.request_timeout_ms / 1000.0, remaining)
        stub = await self._stub(self._current)
        try:
            resp = await getattr(stub, method)(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _classify(e, method) from None
        self._known_revision = max(self._known_revision, int(resp.header.revision))
        return resp

    def _fail_over(self) -> None:
        if len(self.endpoints) > 1:
            self._current = (self._current + 1) % len(self.endpoints)
            self.stats["failovers"] += 1

    async def _pause(self, delay_ms: float) -> float:
        await asyncio.sleep(random.uniform(delay_ms / 2, delay_ms) / 1000.0)
        return min(delay_ms * 2, self.options.retry_max_ms)

    def _unavailable(self, what: str, last: str) -> ChainfsError:
        return ChainfsError(
            Code.UNAVAILABLE,
            f"etcd cluster unreachable at {self.endpoints_str} ({what}; gave up after "
            f"{self.options.op_timeout_ms} ms): {last}",
        )

    async def _read(self, req: Any, method: str = "Range") -> Any:
        """A Range (or a Txn that only reads), retried on other members until
        op_timeout_ms."""
        deadline = time.monotonic() + self.options.op_timeout_ms / 1000.0
        delay = float(self.options.retry_initial_ms)
        while True:
            try:
                resp = await self._attempt(method, req, deadline)
                self.stats["reads"] += 1
                return resp
            except _Retryable as e:
                if time.monotonic() >= deadline:
                    raise self._unavailable("read", str(e)) from None
                self._fail_over()
                delay = await self._pause(delay)

    # -- transactions ----------------------------------------------------------
    async def _begin(self) -> Snapshot:
        if self._closed:
            raise ChainfsError(Code.EBADF, f"etcd store {self.url} is closed")
        if self._known_revision == 0:
            # Once per store: learn the current revision (the floor of snapshots).
            await self._read(rpc.RangeRequest(key=self._data, keys_only=True, limit=1))
        return _EtcdSnapshot(self)

    async def _begin_reading(
        self, keys: list[bytes], ranges: list[PrefetchRange] | None = None
    ) -> Snapshot:
        if not keys and not ranges:
            return await self._begin()
        if self._closed:
            raise ChainfsError(Code.EBADF, f"etcd store {self.url} is closed")
        # Open first: the snapshot's floor, then its revision, hold compaction back.
        snap = _EtcdSnapshot(self)
        try:
            await snap.read_ahead(keys, ranges or [])
        except BaseException:
            snap.close()
            raise
        return snap

    async def _compares(self, snap: _EtcdSnapshot, tx: Transaction) -> list[Any]:
        reads = tx.reads
        if not reads:
            return []
        # Keys in the read set that were never fetched (add_read_conflict_key,
        # or read inside our own clear_range): learn their mod_revision at the
        # snapshot, which is the begin-time floor if nothing was read at all.
        unseen = sorted(reads.keys - snap.mods.keys())
        if unseen and snap.revision is None and snap.floor > 0:
            snap.revision = snap.floor
        for k in unseen:
            await snap.get(k)
        assert snap.revision is not None
        compares: list[Any] = []
        ranges = sorted(reads.ranges)
        for k, mod in sorted(snap.mods.items()):
            if k in reads.keys or any(b <= k < e for b, e in ranges):
                compares.append(
                    rpc.Compare(key=self._dkey(k), target=_MOD, result=_EQUAL, mod_revision=mod)
                )
        for b, e in merge_ranges(ranges):
            compares.append(
                rpc.Compare(
                    key=self._dkey(b),
                    range_end=self._dkey(e),
                    target=_MOD,
                    result=_LESS,
                    mod_revision=snap.revision + 1,
                )
            )
        return compares

    def _write_ops(self, tx: Transaction) -> list[Any]:
        puts = sorted(k for k, v in tx.writes.items() if v is not None)
        ops: list[Any] = []
        cleared = merge_ranges(sorted(tx.cleared_ranges))
        for b, e in cleared:
            for pb, pe in _split_around(b, e, puts):
                ops.append(
                    rpc.RequestOp(
                        request_delete_range=rpc.DeleteRangeRequest(
                            key=self._dkey(pb), range_end=self._dkey(pe)
                        )
                    )
                )
        for k, v in tx.writes.items():
            if v is None:
                if not any(b <= k < e for b, e in cleared):
                    ops.append(
                        rpc.RequestOp(
                            request_delete_range=rpc.DeleteRangeRequest(key=self._dkey(k))
                        )
                    )
            else:
                ops.append(rpc.RequestOp(request_put=rpc.PutRequest(key=self._dkey(k), value=v)))
        return ops

    async def _commit(self, snapshot: Snapshot, tx: Transaction) -> None:
        assert isinstance(snapshot, _EtcdSnapshot)
        compares = await self._compares(snapshot, tx)
        ops = self._write_ops(tx)
        n_ops = len(compares) + len(ops) + 2  # + marker compare and put
        if n_ops > self.options.max_txn_ops:
            raise ChainfsError(
                Code.E2BIG,
                f"transaction needs {n_ops} etcd txn ops (keys read + keys seen in ranges + "
                f"ranges + writes), more than max_txn_ops={self.options.max_txn_ops}",
            )
        async with self._inflight:
            slot = self._slots.pop() if self._slots else self._new_slot()
            known = False
            try:
                succeeded = await self._commit_once(slot, compares, ops)
                known = True
            finally:
                if known:
                    self._slots.append(slot)  # else: its state is unknown; never reuse it
        if not succeeded:
            raise TxnConflict()
        self._maybe_compact()

    # -- compaction --------------------------------------------------------------
    def _maybe_compact(self) -> None:
        """After a commit (writes are what grow history): start a compaction if one is due."""
        interval_ms = self.options.compact_interval_ms
        now = time.monotonic()
        if interval_ms == 0 or now < self._compact_next_s:
            return
        if self._compact_task is not None and not self._compact_task.done():
            return
        self._compact_next_s = now + interval_ms / 1000.0
        target, self._compact_mark = self._compact_mark, self._known_revision
        for snap in self._open_snapshots:
            if 0 < snap.oldest_revision < target:
                target = snap.oldest_revision
        if target > self.compacted_revision:
            self._compact_task = asyncio.create_task(self._compact(target))

    async def _compact(self, revision: int) -> None:
        """Compact etcd's history below ``revision`` (one attempt; the next tick retries)."""
        deadline = time.monotonic() + self.options.request_timeout_ms / 1000.0
        try:
            await self._attempt("Compact", rpc.CompactionRequest(revision=revision), deadline)
        except TxnTooOld:
            pass  # another store compacted further already: nothing left to do here
        except (_Retryable, ChainfsError) as e:
            log.info("etcd store %s: compaction at revision %d failed: %s", self.url, revision, e)
            return
        self.compacted_revision = max(self.compacted_revision, revision)
        self.stats["compactions"] += 1

    def _new_slot(self) -> _Slot:
        self._used_markers = True
        return _Slot(self._markers + str(next(self._slot_numbers)).encode(), 0)

    def _marker_compare(self, slot: _Slot) -> Any:
        return rpc.Compare(key=slot.key, target=_MOD, result=_EQUAL, mod_revision=slot.mod_revision)

    async def _commit_once(self, slot: _Slot, compares: list[Any], ops: list[Any]) -> bool:
        """Apply the Txn exactly once; True if its compares held (it committed)."""
        token = b"c%d" % next(self._tokens)
        deadline = time.monotonic() + self.options.op_timeout_ms / 1000.0
        delay = float(self.options.retry_initial_ms)
        req = rpc.TxnRequest(
            compare=[*compares, self._marker_compare(slot)],
            success=[*ops, rpc.RequestOp(request_put=rpc.PutRequest(key=slot.key, value=token))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=slot.key))],
        )
        while True:
            try:
                resp = await self._attempt("Txn", req, deadline)
            except _Retryable as e:
                if time.monotonic() >= deadline:
                    raise self._unavailable("commit, outcome unknown", str(e)) from None
                self._fail_over()
                delay = await self._pause(delay)
                if await self._fence(slot, token, deadline):
                    return True
                # The lost Txn can no longer apply: resend it against the fenced marker.
                req.compare[-1].CopyFrom(self._marker_compare(slot))
                continue
            if resp.succeeded:
                slot.mod_revision = int(resp.header.revision)
                return True
            kvs = resp.responses[0].response_range.kvs
            marker_mod = int(kvs[0].mod_revision) if kvs else 0
            if marker_mod != slot.mod_revision:
                raise ChainfsError(
                    Code.INTERNAL,
                    f"etcd commit marker {slot.key!r} changed under us "
                    f"({slot.mod_revision} -> {marker_mod})",
                )
            return False

    async def _fence(self, slot: _Slot, token: bytes, deadline: float) -> bool:
        """After a Txn with unknown outcome: True if it applied, else make sure it never will."""
        self.stats["fences"] += 1
        fence = b"f" + token
        req = rpc.TxnRequest(
            compare=[self._marker_compare(slot)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=slot.key, value=fence))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=slot.key))],
        )
        delay = float(self.options.retry_initial_ms)
        while True:
            try:
                resp = await self._attempt("Txn", req, deadline)
                break
            except _Retryable as e:
                if time.monotonic() >= deadline:
                    raise self._unavailable("commit, outcome unknown", str(e)) from None
                self._fail_over()
                delay = await self._pause(delay)
        if resp.succeeded:
            slot.mod_revision = int(resp.header.revision)
            return False
        kvs = resp.responses[0].response_range.kvs
        value = bytes(kvs[0].value) if kvs else b""
        if value in (token, fence):  # ours, or our own earlier fence that applied
            slot.mod_revision = int(kvs[0].mod_revision)
            return value == token
        raise ChainfsError(
            Code.INTERNAL, f"etcd commit marker {slot.key!r} holds {value!r}, not ours"
        )

    async def close(self) -> None:
        """Drop this store's commit markers (best effort, bounded) and the channels."""
        if self._closed:
            return
        if self._compact_task is not None:
            self._compact_task.cancel()
            await asyncio.gather(self._compact_task, return_exceptions=True)
        if self._used_markers:
            try:
                deadline = time.monotonic() + self.options.request_timeout_ms / 1000.0
                await self._attempt(
                    "DeleteRange",
                    rpc.DeleteRangeRequest(key=self._markers, range_end=prefix_end(self._markers)),
                    deadline,
                )
            except (_Retryable, ChainfsError) as e:
                # Unreachable cluster: this store's few small marker keys stay behind.
                log.warning("etcd store %s: commit markers not removed at close: %s", self.url, e)
        self._closed = True
        for client in self._clients:
            if client is not None:
                await client.close()
        self._clients = [None] * len(self.endpoints)


def _split_around(begin: bytes, end: bytes, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """[begin, end) minus the single keys in sorted ``keys``."""
    out: list[tuple[bytes, bytes]] = []
    lo = begin
    for k in keys:
        if k < begin:
            continue
        if k >= end:
            break
        if lo < k:
            out.append((lo, k))
        lo = k + b"\x00"
    if lo < end:
        out.append((lo, end))
    return out
