"""Costs of open files: read sessions, buffering, random 4 KiB I/O through the mount.

    .venv/bin/python bench/open_random_bench.py [--runtime 10] [--files 200] [--base /tmp/x]

Starts a LocalCluster (3 storage nodes, chains of 3) with a FUSE mount and
prints one JSON object:

- ``open_read_close_per_s``: open + read 4 KiB + close of distinct files by
  the sync client, with and without meta read sessions (``read_sessions``);
- ``client_rand_read_4k``: random 4 KiB reads of a 64 MiB file by the sync
  client for each ``buffering`` (per second, and bytes asked of storage per read);
- ``fio``: fio psync 4 KiB randread / randwrite of a 64 MiB file through the
  mount (IOPS and mean completion latency), with 4 MiB and 64 KiB chunks.

Measured, never asserted: the machine's other load moves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from chainfs.client.config import ClientConfig
from chainfs.testing.cluster import LocalCluster

MiB = 1 << 20
FILE_BYTES = 64 * MiB


def open_read_close(cluster: LocalCluster, files: int) -> dict[str, float]:
    w = cluster.client()
    w.mkdir("/orc", exist_ok=True)
    for i in range(files):
        w.write_file(f"/orc/f{i}", b"x" * 4096)
    out: dict[str, float] = {}
    for sessions in (False, True):
        fs = cluster.client(config=ClientConfig(read_sessions=sessions))
        t0 = time.perf_counter()
        for i in range(files):
            with fs.open(f"/orc/f{i}", "rb") as f:
                f.read()
        out[f"read_sessions={sessions}"] = round(files / (time.perf_counter() - t0), 1)
    return out


def client_random_reads(cluster: LocalCluster, reads: int) -> dict[str, Any]:
    fs = cluster.client()
    fs.write_file("/rand.bin", os.urandom(FILE_BYTES))
    rng = random.Random(1)
    out: dict[str, Any] = {}
    for buffering in (0, 65536, -1):
        with fs.open("/rand.bin", "rb", buffering=buffering) as f:
            before = fs.aio.storage_read_bytes
            t0 = time.perf_counter()
            for _ in range(reads):
                f.seek(rng.randrange(FILE_BYTES // 4096) * 4096)
                f.read(4096)
            dt = time.perf_counter() - t0
            out[f"buffering={buffering}"] = {
                "reads_per_s": round(reads / dt, 1),
                "storage_bytes_per_read": (fs.aio.storage_read_bytes - before) // reads,
            }
    return out


def fio(cluster: LocalCluster, runtime_s: int) -> dict[str, Any]:
    assert cluster.mountpoint is not None
    fs = cluster.client()
    out: dict[str, Any] = {}
    for chunk in (4 * MiB, 64 * 1024):
        d = f"/fio{chunk // 1024}k"
        fs.mkdir(d, exist_ok=True)
        fs._loop.run(fs.aio.io.meta.set_layout(d, chunk_size=chunk))
        fs.write_file(f"{d}/f", os.urandom(FILE_BYTES))
        for rw in ("randread", "randwrite"):
            cmd = [
                "fio", "--name=j", f"--filename={cluster.mountpoint}{d}/f",
                f"--size={FILE_BYTES}", "--bs=4k", "--ioengine=psync", f"--rw={rw}",
                "--time_based", f"--runtime={runtime_s}", "--output-format=json",
            ]  # fmt: skip
            job = json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)
            io = job["jobs"][0]["write" if rw == "randwrite" else "read"]
            out[f"{rw}_chunk_{chunk // 1024}k"] = {
                "iops": round(io["iops"], 1),
                "clat_mean_ms": round(io["clat_ns"]["mean"] / 1e6, 2),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--base", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    base = Path(args.base or tempfile.mkdtemp(prefix="chainfs-open-bench-"))
    mnt = base / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        with LocalCluster(base / "cluster", mount=mnt) as cluster:
            result = {
                "open_read_close_per_s": open_read_close(cluster, args.files),
                "client_rand_read_4k": client_random_reads(cluster, args.reads),
                "fio": fio(cluster, args.runtime) if shutil.which("fio") else "no fio",
                "loadavg": os.getloadavg(),
            }
    finally:
        if args.base is None:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
