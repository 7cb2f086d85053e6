"""kill -9 the PostgreSQL server under concurrent transactions, restart it on the
same data directory: every acknowledged commit is there, and the bank's total
(money moved between accounts, never made or lost) holds."""

from __future__ import annotations

import asyncio
import functools
import random
from pathlib import Path

import pytest

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import RetryPolicy, Transaction
from chainfs.local.postgres import PostgresServer, find_bindir
from tests.conftest import require

ACCOUNTS = 12
START_BALANCE = 1000
WORKERS = 8
TRANSFERS_PER_WORKER = 60
KILL_AFTER_ACKS = 120  # crash once this many transfers were acknowledged
SEED = 20261204
RETRY = RetryPolicy(max_attempts=200, backoff_initial_ms=1.0, backoff_max_ms=50.0)


def _account(i: int) -> bytes:
    return b"acct/%02d" % i


async def _open_bank(url: str) -> None:
    store = kv.open(url, RETRY)
    try:

        async def fn(tx: Transaction) -> None:
            for i in range(ACCOUNTS):
                tx.set(_account(i), b"%d" % START_BALANCE)

        await store.transact(fn)
    finally:
        await store.close()


async def _transfer(src: int, dst: int, amount: int, receipt: bytes, tx: Transaction) -> None:
    a, b = await tx.get(_account(src)), await tx.get(_account(dst))
    assert a is not None and b is not None
    tx.set(_account(src), b"%d" % (int(a) - amount))
    tx.set(_account(dst), b"%d" % (int(b) + amount))
    tx.set(receipt, b"%d:%d:%d" % (src, dst, amount))


async def _workload(url: str, server: PostgresServer) -> tuple[set[bytes], set[bytes], int]:
    """Transfers from WORKERS tasks, with a kill -9 and restart in the middle.
    Returns the acknowledged receipts, the ones whose outcome was reported
    unknown, and the store's count of lost commit replies."""
    store = kv.open(url + "&op_timeout_ms=60000", RETRY)
    acked: set[bytes] = set()
    unknown: set[bytes] = set()
    enough = asyncio.Event()

    async def worker(w: int) -> None:
        rng = random.Random(SEED + w)
        for n in range(TRANSFERS_PER_WORKER):
            src, dst = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 50)
            receipt = b"receipt/%d/%03d" % (w, n)
            try:
                await store.transact(functools.partial(_transfer, src, dst, amount, receipt))
            except ChainfsError as e:
                assert e.code == Code.UNAVAILABLE, e
                unknown.add(receipt)
                continue
            acked.add(receipt)
            if len(acked) >= KILL_AFTER_ACKS:
                enough.set()

    async def crash() -> None:
        await enough.wait()
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.restart)

    try:
        await asyncio.gather(crash(), *(worker(w) for w in range(WORKERS)))
        return acked, unknown, store.stats["lost_replies"]
    finally:
        await store.close()


async def _contents(url: str) -> dict[bytes, bytes]:
    store = kv.open(url, RETRY)
    try:
        rows = await store.transact(lambda tx: tx.get_range(b"", b"\xff"), read_only=True)
        return dict(rows)
    finally:
        await store.close()


@pytest.mark.timeout(240)
def test_kill9_postgres_under_transactions_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    require("postgresql", find_bindir() is not None, "deploy/bootstrap.sh installs it")
    with PostgresServer(tmp_path / "pg") as server:
        server.create_database("bank")
        url = server.url("bank", schema="bank")
        asyncio.run(_open_bank(url))
        acked, unknown, lost_replies = asyncio.run(_workload(url, server))
        assert len(acked) >= KILL_AFTER_ACKS  # the crash happened mid-workload
        server.kill()  # and once more, after the last acknowledgement
        server.restart()
        data = asyncio.run(_contents(url))
    receipts = {k for k in data if k.startswith(b"receipt/")}
    assert acked <= receipts, f"acknowledged but lost: {sorted(acked - receipts)[:5]}"
    assert receipts <= acked | unknown, "a commit landed that was reported as failed"
    balances = [int(data[_account(i)]) for i in range(ACCOUNTS)]
    assert sum(balances) == ACCOUNTS * START_BALANCE
    # Every landed receipt's transfer, replayed, gives exactly these balances.
    replay = [START_BALANCE] * ACCOUNTS
    for k in receipts:
        src, dst, amount = (int(x) for x in data[k].split(b":"))
        replay[src] -= amount
        replay[dst] += amount
    assert replay == balances, f"balances do not match the receipts ({lost_replies=})"
