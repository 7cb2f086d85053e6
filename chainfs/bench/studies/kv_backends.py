"""``chainfs bench kv``: transactions per second of each KV backend, then the
metadata rates of a meta server on each store.

Each of N asyncio tasks loops: read one random key of ``keys``, write it back
incremented (one transaction). ``rocksdb-nogroup`` is rocksdb with
max_batch_txns=1: one synced WriteBatch per transaction, i.e. without group
commit, for comparison at the same concurrency. etcd is one real member and
postgresql one real server on loopback (started here).

Then, for each store of ``meta_backends``, a LocalCluster with meta on that
store serves the ``meta-server`` study's create/stat/readdir phases (same
clients, files and depth for every store), and the table gives each rate
next to rocksdb's, the embedded default.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import chainfs.kv as kv
from chainfs.bench.cluster import EtcdCluster, LocalCluster, PostgresServer
from chainfs.bench.studies import Echo
from chainfs.bench.studies.meta_server import PHASES, chainfs_rates
from chainfs.common.errors import ChainfsError
from chainfs.kv import KVStore, RetryPolicy, Transaction

BACKENDS = ("memory", "rocksdb", "rocksdb-nogroup", "etcd", "postgresql")
META_BACKENDS = ("rocksdb", "etcd", "postgresql")
_RETRY = RetryPolicy(max_attempts=1000, backoff_max_ms=50)
_COLUMNS = ("backend", "concurrency", "tps", "p50_ms", "p99_ms", "retries", "txns_per_sync")


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
            await store.transact(functools.partial(incr, key=key))
            latencies.append(time.perf_counter() - t0)
            n += 1
        return n

    start = time.monotonic()
    done = sum(await asyncio.gather(*(task() for _ in range(concurrency))))
    elapsed = time.monotonic() - start
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


@contextlib.asynccontextmanager
async def _store(backend: str, tmp: Path) -> AsyncIterator[tuple[str, KVStore]]:
    """(label, open store) of ``backend``; closed (and its etcd stopped) afterwards."""
    server: EtcdCluster | PostgresServer | None = None
    if backend == "memory":
        label, url = backend, "memory://"
    elif backend == "rocksdb":
        label, url = backend, f"rocksdb://{tmp}/rocks"
    elif backend == "rocksdb-nogroup":
        label, url = backend, f"rocksdb://{tmp}/rocks-nogroup?max_batch_txns=1&max_pending_txns=1"
    elif backend == "postgresql":
        server = pg = PostgresServer(tmp / "postgres")
        pg.create_database("bench")
        label, url = "postgresql", pg.url("bench", schema="bench")
    else:
        server = etcd = EtcdCluster(tmp / "etcd", members=1)
        label, url = "etcd (1 member)", etcd.url("bench")
    try:
        store = kv.open(url, _RETRY)
        try:
            yield label, store
        finally:
            await store.close()
    finally:
        if server is not None:
            server.stop()


async def _measure(opts: dict[str, Any], backends: list[str], echo: Echo) -> list[dict[str, Any]]:
    concurrency = [int(x) for x in str(opts["concurrency"]).split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kv-bench-", dir=opts["data_dir"]) as tmp:
        for backend in backends:
            async with _store(backend, Path(tmp)) as (label, store):
                for c in concurrency:
                    row = await run_cell(store, c, opts["seconds"], opts["keys"], seed=c)
                    rows.append({"backend": label, **row})
                    echo(f"  {label:16} c={c:<4} {row['tps']:>8} txn/s")
    return rows


def _meta_rates_on(backend: str, opts: dict[str, Any], o: dict[str, Any]) -> dict[str, float]:
    """One LocalCluster with meta on ``backend``, measured by the meta-server study's clients."""
    with (
        tempfile.TemporaryDirectory(prefix="kv-meta-", dir=opts["data_dir"]) as tmp,
        LocalCluster(
            Path(tmp) / "c", storage_nodes=1, targets_per_node=1, replicas=1, kv=backend
        ) as cluster,
        cluster.admin_environment(),  # the client processes act as "admin"
    ):
        assert cluster.meta is not None
        return chainfs_rates("frame://" + cluster.meta.info["data_address"], o)


def _meta_rates(opts: dict[str, Any], backends: list[str], echo: Echo) -> dict[str, Any]:
    """Create/stat/readdir rates of one meta server on each store, one cluster at a time."""
    o = {
        "clients": opts["meta_clients"],
        "files": opts["meta_files"],
        "depth": opts["meta_depth"],
        "readdir_rounds": opts["meta_readdir_rounds"],
    }
    rates: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for backend in backends:
        try:
            rates[backend] = _meta_rates_on(backend, opts, o)
        except (ChainfsError, RuntimeError, TimeoutError) as e:
            errors[backend] = str(e)  # reported; the other stores are still measured
            echo(f"  meta on {backend:10} failed: {e}")
            continue
        echo(f"  meta on {backend:10} {rates[backend]['create']:>8,.0f} creates/s")
    echo(
        f"meta server on each store: {o['clients']} client processes x {o['depth']} in flight, "
        f"{o['files']} files each, framed transport"
    )
    echo("| store | " + " | ".join(PHASES) + " | create vs rocksdb |")
    echo("|---|" + "---:|" * (len(PHASES) + 1))
    base = rates.get("rocksdb", {}).get("create")
    for backend, r in rates.items():
        ratio = f"{r['create'] / base:.2f}" if base else "-"
        echo(f"| {backend} | " + " | ".join(f"{r[p]:,.0f}" for p in PHASES) + f" | {ratio} |")
    for backend, error in errors.items():
        echo(f"| {backend} | failed: {error} |")
    return {"params": o, "rates": rates, "errors": errors}


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [b for b in text.split(",") if b]
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    backends = _names(str(opts["backends"]), BACKENDS, "backend")
    meta_backends = _names(str(opts["meta_backends"]), META_BACKENDS, "meta backend")
    if opts["uvloop"]:
        import uvloop

        rows = uvloop.run(_measure(opts, backends, echo))
    else:
        rows = asyncio.run(_measure(opts, backends, echo))
    echo("| " + " | ".join(_COLUMNS) + " |")
    echo("|" + "---|" * len(_COLUMNS))
    for r in rows:
        echo("| " + " | ".join(str(r.get(c, "")) for c in _COLUMNS) + " |")
    report: dict[str, Any] = {"rows": rows}
    if meta_backends:
        report["meta"] = _meta_rates(opts, meta_backends, echo)
    return report
