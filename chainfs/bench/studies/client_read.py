"""``chainfs bench client``: client reads and memory against iperf3, in one run.

Starts a LocalCluster (3 storage nodes x 2 targets, chains of 3), writes one
file through the client, reads it once so its chunks are hot in the storage
nodes' page cache, then, each in a fresh client process:

* ``client_seq_read``: sequential ``readinto`` of the file into one reused
  buffer (``block_mib``), pass after pass;
* ``read_ranges_256k``: random samples, ``batch`` per ``read_ranges`` call
  (a dataloader batch), into reused buffers;
* ``client_rss_2g``: ``rss_total_mib`` read with ``f.read(block)`` (new bytes
  every call, the common way), peak RSS (VmHWM) of the client process after.

iperf3 (one TCP stream on 127.0.0.1) runs before and after; ratios use the
mean. Targets: client_seq_read >= 0.6 of iperf3, read_ranges_256k >= 0.4,
client_rss_2g peak < 200 MiB + the client's buffer budget.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import chainfs
from chainfs.bench.ceilings import iperf3_loopback
from chainfs.bench.cluster import LocalCluster
from chainfs.bench.context import MB, TARGETS, MiB
from chainfs.bench.studies import Echo
from chainfs.bench.workers import in_fresh_process, peak_rss_bytes

PATH = "/bench/client.bin"
_WORKER_TIMEOUT_S = 900.0
_RSS_LIMIT_BASE_MiB = 200  # plus the client's buffer budget


def worker_seq(address: str, seconds: float, block_mib: int) -> dict[str, Any]:
    with chainfs.connect(address) as fs:
        size = fs.stat(PATH).st_size
        view = memoryview(bytearray(block_mib * MiB))
        total = passes = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            with fs.open(PATH, "rb") as f:
                while n := f.readinto(view):
                    total += n
            passes += 1
        dt = time.perf_counter() - t0
    if total != passes * size:
        raise AssertionError(f"read {total} bytes in {passes} passes of a {size}-byte file")
    return {"bytes": total, "seconds": dt, "MBps": total / dt / MB, "passes": passes}


def worker_ranges(address: str, seconds: float, sample_kib: int, batch: int) -> dict[str, Any]:
    with chainfs.connect(address) as fs:
        size = fs.stat(PATH).st_size
        sample = sample_kib * 1024
        rng = random.Random(1)
        bufs = [bytearray(sample) for _ in range(batch)]
        total = calls = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ranges = [(PATH, rng.randrange(0, size - sample), sample) for _ in range(batch)]
            total += sum(len(g) for g in fs.read_ranges(ranges, bufs))
            calls += 1
        dt = time.perf_counter() - t0
    return {
        "bytes": total,
        "seconds": dt,
        "MBps": total / dt / MB,
        "samples_per_s": calls * batch / dt,
        "calls": calls,
    }


def worker_rss(address: str, total_mib: int, block_mib: int) -> dict[str, Any]:
    base = peak_rss_bytes(os.getpid())
    with chainfs.connect(address) as fs:
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
    return {
        "bytes": total,
        "MBps": total / dt / MB,
        "peak_rss_MiB": peak_rss_bytes(os.getpid()) / MiB,
        "rss_before_connect_MiB": base / MiB,
        "buffer_budget_MiB": budget / MiB,
        "read_block_MiB": block_mib,
        "file_MiB": size / MiB,
    }


def _write_file(address: str, file_mib: int) -> float:
    """Write the file read by the workers, then read it once (hot page cache); MB/s."""
    with chainfs.connect(address) as fs:
        fs.mkdir("/bench", exist_ok=True)
        block = os.urandom(64 * MiB)
        t0 = time.perf_counter()
        with fs.open(PATH, "wb") as f:
            for _ in range(max(1, file_mib // 64)):
                f.write(block)
        mbps = max(1, file_mib // 64) * len(block) / (time.perf_counter() - t0) / MB
        buf = bytearray(64 * MiB)
        with fs.open(PATH, "rb") as f:
            while f.readinto(buf):
                pass
    return mbps


def _storage_settings(text: str) -> dict[str, Any]:
    """``FIELD=JSON,...`` -> {field: value}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"--storage-set takes FIELD=JSON,...: {text!r}")
    return {k: json.loads(v) for k, v in pairs}


