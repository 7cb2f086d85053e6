"""``chainfs bench storage`` and ``storage-read``: the storage data plane up close.

Both start a LocalCluster (3 storage nodes, 2 targets each, chains of 3) and
talk to storage directly from ONE client process (a StorageClient: no meta,
no file API), writing chunks of their own.

``storage``: replicated writes of whole chunks (8 in flight) and batched
reads of whole chunks into preallocated buffers, against iperf3 (mean of one
run before and one after); then 4 client processes read and write at once
while the storage nodes' peak RSS (VmHWM) is taken. Also, in-process: the
cost of ``durable`` (fdatasync before the ack) and of ``verify_reads`` in the
chunk engine, and the disk ceiling of replicated writes (new chunk files with
O_DIRECT, one writer per replica). Targets: reads >= 0.5 of iperf3, writes
>= 0.2, storage RSS <= 300 MiB.

``storage-read``: random 4 KiB-aligned pieces of 64 chunks of 4 MiB: 4 KiB
one per request (32 in flight), 4 KiB 16 per request (8 in flight), 256 KiB
16 per request (4 in flight): the per-request cost of the storage read path
(metadata lookup, file open, thread hop, CRC verification). ``profile DIR``
records storage node 0 with py-spy (raw stacks, one file per phase).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import multiprocessing
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop

from chainfs.bench.ceilings import iperf3_loopback, measure_direct_chunk_writes
from chainfs.bench.cluster import LocalCluster, chain_ids, storage_client
from chainfs.bench.context import MiB
from chainfs.bench.profile import find_py_spy
from chainfs.bench.studies import Echo
from chainfs.bench.workers import peak_rss_bytes
from chainfs.common.rpc.storage_client import ReadReq, StorageClient
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_engine import ChunkEngine, EngineOptions

GB = 1e9
LOAD_CLIENTS = 4
READ_CHUNKS = 64  # chunks filled for the read phases
_WRITE_INODE, _READ_INODE = 1, 2  # chunk ids of the write phases and of the filled chunks
RANDOM_PHASES = ((4096, 1, 32), (4096, 16, 8), (256 * 1024, 16, 4))  # piece, per request, flight
_SPY_SLACK_S = 30.0  # py-spy writes its file after the recording ends


@contextlib.contextmanager
def _cluster(data_dir: Path | None, storage: dict[str, Any]) -> Iterator[LocalCluster]:
    """A 3-node cluster whose storage nodes get the ``storage`` config fields."""

    def configure(i: int, conf: Any) -> None:
        for k, v in storage.items():
            setattr(conf, k, v)

    with (
        tempfile.TemporaryDirectory(prefix="cfsb-storage-", dir=data_dir) as tmp,
        LocalCluster(
            Path(tmp) / "c", storage_nodes=3, targets_per_node=2, replicas=3, kv="memory",
            configure_storage=configure,
        ) as cluster,
    ):  # fmt: skip
        yield cluster


# -- phases (one client process, asyncio) --------------------------------------------
async def write_phase(
    client: StorageClient, chains: list[int], chunk: int, seconds: float, inflight: int
) -> tuple[float, int]:
    """Whole-chunk replicated writes for ``seconds``: (GB/s, chunks written)."""
    data = os.urandom(chunk)
    stop = time.monotonic() + seconds
    count = 0

    async def worker(w: int) -> None:
        nonlocal count
        k = 0
        while time.monotonic() < stop:
            idx = w * 100_000 + k
            await client.write(chains[idx % len(chains)], _WRITE_INODE, idx, 0, data, chunk)
            k += 1
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return count * chunk / (time.perf_counter() - t0) / GB, count


async def fill(client: StorageClient, chains: list[int], chunk: int, n: int) -> None:
    data = os.urandom(chunk)
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            await client.write(chains[i % len(chains)], _READ_INODE, i, 0, data, chunk)

    await asyncio.gather(*(one(i) for i in range(n)))


async def read_phase(
    client: StorageClient,
    chains: list[int],
    size: int,
    seconds: float,
    batch: int,
    inflight: int,
    whole: bool,
) -> float:
    """Batched reads of ``size`` bytes for ``seconds``, into preallocated buffers:
    whole chunks in order, or random 4 KiB-aligned pieces; pieces read per second."""
    bufs = [[memoryview(bytearray(size)) for _ in range(batch)] for _ in range(inflight)]
    stop = time.monotonic() + seconds
    count = 0

    async def worker(w: int) -> None:
        nonlocal count
        rng, k = random.Random(w), w * batch
        while time.monotonic() < stop:
            reqs = []
            for j in range(batch):
                i = (k + j) % READ_CHUNKS if whole else rng.randrange(READ_CHUNKS)
                off = 0 if whole else rng.randrange(0, 4 * MiB - size + 1) // 4096 * 4096
                reqs.append(ReadReq(chains[i % len(chains)], _READ_INODE, i, off, size, bufs[w][j]))
            got = await client.read_batch(reqs)
            if any(len(g) != size for g in got):
                raise AssertionError(f"short read: {[len(g) for g in got]}, expected {size}")
            count += batch
            k += batch * inflight

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return count / (time.perf_counter() - t0)


def load_client(address: str, secret_file: Path, chunk: int, seconds: float) -> None:
    """One of the load processes: half reads, half writes."""

    async def go() -> None:
        client, mgmt = await storage_client(address, secret_file)
        try:
            chains = await chain_ids(mgmt)
            await asyncio.gather(
                read_phase(client, chains, chunk, seconds, 4, 2, whole=True),
                write_phase(client, chains, chunk, seconds, 4),
            )
        finally:
            await client.close()
            await mgmt.close()

    uvloop.run(go())


# -- chunk engine, in process -----------------------------------------------------------
def engine_costs(tmp: Path, chunk: int) -> dict[str, float]:
    """Per-update cost of durable on/off and per-read cost of verification on/off (ms)."""
    out: dict[str, float] = {}
    # Page-aligned buffers, as the data plane's pooled receive buffers are.
    data = memoryview(mmap.mmap(-1, chunk))
    data[:] = os.urandom(chunk)
    small = memoryview(mmap.mmap(-1, 64 * 1024))
    small[:] = os.urandom(64 * 1024)
    for durable in (False, True):
        eng = ChunkEngine(tmp / f"eng-{durable}", EngineOptions(durable=durable))
        for name, buf, n in (("4MiB", data, 30), ("64KiB", small, 200)):
            c = crc.value(buf)
            t0 = time.perf_counter()
            for i in range(n):
                eng.prepare_write(9, i, 0, buf, c, max(chunk, len(buf)), 1)
                eng.commit(9, i, 1, 1)
            key = f"update_{name}_{'durable' if durable else 'nodurable'}_ms"
            out[key] = (time.perf_counter() - t0) / n * 1000
            for i in range(n):
                eng.prepare_remove(9, i)
                eng.commit(9, i, 2, 1)
        eng.close()
    eng = ChunkEngine(tmp / "eng-read")
    eng.prepare_write(9, 0, 0, data, crc.value(data), chunk, 1)
    eng.commit(9, 0, 1, 1)
    scratch = memoryview(mmap.mmap(-1, chunk))
    for verify in (False, True):
        t0 = time.perf_counter()
        for _ in range(50):
            eng.read(9, 0, 0, chunk, verify, scratch)  # a reused buffer, as the server pools
        out[f"read_4MiB_verify_{verify}_ms"] = (time.perf_counter() - t0) / 50 * 1000
    eng.close()
    return out


# -- storage ------------------------------------------------------------------------------
async def _single_client(
    address: str, secret_file: Path, chunk: int, seconds: float
) -> dict[str, float]:
    client, mgmt = await storage_client(address, secret_file)
    try:
        chains = await chain_ids(mgmt)
        writes, _ = await write_phase(client, chains, chunk, seconds, 8)
        await fill(client, chains, chunk, READ_CHUNKS)
        await read_phase(client, chains, chunk, 1.0, 4, 4, whole=True)  # warm up
        per_s = await read_phase(client, chains, chunk, seconds, 4, 4, whole=True)
    finally:
        await client.close()
        await mgmt.close()
    return {"write_3rep_GBps": writes, "read_GBps": per_s * chunk / GB}


def _load_rss(cluster: LocalCluster, chunk: int, seconds: float) -> list[float]:
    """Peak RSS (MiB) of each storage node after LOAD_CLIENTS processes read and write."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=load_client, args=(cluster.address, cluster.secret_file, chunk, seconds))
        for _ in range(LOAD_CLIENTS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"load client processes failed with exit codes {failed}")
    return [peak_rss_bytes(p.pid) / MiB for p in cluster.storage if p.pid is not None]


