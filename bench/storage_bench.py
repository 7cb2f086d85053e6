"""Storage data-plane throughput against iperf3 on loopback, measured in the same run.

    .venv/bin/python bench/storage_bench.py [--seconds 4] [--chunk-mib 4] [--json OUT]

Starts a mgmtd and 3 storage nodes (2 targets each, chains of 3) as real
processes, then from ONE client process:

* replicated writes: whole 4 MiB chunks, 3 replicas, N in flight;
* raw chunk reads: batched reads of whole chunks into preallocated buffers;

and iperf3 (one TCP stream, 127.0.0.1) as the ceiling. Then 4 client
processes read and write at once while the storage nodes' peak RSS (VmHWM)
is taken. Also measured in-process: the cost of ``durable`` (fdatasync before
the ack) and of ``verify_reads`` in the chunk engine. Not a test: nothing is
asserted; the figures are printed (Markdown) and written as JSON.
Targets (issue 3): reads >= 50% of iperf3, writes >= 20%, RSS <= 300 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import multiprocessing as mproc
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chainfs.common.rpc.storage_client import ReadReq, StorageClient  # noqa: E402
from chainfs.storage_service import crc  # noqa: E402
from chainfs.storage_service.chunk_engine import ChunkEngine, EngineOptions  # noqa: E402
from tests.integration.storage_fixtures import StorageCluster  # noqa: E402

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iperf3_gbps(seconds: float) -> float:
    """One TCP stream on 127.0.0.1 (GB/s); a fresh port per try (others may run iperf3)."""
    err = ""
    for _ in range(5):
        port = _free_port()
        server = subprocess.Popen(
            ["iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(20):
                out = subprocess.run(
                    ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                    capture_output=True,
                    text=True,
                )
                if out.returncode == 0:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        data = json.loads(out.stdout)
                        return float(data["end"]["sum_received"]["bits_per_second"]) / 8 / 1e9
                err = out.stdout[-300:] + out.stderr[-300:]
                if server.poll() is not None:
                    break  # the server could not bind: next port
                time.sleep(0.1)
        finally:
            server.kill()
            server.wait()
    raise RuntimeError(f"iperf3 failed: {err}")


async def write_phase(
    client: StorageClient, chains: list[int], chunk: int, seconds: float, inflight: int
) -> tuple[float, int]:
    data = os.urandom(chunk)
    stop = time.monotonic() + seconds
    count = 0

    async def worker(w: int) -> None:
        nonlocal count
        k = 0
        while time.monotonic() < stop:
            idx = w * 100_000 + k
            await client.write(chains[idx % len(chains)], 1, idx, 0, data, chunk)
            k += 1
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    dt = time.perf_counter() - t0
    return count * chunk / dt / 1e9, count


async def fill(client: StorageClient, chains: list[int], chunk: int, n: int) -> None:
    data = os.urandom(chunk)
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            await client.write(chains[i % len(chains)], 2, i, 0, data, chunk)

    await asyncio.gather(*(one(i) for i in range(n)))


async def read_phase(
    client: StorageClient,
    chains: list[int],
    chunk: int,
    n: int,
    seconds: float,
    batch: int,
    inflight: int,
) -> float:
    bufs = [memoryview(bytearray(chunk)) for _ in range(batch * inflight)]
    stop = time.monotonic() + seconds
    total = 0

    async def worker(w: int) -> None:
        nonlocal total
        k = w * batch
        mine = bufs[w * batch : (w + 1) * batch]
        while time.monotonic() < stop:
            reqs = [
                ReadReq(chains[(k + j) % n % len(chains)], 2, (k + j) % n, 0, chunk, mine[j])
                for j in range(batch)
            ]
            got = await client.read_batch(reqs)
            total += sum(len(g) for g in got)
            k += batch * inflight

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return total / (time.perf_counter() - t0) / 1e9


def load_client(
    address: str, chains: list[int], chunk: int, n: int, seconds: float, seed: int
) -> None:
    """One of the 4 load processes: half reads, half writes."""
    from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache

    async def go() -> None:
        mgmt = MgmtClient(address)
        routing = RoutingCache(mgmt)
        await routing.refresh()
        client = StorageClient(routing, os.urandom(16))
        try:
            await asyncio.gather(
                read_phase(client, chains, chunk, n, seconds, 4, 2),
                write_phase(client, chains, chunk, seconds, 4),
            )
        finally:
            await client.close()
            await mgmt.close()

    uvloop.run(go())


def vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def engine_costs(tmp: Path, chunk: int) -> dict[str, float]:
    """Per-update cost of durable on/off and per-read cost of verification on/off."""
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
            out[f"update_{name}_{'durable' if durable else 'nodurable'}_ms"] = (
                (time.perf_counter() - t0) / n * 1000
            )
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


def disk_direct_write_gbps(tmp: Path, chunk: int, seconds: float) -> float:
    """Ceiling for replicated writes: 3 writers (one per replica) of new chunk-sized
    files with O_DIRECT, as the storage nodes write them, on this machine's disk."""
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(chunk))
    total = [0, 0, 0]
    stop = time.monotonic() + seconds

    def writer(w: int) -> None:
        k = 0
        while time.monotonic() < stop:
            path = tmp / f"direct-{w}-{k}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
            try:
                total[w] += os.pwrite(fd, buf, 0)
            finally:
                os.close(fd)
            if k >= 64:
                (tmp / f"direct-{w}-{k - 64}").unlink()
            k += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(total) / (time.perf_counter() - t0) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--transport",
        choices=("unix", "tcp"),
        default="unix",
        help="unix: same-host peers use the data plane's unix socket (the default "
        "config); tcp: loopback TCP only, like iperf3",
    )
    args = ap.parse_args()
    chunk = args.chunk_mib * MiB
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        result["engine"] = engine_costs(Path(tmp), chunk)
        result["disk_direct_write_GBps"] = disk_direct_write_gbps(Path(tmp), chunk, args.seconds)
        before = iperf3_gbps(args.seconds)
        overrides = {"unix_socket": ""} if args.transport == "tcp" else {}
        result["transport"] = args.transport
        with StorageCluster(
            Path(tmp) / "cluster", nodes=3, targets_per_node=2, common_overrides=overrides
        ) as c:

            async def single() -> None:
                client, mgmt = await c.client()
                try:
                    w, _ = await write_phase(client, c.chains, chunk, args.seconds, 8)
                    result["write_3rep_GBps"] = w
                    n = 64
                    await fill(client, c.chains, chunk, n)
                    await read_phase(client, c.chains, chunk, n, 1.0, 4, 4)  # warm
                    result["read_GBps"] = await read_phase(
                        client, c.chains, chunk, n, args.seconds, 4, 4
                    )
                finally:
                    await client.close()
                    await mgmt.close()

            uvloop.run(single())  # the event loop our services and client library use
            # The machine may be shared: iperf3 before and after, the mean is the ceiling.
            after = iperf3_gbps(args.seconds)
            result["iperf3_runs_GBps"] = [before, after]
            result["iperf3_GBps"] = (before + after) / 2
            ctx = mproc.get_context("spawn")
            procs = [
                ctx.Process(
                    target=load_client,
                    args=(c.address, c.chains, chunk, 64, args.seconds, s),
                )
                for s in range(4)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            result["storage_peak_rss_MiB"] = [
                vm_hwm_bytes(p.pid) / MiB for p in c.storage if p.pid is not None
            ]
    ip = result["iperf3_GBps"]
    result["read_vs_iperf3"] = result["read_GBps"] / ip
    result["write_vs_iperf3"] = result["write_3rep_GBps"] / ip
    lines = [
        "| figure | value | target |",
        "|---|---|---|",
        f"| iperf3 loopback, 1 stream (mean of before/after) | {ip:.2f} GB/s "
        f"({before:.2f}, {after:.2f}) | ceiling |",
        f"| chunk reads, 1 client process ({args.transport}) | {result['read_GBps']:.2f} GB/s "
        f"({result['read_vs_iperf3']:.0%}) | >= 50% |",
        f"| 3-replica writes, 1 client process ({args.transport}) | "
        f"{result['write_3rep_GBps']:.2f} GB/s "
        f"({result['write_vs_iperf3']:.0%}) | >= 20% |",
        f"| storage node peak RSS, 4 clients | "
        f"{max(result['storage_peak_rss_MiB']):.0f} MiB | <= 300 MiB |",
    ]
    lines.append(
        f"| disk, new chunk files with O_DIRECT, 3 writers | "
        f"{result['disk_direct_write_GBps']:.2f} GB/s | replicated-write ceiling = 1/3 |"
    )
    for k, v in result["engine"].items():
        lines.append(f"| engine {k} | {v:.2f} | |")
    print("\n".join(lines))
    print(f"\ncommand: {result['command']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
