"""Concurrent transactions on every backend, checked against a sequential model.

Hypothesis generates a handful of transactions (reads, range scans, writes of
unique values, clears, clear_ranges) that run as concurrent asyncio tasks. The
committed ones must be explainable by SOME serial order: replayed one after
another on a plain dict, each must read exactly what it read on the store, and
the store's final contents must be the dict's.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import RetryPolicy, Transaction
from tests.unit.kv.conftest import UrlFactory

pytestmark = pytest.mark.timeout(120)

KEYS = [b"k%d" % i for i in range(6)]
RETRY = RetryPolicy(max_attempts=100, backoff_initial_ms=0.2, backoff_max_ms=5.0)
EXAMPLES = {"memory": 40, "rocksdb": 30, "etcd": 15, "postgresql": 15}

key = st.sampled_from(KEYS)
bound = st.sampled_from([b"k", *KEYS, b"k9"])
op = st.one_of(
    st.tuples(st.just("get"), key),
    st.tuples(st.just("range"), bound, bound, st.integers(0, 3), st.booleans()),
    st.tuples(st.just("set"), key),
    st.tuples(st.just("clear"), key),
    st.tuples(st.just("clear_range"), bound, bound),
)
txn = st.lists(op, min_size=1, max_size=6)

Op = tuple[Any, ...]


def _value(t: int, i: int) -> bytes:
    return b"t%d.%d" % (t, i)


async def _run(tx: Transaction, t: int, ops: list[Op], rng: random.Random) -> list[Any]:
    """Run one transaction's ops on the store; returns what its reads saw."""
    seen: list[Any] = []
    for i, o in enumerate(ops):
        if rng.random() < 0.7:
            await asyncio.sleep(0)  # let other transactions interleave
        if o[0] == "get":
            seen.append(await tx.get(o[1]))
        elif o[0] == "range":
            seen.append(await tx.get_range(o[1], o[2], limit=o[3], reverse=o[4]))
        elif o[0] == "set":
            tx.set(o[1], _value(t, i))
        elif o[0] == "clear":
            tx.clear(o[1])
        else:
            tx.clear_range(o[1], o[2])
    return seen


def _replay(state: dict[bytes, bytes], t: int, ops: list[Op]) -> tuple[dict, list[Any]]:
    """The same transaction applied to a plain dict, sequentially."""
    s = dict(state)
    seen: list[Any] = []
    for i, o in enumerate(ops):
        if o[0] == "get":
            seen.append(s.get(o[1]))
        elif o[0] == "range":
            _, b, e, limit, reverse = o
            ks = sorted((k for k in s if b <= k < e), reverse=reverse)
            if limit:
                ks = ks[:limit]
            seen.append([(k, s[k]) for k in ks])
        elif o[0] == "set":
            s[o[1]] = _value(t, i)
        elif o[0] == "clear":
            s.pop(o[1], None)
        else:
            for k in [k for k in s if o[1] <= k < o[2]]:
                del s[k]
    return s, seen


def find_serial_order(
    committed: dict[int, tuple[list[Op], list[Any]]], final: dict[bytes, bytes]
) -> list[int] | None:
    """Depth-first search for a serial order consistent with every read and the end state."""
    failed: set[tuple[frozenset[int], tuple]] = set()

    def search(state: dict[bytes, bytes], placed: frozenset[int], order: list[int]) -> bool:
        if len(placed) == len(committed):
            return state == final
        memo = (placed, tuple(sorted(state.items())))
        if memo in failed:
            return False
        for t, (ops, seen) in committed.items():
            if t in placed:
                continue
            after, replay_seen = _replay(state, t, ops)
            if replay_seen == seen:
                order.append(t)
                if search(after, placed | {t}, order):
                    return True
                order.pop()
        failed.add(memo)
        return False

    order: list[int] = []
    return order if search({}, frozenset(), order) else None


