"""Client read throughput and memory against iperf3 on loopback, measured in the same run.

    .venv/bin/python bench/client_bench.py [--file-mib 1024] [--seconds 8] [--json OUT]

Starts a LocalCluster (mgmtd, 3 storage nodes x 2 targets, chains of 3
replicas, meta) as real processes, writes one file through the client, reads
it once so its chunks are hot in the storage nodes' page cache, then, each in
a fresh client process:

* ``seq_read``: sequential ``readinto`` of the file through ``FileSystem``
  into one reused buffer (``--block-mib``), pass after pass;
* ``read_ranges_256k``: random 256 KiB samples, 64 per ``read_ranges`` call
  (a dataloader batch), into reused buffers;
* ``rss_2g``: 2 GiB read with ``f.read(block)`` (new bytes every call, the
  common way), peak RSS (VmHWM) of the client process afterwards.

iperf3 (one TCP stream on 127.0.0.1) runs before and after; ratios use their
mean. Not a test: nothing is asserted. Targets (issue 5): seq_read >= 60% of
iperf3, read_ranges_256k >= 40%, rss_2g peak < 200 MiB + the client's buffer
budget (ClientConfig.buffer_budget_bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
MB = 1e6
PATH = "/bench/client.bin"


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# -- workers (run in their own process) -------------------------------------------


def worker_seq(address: str, seconds: float, block_mib: int) -> dict[str, Any]:
    import chainfs

    fs = chainfs.connect(address)
    size = fs.stat(PATH).st_size
    buf = bytearray(block_mib * MiB)
    view = memoryview(buf)
    total = 0
    passes = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        with fs.open(PATH, "rb") as f:
            while n := f.readinto(view):
                total += n
        passes += 1
    dt = time.perf_counter() - t0
    fs.close()
    assert total == passes * size
    return {"bytes": total, "seconds": dt, "MBps": total / dt / MB, "passes": passes}


def worker_ranges(address: str, seconds: float, sample_kib: int, batch: int) -> dict[str, Any]:
    import chainfs

    fs = chainfs.connect(address)
    size = fs.stat(PATH).st_size
    sample = sample_kib * 1024
    rng = random.Random(1)
    bufs = [bytearray(sample) for _ in range(batch)]
    total = 0
    calls = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ranges = [(PATH, rng.randrange(0, size - sample), sample) for _ in range(batch)]
        got = fs.read_ranges(ranges, bufs)
        total += sum(len(g) for g in got)
        calls += 1
    dt = time.perf_counter() - t0
    fs.close()
    return {
        "bytes": total,
        "seconds": dt,
        "MBps": total / dt / MB,
        "samples_per_s": calls * batch / dt,
        "calls": calls,
    }


def worker_rss(address: str, total_mib: int, block_mib: int) -> dict[str, Any]:
    import chainfs

    base = _vm_hwm_bytes()
    fs = chainfs.connect(address)
    size = fs.stat(PATH).st_size
    want = total_mib * MiB
    total = 0
    t0 = time.perf_counter()
    while total < want:
        with fs.open(PATH, "rb") as f:
            while total < want and (data := f.read(block_mib * MiB)):
                total += len(data)
                del data
    dt = time.perf_counter() - t0
    budget = fs.config.buffer_budget_bytes
    fs.close()
    peak = _vm_hwm_bytes()
    return {
        "bytes": total,
        "MBps": total / dt / MB,
        "peak_rss_MiB": peak / MiB,
        "rss_before_connect_MiB": base / MiB,
        "buffer_budget_MiB": budget / MiB,
        "read_block_MiB": block_mib,
        "file_MiB": size / MiB,
    }


def _run_worker(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- driver -------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", help="use a running cluster instead of starting one")
    p.add_argument("--file-mib", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--block-mib", type=int, default=64)
    p.add_argument("--sample-kib", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rss-total-mib", type=int, default=2048)
    p.add_argument("--rss-block-mib", type=int, default=16)
    p.add_argument("--iperf-seconds", type=int, default=5)
    p.add_argument(
        "--storage-set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="storage config field for the started cluster, e.g. verify_reads=false",
    )
    p.add_argument("--json", dest="json_out")
    p.add_argument("--worker", nargs=argparse.REMAINDER)
    a = p.parse_args()

    if a.worker:
        kind, address, *rest = a.worker
        if kind == "seq":
            res = worker_seq(address, float(rest[0]), int(rest[1]))
        elif kind == "ranges":
            res = worker_ranges(address, float(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "rss":
            res = worker_rss(address, int(rest[0]), int(rest[1]))
        else:
            raise SystemExit(f"unknown worker {kind}")
        print(json.dumps(res))
        return 0

    import chainfs
    from chainfs.bench.ceilings import measure_iperf3
    from chainfs.testing.cluster import LocalCluster

    cluster = None
    tmp = None
    try:
        address = a.address
        if address is None:
            tmp = tempfile.TemporaryDirectory(prefix="chainfs-client-bench-")
            storage = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.storage_set)}

            def configure(i: int, conf: Any) -> None:
                for k, v in storage.items():
                    assert hasattr(conf, k), f"StorageConfig has no field {k}"
                    setattr(conf, k, v)

            cluster = LocalCluster(
                Path(tmp.name),
                storage_nodes=3,
                targets_per_node=2,
                replicas=3,
                configure_storage=configure,
            )
            address = cluster.address
        iperf_before = measure_iperf3(a.iperf_seconds)[0]["iperf3_loopback_MBps"]

        fs = chainfs.connect(address)
        fs.mkdir("/bench", exist_ok=True)
        block = os.urandom(64 * MiB)
        t0 = time.perf_counter()
        with fs.open(PATH, "wb") as f:
            for _ in range(a.file_mib // 64):
                f.write(block)
        write_s = time.perf_counter() - t0
        write_mbps = a.file_mib * MiB / write_s / MB
        with fs.open(PATH, "rb") as f:  # warm the storage nodes' page cache
            buf = bytearray(64 * MiB)
            while f.readinto(buf):
                pass
        fs.close()

        seq = _run_worker(["seq", address, str(a.seconds), str(a.block_mib)])
        ranges = _run_worker(["ranges", address, str(a.seconds), str(a.sample_kib), str(a.batch)])
        rss = _run_worker(["rss", address, str(a.rss_total_mib), str(a.rss_block_mib)])
        iperf_after = measure_iperf3(a.iperf_seconds)[0]["iperf3_loopback_MBps"]
        assert iperf_before is not None and iperf_after is not None
        iperf = (iperf_before + iperf_after) / 2
    finally:
        if cluster is not None:
            cluster.stop()
        if tmp is not None:
            tmp.cleanup()

    rss_limit = 200 + rss["buffer_budget_MiB"]
    report = {
        "machine": {"cores": os.cpu_count(), "kernel": os.uname().release},
        "config": {
            "storage_nodes": 3,
            "targets_per_node": 2,
            "replicas": 3,
            "file_MiB": a.file_mib,
            "block_MiB": a.block_mib,
            "sample_KiB": a.sample_kib,
            "batch": a.batch,
            "storage_set": a.storage_set,
        },
        "iperf3_MBps": {"before": iperf_before, "after": iperf_after, "mean": iperf},
        "results": [
            {
                "name": "client_seq_read",
                "MBps": seq["MBps"],
                "ratio": seq["MBps"] / iperf,
                "target": 0.6,
            },
            {
                "name": "read_ranges_256k",
                "MBps": ranges["MBps"],
                "ratio": ranges["MBps"] / iperf,
                "target": 0.4,
                "samples_per_s": ranges["samples_per_s"],
            },
            {
                "name": "client_rss_2g",
                "peak_rss_MiB": rss["peak_rss_MiB"],
                "limit_MiB": rss_limit,
                "MBps": rss["MBps"],
                "buffer_budget_MiB": rss["buffer_budget_MiB"],
            },
            {"name": "client_write_r3_setup", "MBps": write_mbps, "ratio": write_mbps / iperf},
        ],
    }
    print(f"iperf3 loopback: {iperf:.0f} MB/s (before {iperf_before:.0f}, after {iperf_after:.0f})")
    print("| figure | value | ratio to iperf3 | target |")
    print("|---|---|---|---|")
    print(f"| client_seq_read | {seq['MBps']:.0f} MB/s | {seq['MBps'] / iperf:.2f} | >= 0.60 |")
    print(
        f"| read_ranges_256k | {ranges['MBps']:.0f} MB/s ({ranges['samples_per_s']:.0f} samples/s)"
        f" | {ranges['MBps'] / iperf:.2f} | >= 0.40 |"
    )
    print(
        f"| client peak RSS reading {a.rss_total_mib} MiB | {rss['peak_rss_MiB']:.0f} MiB"
        f" | - | < {rss_limit:.0f} MiB (200 + budget {rss['buffer_budget_MiB']:.0f}) |"
    )
    print(f"| (setup) 3-replica write | {write_mbps:.0f} MB/s | {write_mbps / iperf:.2f} | - |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
