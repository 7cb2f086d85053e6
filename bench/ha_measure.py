"""Measure metadata/mgmtd failover (issue 7, item 7): figures, not a test.

    .venv/bin/python bench/ha_measure.py --runs 5 [--lease-ms 3000] [--json out.json]

Per run: a fresh cluster (3-member etcd, 2 mgmtd, 2 meta, 3 storage nodes, the
given mgmtd lease; everything else default) and three clients running the
seeded metadata load of chainfs.testing.metaload (mkdir, create = write +
rename, rename, unlink, read-back). Then, one after the other:

- kill -9 the mgmtd primary (then restart it). ``mgmtd_routing_s``: until
  GetRoutingInfo through the list of both mgmtd addresses answers again (what
  storage heartbeats, new clients and routing refreshes wait for);
  ``mgmtd_meta_ops_s``: until every client had an operation it sent after the
  kill acknowledged (a client blocked in a call sends its next one only once
  that call is done).
- kill -9 the meta server client 0 uses. ``meta_ops_s``: the same (client 0's
  in-flight call fails over).
- SIGSTOP that client's meta server (hung, no reset). ``meta_hang_ops_s``: the same.
- kill -9 the etcd leader. ``etcd_ops_s``: the same.
- kill -9 the mgmtd primary and a storage node at once (a host running both
  dies). ``host_stall_s`` is the figure: the new primary gives every node a
  full heartbeat timeout of grace after its takeover, so the dead node's chain
  changes only after the handover plus the heartbeat timeout, and every write
  to its chains waits that long.

``storage_fenced``: how often a storage node fenced itself (no mgmtd for half
its heartbeat timeout) during the run. ``*_stall_s``: the longest stretch
without any acknowledgement in the 20 s after the fault. Every run also
checks that no call failed and every acknowledged operation is there with its
bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import mgmt_pb2 as mp
from chainfs.testing.cluster import LocalCluster
from chainfs.testing.metaload import MetadataLoad

CLIENTS = 3
WARM_ACKS = 20
AFTER_ACKS = 20
PHASE_TIMEOUT_S = 60.0
STALL_WINDOW_S = 20.0


def _poll(pred: Any, what: str) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _routing_back_after(address: str, killed_at: float) -> float:
    """Seconds from ``killed_at`` until a GetRoutingInfo call succeeds again."""

    async def go() -> float:
        async with MgmtClient(address, timeout_s=1.0) as m:
            deadline = time.monotonic() + PHASE_TIMEOUT_S
            while True:
                try:
                    await m.get_routing()
                    return time.monotonic() - killed_at
                except ChainfsError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.01)

    return asyncio.run(go())


def _online_metas(address: str) -> int:
    async def go() -> int:
        async with MgmtClient(address, timeout_s=5.0) as m:
            routing = await m.get_routing()
            assert routing is not None
            return len(routing.nodes_of_type(mp.META))

    return asyncio.run(go())


def _meta_used_by(c: LocalCluster, fs: Any) -> int:
    current = fs.aio.io.meta._current
    for i, p in enumerate(c.metas):
        if current in (f"frame://{p.info['data_address']}", p.info["rpc_address"]):
            return i
    raise RuntimeError(f"{current} is none of our meta servers")


def _fault(load: MetadataLoad, do: Any, what: str) -> tuple[float, float]:
    """Warm up, inject the fault, wait until every client goes on: (resume s, stall s)."""
    n = load.ack_count()
    _poll(lambda: load.ack_count() >= n + WARM_ACKS, "warm-up")
    at = time.monotonic()
    undo = do()

    def going_on() -> bool:
        return load.acks_started_after(at) >= AFTER_ACKS and all(
            load.acks_started_after(at, k) > 0 for k in range(CLIENTS)
        )

    try:
        _poll(going_on, f"operations after {what}")
    finally:
        if undo is not None:
            undo()
    resumed = max(load.resumed_after(at, k) or 0.0 for k in range(CLIENTS))
    time.sleep(max(0.0, min(2.0, at + STALL_WINDOW_S - time.monotonic())))
    return resumed, load.longest_stall(at, min(time.monotonic(), at + STALL_WINDOW_S))


def one_run(base: Path, run: int, lease_ms: int) -> dict[str, float]:
    with LocalCluster(
        base,
        storage_nodes=3,
        targets_per_node=1,
        replicas=3,
        kv="etcd",
        etcd_members=3,
        mgmtds=2,
        metas=2,
        lease_ms=lease_ms,
        lease_renew_interval_ms=max(50, lease_ms // 6),
    ) as c:
        clients = [c.client() for _ in range(CLIENTS)]
        load = MetadataLoad(clients, seed=run, root="/ha")
        load.start()
        out: dict[str, float] = {}
        try:
            routing_box: list[float] = []

            def kill_mgmtd() -> None:
                c.kill_mgmtd_primary()
                routing_box.append(_routing_back_after(c.address, time.monotonic()))

            out["mgmtd_meta_ops_s"], out["mgmtd_stall_s"] = _fault(load, kill_mgmtd, "mgmtd")
            out["mgmtd_routing_s"] = routing_box[0]
            c.restart_mgmtd(next(i for i, p in enumerate(c.mgmtds) if not p.alive()))

            def kill_meta() -> None:
                c.kill_meta(_meta_used_by(c, clients[0]))

            out["meta_ops_s"], out["meta_stall_s"] = _fault(load, kill_meta, "meta kill")
            c.restart_meta(next(i for i, p in enumerate(c.metas) if not p.alive()))
            _poll(lambda: _online_metas(c.address) == 2, "the meta server back")

            def hang_meta() -> Any:
                pid = c.metas[_meta_used_by(c, clients[0])].pid
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
                return lambda: os.kill(pid, signal.SIGCONT)

            out["meta_hang_ops_s"], out["meta_hang_stall_s"] = _fault(load, hang_meta, "hang")

            def kill_etcd() -> None:
                c.kill_etcd(c.etcd_leader())

            out["etcd_ops_s"], out["etcd_stall_s"] = _fault(load, kill_etcd, "etcd kill")

            def lose_a_host() -> None:
                c.kill_mgmtd_primary()
                c.kill_storage(0)

            out["host_ops_s"], out["host_stall_s"] = _fault(load, lose_a_host, "host loss")
        finally:
            load.stop()
        if load.errors or load.problems:
            raise RuntimeError(f"failed calls {load.errors[:5]}, problems {load.problems[:5]}")
        bad = load.verify()
        if bad:
            raise RuntimeError(f"acknowledged operations lost: {bad[:5]}")
        out["acked_ops"] = load.ack_count()
        # Storage fences itself after half the heartbeat timeout without mgmtd: a
        # handover slower than that would show here.
        out["storage_fenced"] = sum(
            p.log_path.read_text(errors="replace").count("fenced, serving nothing")
            for p in c.storage
        )
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lease-ms", type=int, default=3000, help="mgmtd lease (default: mgmtd's)")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args()
    results = []
    for run in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="chainfs-ha-"))
        try:
            res = one_run(base, run, args.lease_ms)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps({"run": run, **{k: round(v, 3) for k, v in res.items()}}), flush=True)
        results.append(res)
    print(f"\n{args.runs} runs, lease {args.lease_ms} ms (seconds: median [min..max])")
    for k in results[0]:
        v = sorted(r[k] for r in results)
        print(f"  {k:20s} {statistics.median(v):8.3f}  [{v[0]:.3f} .. {v[-1]:.3f}]")
    if args.json:
        args.json.write_text(json.dumps({"lease_ms": args.lease_ms, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
