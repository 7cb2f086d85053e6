"""``chainfs bench rebalance``: how fast replicas move onto a new node.

A cluster of 3 storage nodes (``--targets`` targets each, 3 replicas, so that
many chains) is filled with ``--data-mib`` of 4 MiB files; a fourth node
joins and ``add-node`` (rate limit off: 0 = unlimited) moves replicas onto it
until it holds its share. The figure is the bytes the moved replicas hold
(their used bytes once they serve) over the run's wall time, from the first
chain update to the last (joins, resyncs, leaves), next to iperf3 on loopback
measured right after each run (on a shared machine both move with the load:
the ratio is taken per run, and its median reported).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from chainfs.bench.ceilings import iperf3_loopback
from chainfs.bench.cluster import LocalCluster
from chainfs.bench.studies import Echo
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import mgmt_pb2 as mp

HB_INTERVAL_MS = 300
RUN_TIMEOUT_S = 600.0  # bound of one rebalance run
_POLL_S = 0.2


async def _add_node(address: str, node_id: int, concurrency: int) -> mp.RebalanceStatus:
    async with MgmtClient(address, timeout_s=30) as m:
        req = mp.RebalanceReq(
            mode=mp.ADD_NODE, node_id=node_id, rate_bytes_per_s=0, max_concurrent_moves=concurrency
        )
        await m.rebalance(req)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (s := await m.rebalance_status()).running:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rebalance still running after {RUN_TIMEOUT_S}s")
            await asyncio.sleep(_POLL_S)
        # The moved replicas' sizes from heartbeats sent after the run ended.
        await asyncio.sleep(3 * HB_INTERVAL_MS / 1000)
        routing = await m.get_routing(0)
        assert routing is not None
        for move in s.moves:
            move.bytes = routing.targets[move.to_target].used_bytes
        return s


def _one_run(base: Path, opts: dict[str, Any]) -> dict[str, float]:
    with LocalCluster(
        base, storage_nodes=3, targets_per_node=opts["targets"], replicas=3,
        heartbeat_interval_ms=HB_INTERVAL_MS,
    ) as c:  # fmt: skip
        fs = c.client()
        blob = os.urandom(4 * 1024 * 1024)
        for i in range(opts["data_mib"] // 4):
            fs.write_file(f"/bulk{i}", blob)
        new = c.add_storage()
        with c.admin_environment():  # Rebalance is an admin call (the cluster requires a token)
            status = asyncio.run(
                _add_node(c.address, int(c.storage[new].info["node_id"]), opts["concurrency"])
            )
    if status.moves_failed or not status.moves_done:
        raise RuntimeError(f"rebalance: {status.moves_failed} failed, {status.moves_done} done")
    moved = sum(m.bytes for m in status.moves)
    return {
        "moves": float(status.moves_done),
        "bytes_moved": float(moved),
        "seconds": status.elapsed_s,
        "rebalance_Bps": moved / status.elapsed_s,
    }


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    results = []
    for r in range(opts["runs"]):
        with tempfile.TemporaryDirectory(prefix="cfsb-rebalance-", dir=opts["data_dir"]) as tmp:
            res = _one_run(Path(tmp), opts)
        iperf_mbps, _ = iperf3_loopback(opts["iperf_seconds"])
        res["iperf3_loopback_MBps"] = iperf_mbps
        res["ratio_to_iperf3"] = res["rebalance_Bps"] / 1e6 / iperf_mbps
        echo(f"run {r}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.items()))
        results.append(res)
    rate = statistics.median(x["rebalance_Bps"] for x in results) / 1e6
    ratio = statistics.median(x["ratio_to_iperf3"] for x in results)
    echo(
        f"rebalance MB/s (median of {len(results)}): {rate:.1f}; "
        f"rebalance/iperf3 (median of the runs' ratios) = {ratio:.3f}"
    )
    return {"runs": results, "rebalance_MBps": rate, "ratio_to_iperf3": ratio}
