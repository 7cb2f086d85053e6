"""``chainfs bench kvcache``: the KV cache up close, against iperf3 in the same run.

From one client process (on a LocalCluster started here, or ``address``):

- batch_get of ``batch`` values of 1 MiB (new bytes objects) and
  batch_get_into the same into preallocated buffers, in MB/s and as a share
  of iperf3 (target: >= 0.5);
- 4 KiB values: gets per second with batch_get of ``small_batch`` keys (one
  batch in flight, and ``pipeline`` threads each with one in flight so that
  meta and storage work at the same time), with ``threads`` threads each
  calling get() (the cache coalesces them into batches), and with one thread
  calling get() in a loop (latency bound) (target: >= 20,000 gets/s);
- put throughput for both sizes;
- the first get of each 4 KiB key by a new handle (a lookup at meta, then the
  read), and what meta did for that handle: lookups and background renewals
  per key, counted after it idled four trusted ages.

Every value read is checked against what was put (the first and last round
byte for byte; every read is CRC-checked by the cache itself).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chainfs
from chainfs.bench.ceilings import iperf3_loopback
from chainfs.bench.cluster import LocalCluster
from chainfs.bench.context import MB
from chainfs.bench.studies import Echo

KiB = 1024
_PUT_BATCH = 1024  # 4 KiB values per batch_put
_BATCH_SETS = 64  # distinct random key sets cycled by the one-batch-in-flight test


def _values(n: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def _timed_rounds(
    fn: Callable[[], object], seconds: float, min_rounds: int = 3
) -> tuple[int, float]:
    """Call fn() until ``seconds`` passed (at least min_rounds times): (rounds, elapsed s)."""
    rounds = 0
    t0 = time.perf_counter()
    while True:
        fn()
        rounds += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and rounds >= min_rounds:
            return rounds, dt


def _in_threads(
    threads: int, loop: Callable[[float, int], int], seconds: float, seed: int
) -> float:
    """``threads`` threads each running ``loop(seconds, seed + k)``: items per second."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        futs = [pool.submit(loop, seconds, seed + k) for k in range(threads)]
        total = sum(f.result() for f in futs)
        return total / (time.perf_counter() - t0)


def _big_values(kv: Any, o: dict[str, Any], res: dict[str, Any]) -> None:
    n, size, secs = o["batch"], o["value_bytes"], o["seconds"]
    keys = [f"big-{i}" for i in range(n)]
    vals = _values(n, size, 1)
    t0 = time.perf_counter()
    if not all(kv.batch_put(keys, vals)):
        raise AssertionError("batch_put of new keys found some present")
    res["put_1m_MBps"] = n * size / MB / (time.perf_counter() - t0)
    if kv.batch_get(keys) != vals:
        raise AssertionError("batch_get returned wrong bytes")
    rounds, dt = _timed_rounds(lambda: kv.batch_get(keys), secs)
    res["batch_get_1m_MBps"] = rounds * n * size / MB / dt
    res["batch_get_1m_batches_per_s"] = rounds / dt
    bufs = [bytearray(size) for _ in range(n)]
    if kv.batch_get_into(keys, bufs) != [size] * n:
        raise AssertionError("batch_get_into returned wrong lengths")
    rounds, dt = _timed_rounds(lambda: kv.batch_get_into(keys, bufs), secs)
    res["batch_get_into_1m_MBps"] = rounds * n * size / MB / dt
    if [bytes(b) for b in bufs] != vals:
        raise AssertionError("batch_get_into left wrong bytes")


def _small_values(kv: Any, o: dict[str, Any], res: dict[str, Any]) -> None:
    n, batch, secs = o["small_values"], o["small_batch"], o["seconds"]
    keys = [f"small-{i}" for i in range(n)]
    vals = _values(n, 4 * KiB, 2)
    t0 = time.perf_counter()
    for lo in range(0, n, _PUT_BATCH):
        if not all(kv.batch_put(keys[lo : lo + _PUT_BATCH], vals[lo : lo + _PUT_BATCH])):
            raise AssertionError("batch_put of new keys found some present")
    res["put_4k_per_s"] = n / (time.perf_counter() - t0)

    def batch_of(idx: list[int]) -> int:
        got = kv.batch_get([keys[i] for i in idx])
        if got[0] != vals[idx[0]] or got[-1] != vals[idx[-1]] or any(v is None for v in got):
            raise AssertionError("batch_get of 4 KiB values returned wrong bytes")
        return len(idx)

    rng = random.Random(3)
    sets = itertools.cycle([rng.sample(range(n), batch) for _ in range(_BATCH_SETS)])
    rounds, dt = _timed_rounds(lambda: batch_of(next(sets)), secs)
    res["batch_get_4k_per_s"] = rounds * batch / dt
    res["batch_get_4k_batch"] = batch

    def batch_loop(seconds: float, seed: int) -> int:
        r, got, stop = random.Random(seed), 0, time.perf_counter() + seconds
        while time.perf_counter() < stop:
            got += batch_of(r.sample(range(n), batch))
        return got

    def get_loop(seconds: float, seed: int) -> int:
        r, got, stop = random.Random(seed), 0, time.perf_counter() + seconds
        while time.perf_counter() < stop:
            i = r.randrange(n)
            if kv.get(keys[i]) != vals[i]:
                raise AssertionError("get of a 4 KiB value returned wrong bytes")
            got += 1
        return got

    res["batch_get_4k_pipelined_per_s"] = _in_threads(o["pipeline"], batch_loop, secs, 50)
    res["batch_get_4k_pipeline"] = o["pipeline"]
    res["get_4k_one_thread_per_s"] = _in_threads(1, get_loop, secs, 4)
    res["get_4k_threads_per_s"] = _in_threads(o["threads"], get_loop, secs, 10)
    res["get_4k_threads"] = o["threads"]


