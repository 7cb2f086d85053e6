"""postgresql backend specifics against a real PostgreSQL server: schemas,
URLs, an unreachable server, and exactly-once commits when a commit's reply
is lost (after it landed, before it landed, and a backend killed mid-commit)."""

from __future__ import annotations

import asyncio
import errno
import itertools
from typing import Any

import asyncpg
import pytest

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.kv.postgres import _SNAPSHOT_AND_GET, PostgresStore, _Conn, _Pending
from chainfs.local.postgres import PostgresServer, _free_port
from tests.unit.kv.conftest import PG_DATABASE

pytestmark = pytest.mark.timeout(60)
_schemas = itertools.count()


def _url(pg: PostgresServer, query: str = "") -> str:
    return pg.url(PG_DATABASE, schema=f"p{next(_schemas)}", query=query)


def _open(pg: PostgresServer, query: str = "") -> PostgresStore:
    store = kv.open(_url(pg, query))
    assert isinstance(store, PostgresStore)
    return store


async def _increment(store: PostgresStore, key: bytes = b"n") -> None:
    async def fn(tx: Transaction) -> None:
        tx.set(key, b"%d" % (int(await tx.get(key) or b"0") + 1))

    await store.transact(fn)


async def _slot_rows(store: PostgresStore) -> int:
    conn = await store._pool.acquire()
    try:
        return int(await conn.raw.fetchval("SELECT count(*) FROM commit_slots"))
    finally:
        store._pool.release(conn)


async def test_schemas_are_separate_stores_and_close_drops_commit_slots(
    postgres_server: PostgresServer,
) -> None:
    a, b = _open(postgres_server), _open(postgres_server)
    try:
        await a.set(b"k", b"from a")
        assert await b.get(b"k") is None
        await b.set(b"k", b"from b")
        assert await a.get(b"k") == b"from a"
        assert await _slot_rows(a) == 1
    finally:
        await a.close()
        await b.close()
    again = PostgresStore.from_url(a.url)
    try:
        assert await again.get(b"k") == b"from a"  # durable, and the schema is reused
        assert await _slot_rows(again) == 0  # closing removed a's commit slot
    finally:
        await again.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@127.0.0.1:5432/db?schema=Bad-Name",
        "postgresql://u@127.0.0.1:5432/db?pool_size=0",
        "postgresql://u@127.0.0.1:5432/db?nosuch=1",
        "postgresql://u@127.0.0.1:5432/",
        "postgresql://u@127.0.0.1:99999/db",
        "postgresql://u@127.0.0.1:5432/db/extra",
    ],
)
def test_bad_urls_are_einval(url: str) -> None:
    with pytest.raises(ChainfsError) as e:
        kv.open(url)
    assert e.value.errno == errno.EINVAL


async def test_unreachable_server_is_unavailable_after_op_timeout() -> None:
    port = _free_port()  # nothing listens there
    store = kv.open(f"postgresql://u@127.0.0.1:{port}/db?op_timeout_ms=300&request_timeout_ms=100")
    try:
        with pytest.raises(ChainfsError) as e:
            await store.get(b"k")
        assert e.value.code == Code.UNAVAILABLE
        assert str(port) in str(e.value)
    finally:
        await store.close()


