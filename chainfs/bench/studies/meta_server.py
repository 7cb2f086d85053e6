"""``chainfs bench meta-server``: metadata rates of one meta server next to a local directory.

A LocalCluster with one meta server (on ``kv``) and one single-target storage
node (file creation touches only metadata) serves ``clients`` client
processes, each with its own MetaClient and directory, ``depth`` requests in
flight, over the framed data plane (default) or gRPC. Phases run in lockstep
(a barrier between them):

- create: ``files`` new files per client (Open with O_CREAT|O_EXCL, no write session)
- stat:   every own file by path
- readdir: own directory, ``readdir_rounds`` times, with attributes (ls -l)

The local directory is the suite's metadata ceiling (``chainfs.bench.ceilings``):
the same number of processes, each creating, stat-ing and listing as many
files in its own directory of this machine's disk. Rates = operations of all
clients / wall time of the phase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

from chainfs.bench.ceilings import measure_local_meta
from chainfs.bench.cluster import LocalCluster
from chainfs.bench.context import FULL
from chainfs.bench.studies import Echo
from chainfs.bench.workers import WorkerPool

PHASES = ("create", "stat", "readdir")
UNITS = {"create": "creates/s", "stat": "stats/s", "readdir": "entries/s (with attrs)"}
_CLIENT_TIMEOUT_S = 600.0
_RESULT_POLL_S = 1.0
_LOCAL_PHASE_MAX_S = 60.0  # cap of each local-directory phase


async def _chainfs_phases(
    address: str, idx: int, files: int, depth: int, rounds: int, barrier: Any
) -> dict[str, tuple[float, float, int]]:
    from chainfs.common.rpc.meta_client import MetaClient

    m = MetaClient(address)
    d = f"/bench/c{idx}"
    await m.mkdir(d, 0o755, parents=True)
    names = [f"{d}/f{i:07d}" for i in range(files)]
    sem = asyncio.Semaphore(depth)
    out: dict[str, tuple[float, float, int]] = {}

    async def bounded(coro: Any) -> Any:
        async with sem:
            return await coro

    async def phase(name: str, make: Any, count: int) -> None:
        barrier.wait()
        t0 = time.time()
        await asyncio.gather(*(bounded(c) for c in make()))
        out[name] = (t0, time.time(), count)

    async def listing() -> int:
        n = 0
        async for _ in m.iterdir(d, with_attrs=True):
            n += 1
        if n != files:
            raise AssertionError(f"listing {d} gave {n} entries, created {files}")
        return n

    creates = (m.create(p, 0o644, exclusive=True, write=False) for p in names)
    await phase("create", lambda: creates, files)
    await phase("stat", lambda: (m.stat(p) for p in names), files)
    await phase("readdir", lambda: (listing() for _ in range(rounds)), files * rounds)
    await m.aclose()
    return out


def chainfs_worker(
    address: str, idx: int, files: int, depth: int, rounds: int, barrier: Any, q: Any
) -> None:
    import uvloop

    q.put((idx, uvloop.run(_chainfs_phases(address, idx, files, depth, rounds, barrier))))


def _next_result(q: Any, procs: list[Any]) -> Any:
    """The next client's result; a client that died fails the run now, not at the timeout."""
    deadline = time.monotonic() + _CLIENT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return q.get(timeout=_RESULT_POLL_S)
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a client process failed (exit {failed[0]})") from None
    raise TimeoutError(f"no client result within {_CLIENT_TIMEOUT_S} s")


def chainfs_rates(address: str, o: dict[str, Any]) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(o["clients"]), ctx.Queue()
    args = (o["files"], o["depth"], o["readdir_rounds"], barrier, q)
    procs = [
        ctx.Process(target=chainfs_worker, args=(address, i, *args)) for i in range(o["clients"])
    ]
    for p in procs:
        p.start()
    try:
        results = [_next_result(q, procs) for _ in procs]
    except BaseException:
        for p in procs:  # the others may wait at the barrier for the dead one forever
            p.terminate()
            p.join(_CLIENT_TIMEOUT_S)
        raise
    for p in procs:
        p.join(_CLIENT_TIMEOUT_S)
        if p.exitcode != 0:
            raise RuntimeError(f"a client process failed (exit {p.exitcode})")
    rates: dict[str, float] = {}
    for phase in PHASES:
        start = min(r[1][phase][0] for r in results)
        end = max(r[1][phase][1] for r in results)
        rates[phase] = sum(r[1][phase][2] for r in results) / (end - start)
    return rates


def _local_rates(work: Path, o: dict[str, Any]) -> dict[str, float]:
    sizes = dataclasses.replace(
        FULL,
        meta_files_per_proc=o["files"],
        meta_readdir_rounds=o["readdir_rounds"],
        meta_max_seconds=_LOCAL_PHASE_MAX_S,
        task_timeout_s=_CLIENT_TIMEOUT_S,
    )
    pool = WorkerPool(o["clients"])
    try:
        values, _ = measure_local_meta(pool, work, sizes)
    finally:
        pool.close()
    names = {"create": "local_meta_create_per_s", "stat": "local_meta_stat_per_s",
             "readdir": "local_meta_readdir_entries_per_s"}  # fmt: skip
    return {phase: float(values[name] or 0.0) for phase, name in names.items()}


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cfsb-meta-", dir=opts["data_dir"]) as tmp:
        with LocalCluster(
            Path(tmp) / "c", storage_nodes=1, targets_per_node=1, replicas=1, kv=opts["kv"]
        ) as cluster:
            assert cluster.meta is not None
            info = cluster.meta.info
            frame = opts["transport"] == "frame"
            address = "frame://" + info["data_address"] if frame else info["rpc_address"]
            with cluster.admin_environment():  # the client processes act as "admin"
                rates = chainfs_rates(address, opts)
        local_rates = _local_rates(Path(tmp), opts)
    echo(
        f"{opts['clients']} client processes x {opts['depth']} in flight, {opts['files']} files "
        f"each, meta on {opts['kv']}, {opts['transport']} transport"
    )
    echo("| phase | chainfs meta | local directory | ratio |")
    echo("|---|---:|---:|---:|")
    for phase in PHASES:
        c, loc = rates[phase], local_rates[phase]
        echo(f"| {phase} ({UNITS[phase]}) | {c:,.0f} | {loc:,.0f} | {c / loc:.3f} |")
    return {"params": opts, "chainfs": rates, "local": local_rates}