def _storage_table(r: dict[str, Any]) -> list[str]:
    ip = r["iperf3_GBps"]
    lines = [
        "| figure | value | target |",
        "|---|---|---|",
        f"| iperf3 loopback, 1 stream (mean of before/after) | {ip:.2f} GB/s "
        f"({r['iperf3_runs_GBps'][0]:.2f}, {r['iperf3_runs_GBps'][1]:.2f}) | ceiling |",
        f"| chunk reads, 1 client process ({r['transport']}) | {r['read_GBps']:.2f} GB/s "
        f"({r['read_vs_iperf3']:.0%}) | >= 50% |",
        f"| 3-replica writes, 1 client process ({r['transport']}) | "
        f"{r['write_3rep_GBps']:.2f} GB/s ({r['write_vs_iperf3']:.0%}) | >= 20% |",
        f"| storage node peak RSS, {LOAD_CLIENTS} clients | "
        f"{max(r['storage_peak_rss_MiB']):.0f} MiB | <= 300 MiB |",
        f"| disk, new chunk files with O_DIRECT, 3 writers | "
        f"{r['disk_direct_write_GBps']:.2f} GB/s | replicated-write ceiling = 1/3 |",
    ]
    return lines + [f"| engine {k} | {v:.2f} | |" for k, v in r["engine"].items()]


