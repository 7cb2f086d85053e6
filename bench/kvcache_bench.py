"""KV-cache speed against the loopback ceiling measured in the same run (not a test).

    .venv/bin/python bench/kvcache_bench.py                  # starts its own LocalCluster
    .venv/bin/python bench/kvcache_bench.py --address HOST:PORT   # an existing cluster

Measures, from one client process:
- iperf3 over loopback (one TCP stream): the ceiling;
- batch_get of 64 values of 1 MiB (new bytes objects) and batch_get_into the
  same into preallocated buffers, in MB/s and as a share of iperf3
  (target: >= 50%);
- 4 KiB values: gets per second with batch_get of 256 keys (one batch in
  flight, and 4 threads each with one in flight so that meta and storage
  work at the same time), with 64 threads each calling get() (the cache
  coalesces them into batches), and with one thread calling get() in a loop
  (latency bound) (target: >= 20,000 gets/s);
- put throughput for both sizes.

Every value read is checked against what was put (the first and last round
byte for byte; every read is CRC-checked by the cache itself). Writes a JSON
report with --json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
KiB = 1024
MB = 1e6


def _values(n: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def _timed_rounds(fn: Any, seconds: float, min_rounds: int = 3) -> tuple[int, float]:
    """Call fn() until ``seconds`` passed (at least min_rounds times): (rounds, elapsed s)."""
    rounds = 0
    t0 = time.perf_counter()
    while True:
        fn()
        rounds += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and rounds >= min_rounds:
            return rounds, dt


def run(fs: Any, args: argparse.Namespace, report: dict[str, Any]) -> None:
    d = f"/kvbench-{os.getpid()}-{time.time_ns()}"
    kv = fs.kvcache(d)
    res: dict[str, Any] = report.setdefault("results", {})

    # -- 1 MiB values -----------------------------------------------------------
    n_big = args.batch
    big_keys = [f"big-{i}" for i in range(n_big)]
    big_vals = _values(n_big, args.value_bytes, 1)
    t0 = time.perf_counter()
    assert all(kv.batch_put(big_keys, big_vals))
    dt = time.perf_counter() - t0
    res["put_1m_MBps"] = n_big * args.value_bytes / MB / dt

    got = kv.batch_get(big_keys)
    assert got == big_vals, "batch_get returned wrong bytes"
    rounds, dt = _timed_rounds(lambda: kv.batch_get(big_keys), args.seconds)
    res["batch_get_1m_MBps"] = rounds * n_big * args.value_bytes / MB / dt
    res["batch_get_1m_batches_per_s"] = rounds / dt

    bufs = [bytearray(args.value_bytes) for _ in range(n_big)]
    assert kv.batch_get_into(big_keys, bufs) == [args.value_bytes] * n_big
    rounds, dt = _timed_rounds(lambda: kv.batch_get_into(big_keys, bufs), args.seconds)
    res["batch_get_into_1m_MBps"] = rounds * n_big * args.value_bytes / MB / dt
    assert [bytes(b) for b in bufs] == big_vals, "batch_get_into left wrong bytes"

    # -- 4 KiB values -------------------------------------------------------------
    n_small = args.small_values
    small_keys = [f"small-{i}" for i in range(n_small)]
    small_vals = _values(n_small, 4 * KiB, 2)
    t0 = time.perf_counter()
    for lo in range(0, n_small, 1024):
        assert all(kv.batch_put(small_keys[lo : lo + 1024], small_vals[lo : lo + 1024]))
    dt = time.perf_counter() - t0
    res["put_4k_per_s"] = n_small / dt

    rng = random.Random(3)
    batches = [rng.sample(range(n_small), args.small_batch) for _ in range(64)]
    it = iter(range(1 << 62))

    def one_batch() -> None:
        idx = batches[next(it) % len(batches)]
        vals = kv.batch_get([small_keys[i] for i in idx])
        if vals[0] != small_vals[idx[0]] or any(v is None for v in vals):
            raise AssertionError("batch_get of 4 KiB values returned wrong bytes")

    rounds, dt = _timed_rounds(one_batch, args.seconds)
    res["batch_get_4k_per_s"] = rounds * args.small_batch / dt
    res["batch_get_4k_batch"] = args.small_batch

    def batch_loop(seconds: float, seed: int) -> int:
        r = random.Random(seed)
        n = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            idx = r.sample(range(n_small), args.small_batch)
            vals = kv.batch_get([small_keys[i] for i in idx])
            if vals[-1] != small_vals[idx[-1]] or any(v is None for v in vals):
                raise AssertionError("batch_get of 4 KiB values returned wrong bytes")
            n += len(idx)
        return n

    with concurrent.futures.ThreadPoolExecutor(args.pipeline) as pool:
        t0 = time.perf_counter()
        futs = [pool.submit(batch_loop, args.seconds, 50 + k) for k in range(args.pipeline)]
        total = sum(f.result() for f in futs)
        res["batch_get_4k_pipelined_per_s"] = total / (time.perf_counter() - t0)
        res["batch_get_4k_pipeline"] = args.pipeline

    def get_loop(seconds: float, seed: int) -> int:
        r = random.Random(seed)
        n = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            i = r.randrange(n_small)
            if kv.get(small_keys[i]) != small_vals[i]:
                raise AssertionError("get of a 4 KiB value returned wrong bytes")
            n += 1
        return n

    t0 = time.perf_counter()
    n = get_loop(args.seconds, 4)
    res["get_4k_one_thread_per_s"] = n / (time.perf_counter() - t0)

    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        t0 = time.perf_counter()
        futs = [pool.submit(get_loop, args.seconds, 10 + k) for k in range(args.threads)]
        total = sum(f.result() for f in futs)
        res["get_4k_threads_per_s"] = total / (time.perf_counter() - t0)
        res["get_4k_threads"] = args.threads

    s = kv.stats()
    res["stats"] = s.as_dict()
    kv.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--address", help="mgmtd address of a running cluster (default: start one)")
    ap.add_argument("--data", help="directory for the started cluster (default: a temp dir)")
    ap.add_argument("--storage-nodes", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="values per batch_get (1 MiB)")
    ap.add_argument("--value-bytes", type=int, default=MiB)
    ap.add_argument("--small-values", type=int, default=4096, help="4 KiB values stored")
    ap.add_argument("--small-batch", type=int, default=256, help="keys per 4 KiB batch_get")
    ap.add_argument("--threads", type=int, default=64, help="threads calling get() at once")
    ap.add_argument("--pipeline", type=int, default=4, help="threads calling batch_get at once")
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--iperf-seconds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    import chainfs
    from chainfs.bench.ceilings import measure_iperf3

    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    report["command"] = " ".join([sys.executable, *sys.argv])
    print(f"iperf3 loopback, {args.iperf_seconds}s ...", flush=True)
    ceiling, _detail = measure_iperf3(args.iperf_seconds)
    iperf = ceiling["iperf3_loopback_MBps"]
    report["iperf3_loopback_MBps"] = iperf

    if args.address:
        with chainfs.connect(args.address) as fs:
            run(fs, args, report)
    else:
        from chainfs.testing.cluster import LocalCluster

        base = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="kvbench-"))
        print(f"starting a LocalCluster in {base} ...", flush=True)
        with LocalCluster(
            base, storage_nodes=args.storage_nodes, replicas=args.replicas
        ) as cluster:
            fs = cluster.client()
            run(fs, args, report)

    r = report["results"]
    assert iperf is not None
    r["batch_get_1m_vs_iperf3"] = r["batch_get_1m_MBps"] / iperf
    r["batch_get_into_1m_vs_iperf3"] = r["batch_get_into_1m_MBps"] / iperf
    print()
    print(f"iperf3 loopback (1 stream)         {iperf:10.0f} MB/s")
    print(
        f"batch_get  {args.batch} x {args.value_bytes // KiB} KiB          "
        f"{r['batch_get_1m_MBps']:10.0f} MB/s  ({100 * r['batch_get_1m_vs_iperf3']:.0f}% of iperf3)"
    )
    print(
        f"batch_get_into {args.batch} x {args.value_bytes // KiB} KiB      "
        f"{r['batch_get_into_1m_MBps']:10.0f} MB/s  "
        f"({100 * r['batch_get_into_1m_vs_iperf3']:.0f}% of iperf3)"
    )
    print(f"put {args.value_bytes // KiB} KiB values                {r['put_1m_MBps']:10.0f} MB/s")
    n = args.small_batch
    print(f"4 KiB batch_get ({n} keys)        {r['batch_get_4k_per_s']:10.0f} gets/s")
    p = args.pipeline
    print(f"4 KiB batch_get x {p} threads       {r['batch_get_4k_pipelined_per_s']:10.0f} gets/s")
    t = args.threads
    print(f"4 KiB get, {t} threads               {r['get_4k_threads_per_s']:10.0f} gets/s")
    print(f"4 KiB get, one thread              {r['get_4k_one_thread_per_s']:10.0f} gets/s")
    print(f"4 KiB put (batches of 1024)        {r['put_4k_per_s']:10.0f} puts/s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