def _first_gets(fs: Any, directory: str, o: dict[str, Any], res: dict[str, Any]) -> None:
    """A new handle gets each 4 KiB value once, in random order (each a lookup at
    meta, then the read), then idles four trusted ages: what meta did for it."""
    n = o["small_values"]
    keys = [f"small-{i}" for i in range(n)]
    vals = _values(n, 4 * KiB, 2)
    order = list(range(n))
    random.Random(5).shuffle(order)
    kv = fs.kvcache(directory)
    try:
        t0 = time.perf_counter()
        for i in order:
            if kv.get(keys[i]) != vals[i]:
                raise AssertionError("first get of a 4 KiB value returned wrong bytes")
        res["first_get_4k_per_s"] = n / (time.perf_counter() - t0)
        time.sleep(4 * kv.config.location_cache_ms / 1000)
        s = kv.stats()
        res["first_get_lookups_per_key"] = s.lookups / n
        res["first_get_renewals_per_key"] = s.renewals / n
    finally:
        kv.close()


def _measure(fs: Any, o: dict[str, Any]) -> dict[str, Any]:
    directory = f"/kvbench-{os.getpid()}-{time.time_ns()}"
    kv = fs.kvcache(directory)
    res: dict[str, Any] = {}
    try:
        _big_values(kv, o, res)
        _small_values(kv, o, res)
        res["stats"] = kv.stats().as_dict()
    finally:
        kv.close()
    _first_gets(fs, directory, o, res)
    return res


def _table(o: dict[str, Any], iperf: float, r: dict[str, Any]) -> list[str]:
    big = f"{o['batch']} x {o['value_bytes'] // KiB} KiB"
    return [
        f"iperf3 loopback (1 stream)         {iperf:10.0f} MB/s",
        f"batch_get {big:24} {r['batch_get_1m_MBps']:10.0f} MB/s  "
        f"({100 * r['batch_get_1m_vs_iperf3']:.0f}% of iperf3)",
        f"batch_get_into {big:19} {r['batch_get_into_1m_MBps']:10.0f} MB/s  "
        f"({100 * r['batch_get_into_1m_vs_iperf3']:.0f}% of iperf3)",
        f"put {o['value_bytes'] // KiB} KiB values                {r['put_1m_MBps']:10.0f} MB/s",
        f"4 KiB batch_get ({o['small_batch']} keys)        {r['batch_get_4k_per_s']:10.0f} gets/s",
        f"4 KiB batch_get x {o['pipeline']} threads       "
        f"{r['batch_get_4k_pipelined_per_s']:10.0f} gets/s",
        f"4 KiB get, {o['threads']} threads               {r['get_4k_threads_per_s']:10.0f} gets/s",
        f"4 KiB get, one thread              {r['get_4k_one_thread_per_s']:10.0f} gets/s",
        f"4 KiB first get of each key        {r['first_get_4k_per_s']:10.0f} gets/s  "
        f"(then per key: {r['first_get_lookups_per_key']:.2f} lookups, "
        f"{r['first_get_renewals_per_key']:.2f} renewals)",
        f"4 KiB put (batches of {_PUT_BATCH})        {r['put_4k_per_s']:10.0f} puts/s",
    ]


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    echo(f"iperf3 loopback, {opts['iperf_seconds']}s ...")
    iperf, _ = iperf3_loopback(opts["iperf_seconds"])
    if opts["address"]:
        with chainfs.connect(opts["address"]) as fs:
            res = _measure(fs, opts)
    else:
        with (
            tempfile.TemporaryDirectory(prefix="cfsb-kvcache-", dir=opts["data_dir"]) as tmp,
            LocalCluster(
                Path(tmp), storage_nodes=opts["storage_nodes"], replicas=opts["replicas"]
            ) as cluster,
        ):
            echo(f"LocalCluster in {tmp}")
            res = _measure(cluster.client(), opts)
    res["batch_get_1m_vs_iperf3"] = res["batch_get_1m_MBps"] / iperf
    res["batch_get_into_1m_vs_iperf3"] = res["batch_get_into_1m_MBps"] / iperf
    for line in _table(opts, iperf, res):
        echo(line)
    return {"iperf3_loopback_MBps": iperf, "results": res}
