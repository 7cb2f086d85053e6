"""``chainfs bench fuse-ls`` and ``open-random``: the FUSE mount and open files up close.

``fuse-ls``: a LocalCluster with a FUSE mount; the files are created with the
async client (concurrently, so meta's create rate is not the figure); then a
second, fresh mount (nothing cached) times `ls -l DIR` (cold: first listing;
warm: again at once) and `ls` (names only).

``open-random``: a LocalCluster (3 storage nodes, chains of 3) with a FUSE mount:

- ``open_read_close_per_s``: open + read 4 KiB + close of distinct files by
  the sync client, with and without meta read sessions (``read_sessions``);
- ``client_rand_read_4k``: random 4 KiB reads of a 64 MiB file by the sync
  client for each ``buffering`` (per second, and bytes asked of storage per read);
- ``fio``: fio psync 4 KiB randread / randwrite of a 64 MiB file through the
  mount (IOPS and mean completion latency), with 4 MiB and 64 KiB chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chainfs.bench.cluster import LocalCluster, MountProcess, fuse_unavailable
from chainfs.bench.context import MiB
from chainfs.bench.fio import fio_exe, fio_job
from chainfs.bench.studies import Echo
from chainfs.client.config import ClientConfig

FILE_BYTES = 64 * MiB
MOUNT_TIMEOUT_S = 60.0
LS_TIMEOUT_S = 600.0


@contextlib.contextmanager
def _mounted_cluster(data_dir: Path | None) -> Iterator[tuple[LocalCluster, Path]]:
    why = fuse_unavailable()
    if why is not None:
        raise ValueError(f"this study needs a FUSE mount: {why}")
    with (
        tempfile.TemporaryDirectory(prefix="cfsb-fuse-", dir=data_dir) as tmp,
        LocalCluster(Path(tmp) / "c", mount=Path(tmp) / "mnt") as cluster,
    ):
        yield cluster, Path(tmp)


# -- fuse-ls ---------------------------------------------------------------------------
async def _create(address: str, directory: str, n: int, concurrency: int) -> float:
    import chainfs.aio

    fs = await chainfs.aio.connect(address)
    try:
        await fs.mkdir(directory, exist_ok=True)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                f = await fs.open(f"{directory}/file{i:06d}", "wb")
                await f.close()

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.monotonic() - t0
    finally:
        await fs.close()


def _timed(cmd: list[str]) -> tuple[float, int]:
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=LS_TIMEOUT_S)
    return time.monotonic() - t0, len(out.stdout.splitlines())


def ls_large_directory(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    with _mounted_cluster(opts["data_dir"]) as (cluster, base):
        create_s = asyncio.run(_create(cluster.address, "/big", opts["files"], opts["concurrency"]))
        # A second, fresh mount: no dentry, attribute or page cache from the creation.
        fresh_mnt = base / "mnt2"
        fresh_mnt.mkdir()
        fresh = MountProcess(fresh_mnt, cluster.address, base / "mount2")
        fresh.start(MOUNT_TIMEOUT_S)
        try:
            cold_s, lines = _timed(["ls", "-l", str(fresh_mnt / "big")])
            warm_s, _ = _timed(["ls", "-l", str(fresh_mnt / "big")])
            names_s, names = _timed(["ls", str(fresh_mnt / "big")])
        finally:
            fresh.stop()
    report = {
        "files": opts["files"],
        "create_seconds": round(create_s, 2),
        "ls_l_cold_seconds": round(cold_s, 3),
        "ls_l_warm_seconds": round(warm_s, 3),
        "ls_names_seconds": round(names_s, 3),
        "ls_l_lines": lines,
        "ls_names": names,
    }
    for k, v in report.items():
        echo(f"{k:20} {v}")
    return report


# -- open-random --------------------------------------------------------------------------
def _open_read_close(cluster: LocalCluster, files: int) -> dict[str, float]:
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


def _client_random_reads(cluster: LocalCluster, reads: int) -> dict[str, Any]:
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


def _fio_through_mount(cluster: LocalCluster, runtime_s: int) -> dict[str, Any]:
    assert cluster.mountpoint is not None
    exe = fio_exe()
    fs = cluster.client()
    out: dict[str, Any] = {}
    for chunk in (4 * MiB, 64 * 1024):
        d = f"/fio{chunk // 1024}k"
        fs.mkdir(d, exist_ok=True)
        fs._loop.run(fs.aio.io.meta.set_layout(d, chunk_size=chunk))
        fs.write_file(f"{d}/f", os.urandom(FILE_BYTES))
        for rw in ("randread", "randwrite"):
            args = ["--name=j", f"--filename={cluster.mountpoint}{d}/f", f"--size={FILE_BYTES}",
                    "--bs=4k", "--ioengine=psync", f"--rw={rw}", "--time_based",
                    f"--runtime={runtime_s}"]  # fmt: skip
            job, _ = fio_job(exe, args, runtime_s * 4 + 120)
            io = job["write" if rw == "randwrite" else "read"]
            out[f"{rw}_chunk_{chunk // 1024}k"] = {
                "iops": round(io["iops"], 1),
                "clat_mean_ms": round(io["clat_ns"]["mean"] / 1e6, 2),
            }
    return out


def open_random(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    with _mounted_cluster(opts["data_dir"]) as (cluster, _):
        report = {
            "open_read_close_per_s": _open_read_close(cluster, opts["files"]),
            "client_rand_read_4k": _client_random_reads(cluster, opts["reads"]),
            "fio": _fio_through_mount(cluster, opts["runtime"]),
            "loadavg": os.getloadavg(),
        }
    for k, v in report.items():
        echo(f"{k}: {v}")
    return report