async def _scenario(url: str, txns: list[list[Op]], seed: int) -> None:
    store = kv.open(url, RETRY)
    try:
        rng = random.Random(seed)
        committed: dict[int, tuple[list[Op], list[Any]]] = {}

        async def one(t: int, ops: list[Op]) -> None:
            read_only = not any(o[0] in ("set", "clear", "clear_range") for o in ops)
            try:
                seen = await store.transact(lambda tx: _run(tx, t, ops, rng), read_only=read_only)
            except ChainfsError as e:
                assert e.code == Code.TXN_CONFLICT, e  # gave up: must leave no trace
                return
            committed[t] = (ops, seen)

        await asyncio.gather(*(one(t, ops) for t, ops in enumerate(txns)))
        final = dict(await store.transact(lambda tx: tx.get_range(b"", b"\xff"), read_only=True))
        order = find_serial_order(committed, final)
        assert order is not None, (
            f"no serial order explains {len(committed)} committed txns: "
            f"{committed!r}, final {final!r}"
        )
    finally:
        await store.close()


def test_concurrent_transactions_are_serializable(new_url: UrlFactory, backend: str) -> None:
    # One budget per backend: etcd examples cost real round trips.
    @given(txns=st.lists(txn, min_size=2, max_size=7), seed=st.integers(0, 2**32 - 1))
    @settings(
        deadline=None,
        max_examples=EXAMPLES[backend],
        suppress_health_check=[HealthCheck.too_slow],
    )
    def check(txns: list[list[Op]], seed: int) -> None:
        asyncio.run(_scenario(new_url(), txns, seed))

    check()


def test_checker_rejects_a_non_serializable_history() -> None:
    # Classic write skew: both read k0 and k1 absent, each writes one of them.
    t0 = ([("get", b"k0"), ("get", b"k1"), ("set", b"k0")], [None, None])
    t1 = ([("get", b"k0"), ("get", b"k1"), ("set", b"k1")], [None, None])
    final = {b"k0": _value(0, 2), b"k1": _value(1, 2)}
    assert find_serial_order({0: t0, 1: t1}, final) is None
    assert find_serial_order({0: t0}, {b"k0": _value(0, 2)}) == [0]


async def test_bank_transfers_keep_the_total(new_url: UrlFactory) -> None:
    store = kv.open(new_url(), RETRY)
    accounts = [b"acct/%d" % i for i in range(8)]
    start = 100
    try:

        async def init(tx: Transaction) -> None:
            for a in accounts:
                tx.set(a, b"%d" % start)

        await store.transact(init)
        rng = random.Random(7)
        audits: list[int] = []

        async def transfer(worker: int, n: int) -> None:
            src, dst = rng.sample(accounts, 2)
            amount = rng.randint(1, 60)

            async def fn(tx: Transaction) -> None:
                a = int(await tx.get(src) or b"0")
                await asyncio.sleep(0)
                b = int(await tx.get(dst) or b"0")
                if a >= amount:
                    tx.set(src, b"%d" % (a - amount))
                    tx.set(dst, b"%d" % (b + amount))
                    tx.set(b"log/%d/%d" % (worker, n), b"%s %s %d" % (src, dst, amount))

            await store.transact(fn)

        async def worker(w: int) -> None:
            for n in range(12):
                await transfer(w, n)

        async def auditor() -> None:
            for _ in range(10):
                rows = await store.transact(
                    lambda tx: tx.get_range(b"acct/", b"acct0"), read_only=True
                )
                balances = [int(v) for _, v in rows]
                assert all(b >= 0 for b in balances)
                audits.append(sum(balances))
                await asyncio.sleep(0)

        await asyncio.gather(*(worker(w) for w in range(6)), auditor(), auditor())
        assert audits and all(total == start * len(accounts) for total in audits)
        balances = {
            k: int(v)
            for k, v in await store.transact(
                lambda tx: tx.get_range(b"acct/", b"acct0"), read_only=True
            )
        }
        expected = dict.fromkeys(accounts, start)
        for _, entry in await store.transact(
            lambda tx: tx.get_range(b"log/", b"log0"), read_only=True
        ):
            src, dst, amount = entry.split()
            expected[src] -= int(amount)
            expected[dst] += int(amount)
        assert balances == expected
    finally:
        await store.close()