def _measure(o: dict[str, Any], address: str) -> dict[str, Any]:
    iperf_before, _ = iperf3_loopback(o["iperf_seconds"])
    write_mbps = _write_file(address, o["file_mib"])
    t = _WORKER_TIMEOUT_S
    seq = in_fresh_process(worker_seq, address, o["seconds"], o["block_mib"], timeout_s=t)
    ranges_args = (address, o["seconds"], o["sample_kib"], o["batch"])
    ranges = in_fresh_process(worker_ranges, *ranges_args, timeout_s=t)
    rss_args = (address, o["rss_total_mib"], o["rss_block_mib"])
    rss = in_fresh_process(worker_rss, *rss_args, timeout_s=t)
    iperf_after, _ = iperf3_loopback(o["iperf_seconds"])
    iperf = (iperf_before + iperf_after) / 2
    return {
        "iperf3_MBps": {"before": iperf_before, "after": iperf_after, "mean": iperf},
        "results": [
            {"name": "client_seq_read", "MBps": seq["MBps"], "ratio": seq["MBps"] / iperf,
             "target": TARGETS["client_seq_read"]},
            {"name": "read_ranges_256k", "MBps": ranges["MBps"],
             "ratio": ranges["MBps"] / iperf, "target": TARGETS["read_ranges_256k"],
             "samples_per_s": ranges["samples_per_s"]},
            {"name": "client_rss_2g", "peak_rss_MiB": rss["peak_rss_MiB"],
             "limit_MiB": _RSS_LIMIT_BASE_MiB + rss["buffer_budget_MiB"], "MBps": rss["MBps"],
             "buffer_budget_MiB": rss["buffer_budget_MiB"]},
            {"name": "client_write_r3_setup", "MBps": write_mbps, "ratio": write_mbps / iperf},
        ],
    }  # fmt: skip


def _table(report: dict[str, Any], rss_total_mib: int) -> list[str]:
    ip = report["iperf3_MBps"]
    seq, ranges, rss, write = report["results"]
    return [
        f"iperf3 loopback: {ip['mean']:.0f} MB/s (before {ip['before']:.0f}, "
        f"after {ip['after']:.0f})",
        "| figure | value | ratio to iperf3 | target |",
        "|---|---|---|---|",
        f"| client_seq_read | {seq['MBps']:.0f} MB/s | {seq['ratio']:.2f} | >= 0.60 |",
        f"| read_ranges_256k | {ranges['MBps']:.0f} MB/s ({ranges['samples_per_s']:.0f} "
        f"samples/s) | {ranges['ratio']:.2f} | >= 0.40 |",
        f"| client peak RSS reading {rss_total_mib} MiB | {rss['peak_rss_MiB']:.0f} MiB | - | "
        f"< {rss['limit_MiB']:.0f} MiB (200 + budget {rss['buffer_budget_MiB']:.0f}) |",
        f"| (setup) 3-replica write | {write['MBps']:.0f} MB/s | {write['ratio']:.2f} | - |",
    ]


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    storage = _storage_settings(opts["storage_set"])

    def configure(i: int, conf: Any) -> None:
        for k, v in storage.items():
            if not hasattr(conf, k):
                raise ValueError(f"StorageConfig has no field {k}")
            setattr(conf, k, v)

    with (
        tempfile.TemporaryDirectory(prefix="cfsb-client-", dir=opts["data_dir"]) as tmp,
        LocalCluster(
            Path(tmp), storage_nodes=3, targets_per_node=2, replicas=3, configure_storage=configure
        ) as cluster,
    ):
        report = _measure(opts, cluster.address)
    report["config"] = {
        "storage_nodes": 3,
        "targets_per_node": 2,
        "replicas": 3,
        **{k: opts[k] for k in ("file_mib", "block_mib", "sample_kib", "batch", "storage_set")},
    }
    for line in _table(report, opts["rss_total_mib"]):
        echo(line)
    return report
