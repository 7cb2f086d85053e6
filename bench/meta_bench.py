"""Metadata rates of one meta server process next to a local directory.

    .venv/bin/python bench/meta_bench.py [--files 2000] [--clients 4] [--depth 8]
        [--readdir-rounds 5] [--kv rocksdb|etcd|memory] [--transport frame|grpc] [--json OUT]

A real meta process (`chainfs serve meta`, standalone: the store, no
storage; file creation touches only metadata) serves ``--clients`` client
processes, each with its own MetaClient and directory, ``--depth`` requests
in flight, over the framed data plane (default) or gRPC. Phases run in
lockstep (a barrier between them):

- create: ``--files`` new files per client (Open with O_CREAT|O_EXCL, no write session)
- stat:   every own file by path
- readdir: own directory, ``--readdir-rounds`` times, with attributes (ls -l)

The same phases then run on a local directory of this machine's disk with the
same number of processes and threads in flight (open(O_CREAT|O_EXCL)+close,
stat, scandir + lstat). Rates = operations of all clients / wall time of the
phase. Prints a Markdown table and the command line; --json writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chainfs.common import config as config_mod
from chainfs.meta_service.config import MetaConfig
from chainfs.testing.proc import ServiceProcess

PHASES = ("create", "stat", "readdir")


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

    await phase(
        "create",
        lambda: (m.create(p, 0o644, exclusive=True, write=False) for p in names),
        files,
    )
    await phase("stat", lambda: (m.stat(p) for p in names), files)

    async def listing() -> int:
        n = 0
        async for _ in m.iterdir(d, with_attrs=True):
            n += 1
        assert n == files, n
        return n

    await phase("readdir", lambda: (listing() for _ in range(rounds)), files * rounds)
    await m.aclose()
    return out


def chainfs_worker(
    address: str, idx: int, files: int, depth: int, rounds: int, barrier: Any, q: Any
) -> None:
    import uvloop

    q.put((idx, uvloop.run(_chainfs_phases(address, idx, files, depth, rounds, barrier))))


def local_worker(
    root: str, idx: int, files: int, depth: int, rounds: int, barrier: Any, q: Any
) -> None:
    d = os.path.join(root, f"c{idx}")
    os.makedirs(d)
    names = [os.path.join(d, f"f{i:07d}") for i in range(files)]
    out: dict[str, tuple[float, float, int]] = {}

    def create(p: str) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    def listing(_: int) -> int:
        n = 0
        with os.scandir(d) as it:
            for e in it:
                e.stat(follow_symlinks=False)
                n += 1
        assert n == files
        return n

    with ThreadPoolExecutor(depth) as pool:
        for name, fn, items, count in (
            ("create", create, names, files),
            ("stat", os.stat, names, files),
            ("readdir", listing, range(rounds), files * rounds),
        ):
            barrier.wait()
            t0 = time.time()
            list(pool.map(fn, items))
            out[name] = (t0, time.time(), count)
    q.put((idx, out))


def run_clients(target: Any, arg: str, args: argparse.Namespace) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.clients)
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=target,
            args=(arg, i, args.files, args.depth, args.readdir_rounds, barrier, q),
        )
        for i in range(args.clients)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"a client process failed (exit {p.exitcode})")
    rates: dict[str, float] = {}
    for phase in PHASES:
        start = min(r[1][phase][0] for r in results)
        end = max(r[1][phase][1] for r in results)
        rates[phase] = sum(r[1][phase][2] for r in results) / (end - start)
    return rates


def start_meta(kv: str, work: Path) -> tuple[ServiceProcess, Any]:
    etcd = None
    if kv == "rocksdb":
        url = f"rocksdb://{work / 'meta-kv'}"
    elif kv == "memory":
        url = "memory://"
    else:
        from chainfs.testing.etcd import EtcdCluster

        etcd = EtcdCluster(work / "etcd", members=1)
        url = etcd.url("meta")
    cfg = MetaConfig(kv_url=url, static_chains=list(range(1, 17)))
    path = work / "meta.toml"
    path.write_text(config_mod.to_toml(cfg))
    proc = ServiceProcess("meta", path, work, "meta")
    proc.start()
    return proc, etcd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=2000, help="files per client")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--depth", type=int, default=8, help="requests in flight per client")
    ap.add_argument("--readdir-rounds", type=int, default=5)
    ap.add_argument("--kv", choices=("rocksdb", "etcd", "memory"), default="rocksdb")
    ap.add_argument("--transport", choices=("frame", "grpc"), default="frame")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="meta-bench-", dir=args.dir))
    meta, etcd = start_meta(args.kv, work)
    try:
        if args.transport == "frame":
            address = "frame://" + meta.info["data_address"]
        else:
            address = meta.info["rpc_address"]
        chainfs_rates = run_clients(chainfs_worker, address, args)
    finally:
        meta.stop()
        if etcd is not None:
            etcd.stop()
    local_root = work / "local"
    local_root.mkdir()
    local_rates = run_clients(local_worker, str(local_root), args)
    shutil.rmtree(work, ignore_errors=True)

    units = {"create": "creates/s", "stat": "stats/s", "readdir": "entries/s (with attrs)"}
    print(f"\n`{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"{args.clients} client processes x {args.depth} in flight, {args.files} files each, "
        f"meta on {args.kv}, {args.transport} transport\n"
    )
    print("| phase | chainfs meta | local directory | ratio |")
    print("|---|---:|---:|---:|")
    for phase in PHASES:
        c, loc = chainfs_rates[phase], local_rates[phase]
        print(f"| {phase} ({units[phase]}) | {c:,.0f} | {loc:,.0f} | {c / loc:.3f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": shlex.join(sys.argv),
                    "params": vars(args),
                    "chainfs": chainfs_rates,
                    "local": local_rates,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
