"""Transactions per second of each KV backend under small read-modify-write load.

    .venv/bin/python bench/kv_bench.py [--seconds 3] [--concurrency 1,8,64]
        [--backends memory,rocksdb,rocksdb-nogroup,etcd] [--keys 10000] [--json OUT]

Each of N asyncio tasks loops: read one random key of --keys, write it back
incremented (one transaction). ``rocksdb-nogroup`` is rocksdb with
max_batch_txns=1: one synced WriteBatch per transaction, i.e. without group
commit, for comparison at the same concurrency. etcd is one real member on
loopback (started here). Prints a Markdown table and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chainfs.kv as kv
from chainfs.kv import KVStore, RetryPolicy, Transaction
from chainfs.testing.etcd import EtcdCluster


async def run_cell(
    store: KVStore, concurrency: int, seconds: float, keys: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    before = dict(store.stats)

    async def incr(tx: Transaction, key: bytes) -> None:
        v = await tx.get(key)
        tx.set(key, b"%d" % (int(v or b"0") + 1))

    async def task() -> int:
        n = 0
        while time.monotonic() < stop_at:
            key = b"bench/%08d" % rng.randrange(keys)
            t0 = time.perf_counter()
            await store.transact(lambda tx, key=key: incr(tx, key))
            latencies.append(time.perf_counter() - t0)
            n += 1
        return n

    start = time.monotonic()
    counts = await asyncio.gather(*(task() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    done = sum(counts)
    stats = {k: store.stats.get(k, 0) - before.get(k, 0) for k in store.stats}
    latencies.sort()
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "txns": done,
        "seconds": round(elapsed, 2),
        "tps": round(done / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "retries": stats.get("retries", 0),
    }
    if stats.get("batches"):
        row["txns_per_sync"] = round(stats["batched_txns"] / stats["batches"], 1)
    return row


async def bench_backend(
    name: str, url: str, args: argparse.Namespace, cleanup: Callable[[], None] | None = None
) -> list[dict[str, Any]]:
    rows = []
    store = kv.open(url, RetryPolicy(max_attempts=1000, backoff_max_ms=50))
    try:
        for c in args.concurrency:
            row = await run_cell(store, c, args.seconds, args.keys, seed=c)
            row["backend"] = name
            rows.append(row)
            print(f"  {name:16} c={c:<4} {row['tps']:>8} txn/s", file=sys.stderr)
    finally:
        await store.close()
        if cleanup:
            cleanup()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["backend", "concurrency", "tps", "p50_ms", "p99_ms", "retries", "txns_per_sync"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kv-bench-", dir=args.dir) as tmp:
        for backend in args.backends:
            if backend == "memory":
                rows += await bench_backend("memory", "memory://", args)
            elif backend == "rocksdb":
                rows += await bench_backend("rocksdb", f"rocksdb://{tmp}/rocks", args)
            elif backend == "rocksdb-nogroup":
                url = f"rocksdb://{tmp}/rocks-nogroup?max_batch_txns=1&max_pending_txns=1"
                rows += await bench_backend("rocksdb-nogroup", url, args)
            elif backend == "etcd":
                cluster = EtcdCluster(Path(tmp) / "etcd", members=1)
                try:
                    rows += await bench_backend("etcd (1 member)", cluster.url("bench"), args)
                finally:
                    cluster.stop()
            else:
                raise SystemExit(f"unknown backend {backend!r}")
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="per cell")
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 64],
        help="comma-separated task counts",
    )
    p.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=["memory", "rocksdb", "rocksdb-nogroup", "etcd"],
    )
    p.add_argument("--keys", type=int, default=10_000, help="key space (low contention)")
    p.add_argument("--dir", default=None, help="where the rocksdb/etcd data go (default: tmp)")
    p.add_argument("--json", default=None, help="also write rows as JSON here")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop, as services do")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if args.uvloop:
        import uvloop

        uvloop.install()
    rows = asyncio.run(main(args))
    print(table(rows))
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