class _LosesReplies(PostgresStore):
    """Breaks the connection around the first ``lose`` commits, after or before sending."""

    def __init__(self, *args: Any, lose: int, landed: bool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lose, self.landed = lose, landed

    async def _send_commit(self, conn: _Conn, args: list[Any], token: str) -> bool:
        if self.lose <= 0:
            return await super()._send_commit(conn, args, token)
        self.lose -= 1
        if self.landed:
            assert await super()._send_commit(conn, args, token)
        conn.raw.terminate()
        raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")


@pytest.mark.parametrize("landed", [True, False], ids=["reply-lost", "request-lost"])
async def test_lost_commit_replies_apply_exactly_once(
    postgres_server: PostgresServer, landed: bool
) -> None:
    plain = _open(postgres_server)
    store = _LosesReplies(
        plain.host,
        plain.port,
        plain.user,
        plain.database,
        options=plain.options,
        lose=5,
        landed=landed,
    )
    try:
        for _ in range(8):
            await _increment(store)
        assert await store.get(b"n") == b"8"  # each increment once: none lost, none doubled
        assert store.stats["lost_replies"] == 5
        assert store.stats["conflicts"] == 0
    finally:
        await store.close()
        await plain.close()


async def test_backend_killed_mid_commit_is_resolved_and_resent(
    postgres_server: PostgresServer,
) -> None:
    """A commit blocked on a row lock loses its backend; the store learns it did not
    land (the backend is gone) and sends it again."""
    store = _open(postgres_server)
    await store.set(b"n", b"0")
    blocker = await asyncpg.connect(
        host="127.0.0.1", port=postgres_server.port, user="chainfs", database=PG_DATABASE
    )
    try:
        tr = blocker.transaction()
        await tr.start()
        await blocker.execute(f"SELECT * FROM {store.options.schema}.kv WHERE key = 'n' FOR UPDATE")
        committing = asyncio.create_task(_increment(store))
        victim = None
        for _ in range(500):  # until the commit waits on our lock
            # Activity is read once per transaction unless its snapshot is dropped.
            await blocker.execute("SELECT pg_stat_clear_snapshot()")
            victim = await blocker.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%txn_commit%'"
            )
            if victim:
                break
            await asyncio.sleep(0.01)
        assert victim, "the commit never blocked on the row lock"
        assert await blocker.fetchval("SELECT pg_terminate_backend($1)", victim)
        await tr.rollback()
        await asyncio.wait_for(committing, 30)
    finally:
        await blocker.close()
    try:
        assert await store.get(b"n") == b"1"
        assert store.stats["lost_replies"] == 1
    finally:
        await store.close()


async def test_transactions_inside_transactions_do_not_starve_the_pool(
    postgres_server: PostgresServer,
) -> None:
    """More outer transactions than pooled connections, each running an inner
    transaction from its function (as meta's inode allocator does)."""
    store = _open(postgres_server, "pool_size=2&op_timeout_ms=5000&request_timeout_ms=2000")
    try:
        runs = [0]

        async def outer(tx: Transaction, i: int) -> None:
            runs[0] += 1  # a retried outer transaction runs its inner one again
            await tx.get(b"outer/%d" % i)
            await _increment(store, b"inner")
            tx.set(b"outer/%d" % i, b"done")

        await asyncio.gather(*(store.transact(lambda tx, i=i: outer(tx, i)) for i in range(8)))
        assert await store.get(b"inner") == b"%d" % runs[0]
        assert all([await store.get(b"outer/%d" % i) == b"done" for i in range(8)])
    finally:
        await store.close()


async def test_begin_reads_keys_through_the_index_even_on_a_small_table(
    postgres_server: PostgresServer,
) -> None:
    """A plan made while the table is small (a prepared statement's generic plan
    is kept) must not scan the whole table once it has grown."""
    store = _open(postgres_server)
    try:
        for i in range(20):
            await store.set(b"k%d" % i, b"v")
        conn = await store._pool.acquire()
        try:
            await conn.raw.execute("ANALYZE kv")  # as autovacuum does, while the table is small
            await conn.raw.execute("SET plan_cache_mode = force_generic_plan")
            rows = await conn.raw.fetch("EXPLAIN " + _SNAPSHOT_AND_GET, [b"k"])
        finally:
            store._pool.discard(conn)
        plan = "\n".join(r[0] for r in rows)
        assert "Index" in plan and "Seq Scan on kv" not in plan, plan
    finally:
        await store.close()