def writes_and_reads(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    chunk, seconds = opts["chunk_mib"] * MiB, opts["seconds"]
    r: dict[str, Any] = {"transport": opts["transport"]}
    with tempfile.TemporaryDirectory(prefix="cfsb-engine-", dir=opts["data_dir"]) as tmp:
        r["engine"] = engine_costs(Path(tmp), chunk)
        disk_mbps = measure_direct_chunk_writes(Path(tmp), chunk, seconds)
        r["disk_direct_write_GBps"] = disk_mbps / 1000
    before, _ = iperf3_loopback(seconds)
    # tcp: same-host peers use loopback TCP only, like iperf3 (no unix socket).
    overrides = {"unix_socket": ""} if opts["transport"] == "tcp" else {}
    with _cluster(opts["data_dir"], overrides) as cluster:
        r |= uvloop.run(_single_client(cluster.address, cluster.secret_file, chunk, seconds))
        after, _ = iperf3_loopback(seconds)  # the machine may be shared: before and after
        r["storage_peak_rss_MiB"] = _load_rss(cluster, chunk, seconds)
    r["iperf3_runs_GBps"] = [before / 1000, after / 1000]
    r["iperf3_GBps"] = (before + after) / 2000
    r["read_vs_iperf3"] = r["read_GBps"] / r["iperf3_GBps"]
    r["write_vs_iperf3"] = r["write_3rep_GBps"] / r["iperf3_GBps"]
    for line in _storage_table(r):
        echo(line)
    return r


# -- storage-read ---------------------------------------------------------------------------
def _start_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` for ``seconds`` into ``out`` (raw stacks)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [find_py_spy(), "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-f", "raw",
           "-o", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _random_reads(
    cluster: LocalCluster, seconds: float, profile: Path | None, echo: Echo
) -> list[dict[str, Any]]:
    client, mgmt = await storage_client(cluster.address, cluster.secret_file)
    results = []
    try:
        chains = await chain_ids(mgmt)
        await fill(client, chains, 4 * MiB, READ_CHUNKS)
        await read_phase(client, chains, 4096, 1.0, 16, 4, whole=False)  # warm up
        for size, batch, inflight in RANDOM_PHASES:
            spy = None
            if profile is not None and cluster.storage[0].pid is not None:
                out = profile / f"storage0-{size // 1024}k-b{batch}.txt"
                spy = _start_spy(cluster.storage[0].pid, out, seconds)
            per_s = await read_phase(client, chains, size, seconds, batch, inflight, whole=False)
            if spy is not None:
                await asyncio.to_thread(spy.wait, seconds + _SPY_SLACK_S)
            row = {"piece_bytes": size, "per_request": batch, "in_flight": inflight,
                   "reads_per_s": per_s, "MBps": per_s * size / 1e6}  # fmt: skip
            results.append(row)
            echo(
                f"{size // 1024:4d} KiB pieces, {batch:2d} per request, {inflight:2d} in flight: "
                f"{per_s:8.0f}/s {row['MBps']:7.0f} MB/s"
            )
    finally:
        await client.close()
        await mgmt.close()
    return results


def random_reads(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    verify = opts["verify_reads"] == "true"
    profile = Path(opts["profile"]) if opts["profile"] else None
    with _cluster(opts["data_dir"], {"verify_reads": verify}) as cluster:
        results = uvloop.run(_random_reads(cluster, opts["seconds"], profile, echo))
    return {"verify_reads": verify, "results": results}
