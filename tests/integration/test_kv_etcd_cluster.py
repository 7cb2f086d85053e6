"""A 3-member etcd cluster loses its Raft leader (the member our client talks
to) in the middle of a read-modify-write workload: every acknowledged
transaction must survive, exactly once, and the restarted member must serve
the same data."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError
from chainfs.kv import KVStore, RetryPolicy, Transaction
from chainfs.testing.etcd import EtcdCluster
from tests.conftest import require_binary

WORKERS = 8
OPTIONS = "?request_timeout_ms=1000&op_timeout_ms=20000"


async def _wait_for(pred: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _contents(store: KVStore) -> tuple[dict[int, int], dict[int, set[int]]]:
    rows = await store.transact(lambda tx: tx.get_range(b"", b"\xff"), read_only=True)
    counts: dict[int, int] = {}
    items: dict[int, set[int]] = {w: set() for w in range(WORKERS)}
    for k, v in rows:
        parts = k.split(b"/")
        if parts[0] == b"count":
            counts[int(parts[1])] = int(v)
        else:
            items[int(parts[1])].add(int(parts[2]))
    return counts, items


@pytest.mark.timeout(150)
async def test_leader_killed_mid_workload_loses_no_commit(tmp_path: Path) -> None:
    require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", members=3) as cluster:
        leader = cluster.leader_index()
        order = [leader] + [i for i in range(3) if i != leader]
        endpoints = ",".join(cluster.members[i].endpoint for i in order)
        store = kv.open(f"etcd://{endpoints}/chainfs{OPTIONS}", RetryPolicy(max_attempts=200))
        acked: dict[int, list[int]] = {w: [] for w in range(WORKERS)}
        errors: list[ChainfsError] = []
        stop = asyncio.Event()

        async def worker(w: int) -> None:
            i = 0
            while not stop.is_set():

                async def fn(tx: Transaction, i: int = i) -> None:
                    n = int(await tx.get(b"count/%d" % w) or b"0")
                    tx.set(b"count/%d" % w, b"%d" % (n + 1))
                    tx.set(b"item/%d/%06d" % (w, i), b"%d" % n)

                try:
                    await store.transact(fn)
                    acked[w].append(i)
                except ChainfsError as e:
                    errors.append(e)
                i += 1

        def total() -> int:
            return sum(len(v) for v in acked.values())

        tasks = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
        try:
            await _wait_for(lambda: total() >= 150, "commits before the kill")
            await asyncio.to_thread(cluster.kill, leader)
            at_kill = total()
            await _wait_for(lambda: total() >= at_kill + 150, "commits after the kill")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await store.close()
        assert not errors, f"transactions failed during failover: {errors[:3]}"
        assert store.stats["failovers"] >= 1

        survivors = ",".join(m.endpoint for i, m in enumerate(cluster.members) if i != leader)
        async with kv.open(f"etcd://{survivors}/chainfs{OPTIONS}") as checker:
            counts, items = await _contents(checker)
        for w in range(WORKERS):
            assert items[w] == set(acked[w]), f"worker {w}: acked and stored differ"
            assert counts[w] == len(acked[w])  # every commit applied exactly once

        await asyncio.to_thread(cluster.restart, leader)
        async with kv.open(
            f"etcd://{cluster.members[leader].endpoint}/chainfs{OPTIONS}"
        ) as rejoined:
            assert await _contents(rejoined) == (counts, items)
