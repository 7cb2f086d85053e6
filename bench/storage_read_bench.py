"""Storage random reads of 4 KiB and 256 KiB pieces of 4 MiB chunks, from one client process.

    .venv/bin/python bench/storage_read_bench.py [--seconds 5] [--verify-reads false]
        [--profile DIR]

Starts a mgmtd and 3 storage nodes (2 targets each, chains of 3) as real
processes, fills 64 chunks of 4 MiB, then reads random 4 KiB-aligned pieces
through the data plane (batched reads into preallocated buffers): 4 KiB one
per request (32 in flight), 4 KiB 16 per request (8 in flight) and 256 KiB 16
per request (4 in flight). The per-request cost of the storage read path
(metadata lookup, file open, thread hop, CRC verification) is what these
show. ``--profile DIR`` records storage node 0 with py-spy (raw stacks, one
file per phase). Not a test: figures are printed (and written as JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chainfs.common.rpc.storage_client import ReadReq, StorageClient  # noqa: E402
from tests.integration.storage_fixtures import StorageCluster  # noqa: E402

MiB = 1024 * 1024
CHUNK = 4 * MiB
CHUNKS = 64
PHASES = ((4096, 1, 32), (4096, 16, 8), (256 * 1024, 16, 4))  # piece, per request, in flight


async def phase(
    client: StorageClient, chains: list[int], size: int, seconds: float, batch: int, inflight: int
) -> float:
    """Pieces read per second."""
    bufs = [[memoryview(bytearray(size)) for _ in range(batch)] for _ in range(inflight)]
    stop = time.monotonic() + seconds
    count = 0

    async def worker(w: int) -> None:
        nonlocal count
        r = random.Random(w)
        while time.monotonic() < stop:
            reqs = []
            for j in range(batch):
                i = r.randrange(CHUNKS)
                off = r.randrange(0, CHUNK - size + 1) // 4096 * 4096
                reqs.append(ReadReq(chains[i % len(chains)], 2, i, off, size, bufs[w][j]))
            got = await client.read_batch(reqs)
            assert all(len(g) == size for g in got), "short read"
            count += batch

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return count / (time.perf_counter() - t0)


def start_profile(pid: int | None, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` for ``seconds`` into ``out`` (raw stacks)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw", "-o", str(out)]
    return subprocess.Popen(
        [*cmd, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--verify-reads", choices=("true", "false"), default="true")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy raw stacks here")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    results: list[dict[str, Any]] = []
    overrides = {"verify_reads": a.verify_reads == "true"}
    with (
        tempfile.TemporaryDirectory(prefix="storage-read-bench-") as tmp,
        StorageCluster(
            Path(tmp) / "cluster", nodes=3, targets_per_node=2, common_overrides=overrides
        ) as c,
    ):

        async def run() -> None:
            client, mgmt = await c.client()
            try:
                data = os.urandom(CHUNK)
                for i in range(CHUNKS):
                    await client.write(c.chains[i % len(c.chains)], 2, i, 0, data, CHUNK)
                await phase(client, c.chains, 4096, 1.0, 16, 4)  # warm up
                for size, batch, inflight in PHASES:
                    spy = None
                    if a.profile is not None:
                        out = a.profile / f"storage0-{size // 1024}k-b{batch}.txt"
                        spy = start_profile(c.storage[0].pid, out, a.seconds)
                    per_s = await phase(client, c.chains, size, a.seconds, batch, inflight)
                    if spy is not None:
                        spy.wait()
                    results.append(
                        {
                            "piece_bytes": size,
                            "per_request": batch,
                            "in_flight": inflight,
                            "reads_per_s": per_s,
                            "MBps": per_s * size / 1e6,
                        }
                    )
                    mbps = per_s * size / 1e6
                    print(
                        f"{size // 1024:4d} KiB pieces, {batch:2d} per request, "
                        f"{inflight:2d} in flight: {per_s:8.0f}/s {mbps:7.0f} MB/s",
                        flush=True,
                    )
            finally:
                await client.close()
                await mgmt.close()

        uvloop.run(run())
    if a.json:
        a.json.write_text(json.dumps({"verify_reads": overrides, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