class _HoldsCommits(PostgresStore):
    """Keeps each transaction's commit arguments instead of committing them,
    so a test can send chosen transactions as one group commit."""

    def __init__(self, *args: Any, lose: int = 0, landed: bool = True, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.held: list[list[Any]] = []
        self.lose, self.landed = lose, landed

    async def _commit_grouped(self, args: list[Any], snapshot_conn: _Conn | None) -> bool:
        if snapshot_conn is not None:
            self._pool.spawn_release(snapshot_conn)
        self.held.append(args)
        return True

    async def _send_batch(
        self, conn: _Conn, txns: list[list[Any]], slots: list[str], tokens: list[str]
    ) -> list[bool]:
        if self.lose <= 0:
            return await super()._send_batch(conn, txns, slots, tokens)
        self.lose -= 1
        if self.landed:
            await super()._send_batch(conn, txns, slots, tokens)
        conn.raw.terminate()
        raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")

    async def group_commit(self) -> list[bool]:
        batch = [_Pending(a, asyncio.get_running_loop().create_future()) for a in self.held]
        self.held = []
        await self._commit_batch(batch)
        return [p.outcome.result() for p in batch]


def _holding(pg: PostgresServer, **kw: Any) -> _HoldsCommits:
    plain = PostgresStore.from_url(_url(pg))
    return _HoldsCommits(
        plain.host, plain.port, plain.user, plain.database, options=plain.options, **kw
    )


async def _hold_three(store: _HoldsCommits) -> None:
    """Three transactions from one state: the second read what the first writes."""
    await _setup_a(store)

    async def first(tx: Transaction) -> None:
        tx.set(b"a", b"%d" % (int(await tx.get(b"a") or b"0") + 1))

    async def second(tx: Transaction) -> None:
        tx.set(b"b", b"saw a=" + (await tx.get(b"a") or b""))

    async def third(tx: Transaction) -> None:
        tx.set(b"c", b"%d" % (int(await tx.get(b"c") or b"0") + 1))

    for fn in (first, second, third):
        await store.transact(fn)


async def _setup_a(store: _HoldsCommits) -> None:
    store.held = []
    await store.transact(lambda tx: _set(tx, b"a", b"0"))
    assert await store.group_commit() == [True]


async def _set(tx: Transaction, key: bytes, value: bytes) -> None:
    tx.set(key, value)


async def test_group_commit_gives_each_transaction_its_own_outcome(
    postgres_server: PostgresServer,
) -> None:
    store = _holding(postgres_server)
    try:
        await _hold_three(store)
        # One PostgreSQL transaction: the second conflicts with the first (it read
        # a before the first's write), the first and third commit all the same.
        assert await store.group_commit() == [True, False, True]
        assert store.stats["commit_batches"] == 1
        assert await store.get(b"a") == b"1"
        assert await store.get(b"b") is None  # a conflicted transaction wrote nothing
        assert await store.get(b"c") == b"1"
    finally:
        await store.close()


@pytest.mark.parametrize("landed", [True, False], ids=["reply-lost", "request-lost"])
async def test_lost_group_commit_reply_resolves_each_transaction_once(
    postgres_server: PostgresServer, landed: bool
) -> None:
    store = _holding(postgres_server, lose=1, landed=landed)
    try:
        await _hold_three(store)
        outcomes = await store.group_commit()
        assert store.stats["lost_replies"] == 1
        assert await store.get(b"a") == b"1"  # applied once: not lost, not doubled
        assert await store.get(b"c") == b"1"
        if landed:
            # The first and third landed (their slots say so); the second, resent
            # alone, conflicts again with what landed.
            assert outcomes == [True, False, True]
            assert await store.get(b"b") is None
        else:
            # Nothing landed: each was resent alone; the second commits if it
            # went before the first (a serial order where it saw a=0).
            assert outcomes[0] and outcomes[2]
            assert await store.get(b"b") == (b"saw a=0" if outcomes[1] else None)
    finally:
        await store.close()


async def test_concurrent_transactions_under_group_commit_stay_serializable(
    postgres_server: PostgresServer,
) -> None:
    """Many increments of one counter at once: commits go in groups, the
    conflicting ones retry, and every increment lands exactly once."""
    store = _open(postgres_server, "group_commit_max_txns=8")
    try:

        async def bump(i: int) -> None:
            async def fn(tx: Transaction) -> None:
                n = int(await tx.get(b"n") or b"0")
                tx.set(b"n", b"%d" % (n + 1))
                tx.set(b"mine/%d" % i, b"%d" % n)  # the count this increment saw

            await store.transact(fn, prefetch=[b"n"])

        await asyncio.gather(*(bump(i) for i in range(32)))
        assert await store.get(b"n") == b"32"
        seen = sorted([int(await store.get(b"mine/%d" % i) or b"-1") for i in range(32)])
        assert seen == list(range(32))  # a serial order: each saw a different count
        assert store.stats["batched_commits"] > 0
    finally:
        await store.close()


async def test_a_local_server_is_reached_through_its_unix_socket(
    postgres_server: PostgresServer,
) -> None:
    store = _open(postgres_server)
    try:
        conn = await store._pool.acquire()
        try:
            assert await conn.raw.fetchval("SELECT inet_client_addr()") is None  # not TCP
        finally:
            store._pool.release(conn)
    finally:
        await store.close()


def test_a_socket_path_too_long_for_unix_sockets_falls_back_to_tcp(tmp_path: Any) -> None:
    pg = PostgresServer(tmp_path / ("d" * 120), start=False)
    pg.port = 5432
    url = pg.url(PG_DATABASE)
    assert "host=" not in url and "127.0.0.1:5432" in url
