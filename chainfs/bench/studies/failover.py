"""``chainfs bench failover`` and ``chainfs bench ha``: how long faults stall users.

``failover`` (storage), per run: a 3-node cluster (2 targets each, 3
replicas), a reader and a writer thread doing small operations in a loop;
SIGKILL one storage node; the time from the kill to the first read and the
first write *started after the kill* that succeed. Then the node restarts
and resyncs everything written while it was down (rate limit off): resync
bytes/s from the storage logs, next to iperf3 on loopback.

``ha`` (metadata and mgmtd), per run: a fresh cluster (3-member etcd, 2
mgmtd, 2 meta, 3 storage nodes, the given mgmtd lease) and three clients
running the seeded metadata load of chainfs.bench.metaload (mkdir, create =
write + rename, rename, unlink, read-back). Then, one after the other:

- kill -9 the mgmtd primary (then restart it). ``mgmtd_routing_s``: until
  GetRoutingInfo through the list of both mgmtd addresses answers again;
  ``mgmtd_meta_ops_s``: until every client had an operation it sent after the
  kill acknowledged.
- kill -9 the meta server client 0 uses. ``meta_ops_s``: the same.
- SIGSTOP that client's meta server (hung, no reset). ``meta_hang_ops_s``.
- kill -9 the etcd leader. ``etcd_ops_s``.
- kill -9 the mgmtd primary and a storage node at once (a host running both
  dies). ``host_stall_s`` is the figure: the new primary gives every node a
  full heartbeat timeout of grace after its takeover.

``storage_fenced``: how often a storage node fenced itself (no mgmtd for half
its heartbeat timeout). ``*_stall_s``: the longest stretch without any
acknowledgement in the 20 s after the fault. Every run also checks that no
call failed and every acknowledged operation is there with its bytes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chainfs.bench.ceilings import iperf3_loopback
from chainfs.bench.cluster import LocalCluster
from chainfs.bench.metaload import MetadataLoad
from chainfs.bench.studies import Echo
from chainfs.client.config import ClientConfig
from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.proto import mgmt_pb2 as mp

HB_INTERVAL_MS = 300
HB_TIMEOUT_MS = 3000
PHASE_TIMEOUT_S = 60.0  # bound of every wait for the cluster to go on
RESYNC_TIMEOUT_S = 300.0
CLIENTS = 3
WARM_ACKS = 20
AFTER_ACKS = 20
STALL_WINDOW_S = 20.0
_RESYNC_DONE = re.compile(
    r"resync \d+ -> \d+ \(chain \d+\) done: \d+ chunks \((\d+) bytes\) sent.*, ([\d.]+)s"
)


def _poll(pred: Callable[[], bool], what: str, timeout_s: float = PHASE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _runs(
    opts: dict[str, Any], one: Callable[[Path, int], dict[str, float]], echo: Echo
) -> list[dict[str, float]]:
    results = []
    for r in range(opts["runs"]):
        with tempfile.TemporaryDirectory(prefix="cfsb-fault-", dir=opts["data_dir"]) as tmp:
            res = one(Path(tmp), r)
        echo(f"run {r}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.items()))
        results.append(res)
    return results


def _spread(results: list[dict[str, float]], echo: Echo) -> None:
    for k in results[0]:
        v = sorted(r[k] for r in results)
        echo(f"  {k:20s} {statistics.median(v):8.3f}  [{v[0]:.3f} .. {v[-1]:.3f}]")


# -- storage failover ------------------------------------------------------------------------
def _probe(
    fn: Callable[[], None], kill_at: list[float], out: list[float], stop: threading.Event
) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            fn()
        except OSError:
            continue
        if kill_at and started > kill_at[0] and not out:
            out.append(time.monotonic() - kill_at[0])


def _resume_after_kill(c: LocalCluster, fs: Any, victim: int) -> tuple[float, float]:
    """Kill storage node ``victim`` under a read and a write loop: seconds to resume each."""
    payload = os.urandom(64 * 1024)
    fs.write_file("/probe_r", payload)
    kill_at: list[float] = []
    read_out: list[float] = []
    write_out: list[float] = []
    stop = threading.Event()
    n = [0]

    def do_write() -> None:
        n[0] += 1
        fs.write_file(f"/probe_w{n[0] % 50}", payload)

    def do_read() -> None:
        if fs.read_file("/probe_r") != payload:
            raise AssertionError("/probe_r read back wrong bytes")

    threads = [
        threading.Thread(target=_probe, args=(do_read, kill_at, read_out, stop), daemon=True),
        threading.Thread(target=_probe, args=(do_write, kill_at, write_out, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    kill_at.append(time.monotonic())
    c.kill_storage(victim)
    try:
        _poll(lambda: bool(read_out and write_out), "reads and writes after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(PHASE_TIMEOUT_S)
    return read_out[0], write_out[0]


def _resync(c: LocalCluster, fs: Any, victim: int, resync_mb: int) -> tuple[int, float]:
    """Write ``resync_mb`` while ``victim`` is down, restart it: (bytes resynced, seconds)."""
    blob = os.urandom(4 * 1024 * 1024)
    for i in range(resync_mb // 4):
        fs.write_file(f"/bulk{i}", blob)
    c.restart_storage(victim)
    done: list[tuple[int, float]] = []

    def finished() -> bool:
        done[:] = [
            (int(m.group(1)), float(m.group(2)))
            for p in Path(c.base_dir).glob("storage*/*.log")
            for m in _RESYNC_DONE.finditer(p.read_text(errors="replace"))
        ]
        return len(done) >= 2

    _poll(finished, "resync to finish", RESYNC_TIMEOUT_S)
    return sum(b for b, _ in done), max(s for _, s in done)


def _failover_run(base: Path, run: int, resync_mb: int) -> dict[str, float]:
    def configure(i: int, c: Any) -> None:
        c.failure.resync_rate_bytes_per_s = 0

    with LocalCluster(
        base, storage_nodes=3, targets_per_node=2, replicas=3,
        heartbeat_interval_ms=HB_INTERVAL_MS, heartbeat_timeout_ms=HB_TIMEOUT_MS,
        configure_storage=configure,
    ) as c:  # fmt: skip
        fs = c.client(config=ClientConfig(storage=StorageClientConfig(retry_total_ms=30_000)))
        victim = run % 3
        read_s, write_s = _resume_after_kill(c, fs, victim)
        total, secs = _resync(c, fs, victim, resync_mb)
    return {
        "read_resume_s": read_s,
        "write_resume_s": write_s,
        "resync_bytes": float(total),
        "resync_s": secs,
        "resync_Bps": total / secs if secs else float("nan"),
    }


def storage_failover(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    results = _runs(opts, lambda base, r: _failover_run(base, r, opts["resync_mb"]), echo)
    iperf_mbps, _ = iperf3_loopback(3)
    _spread(results, echo)
    resync = statistics.median(x["resync_Bps"] for x in results)
    echo(f"iperf3 loopback MB/s: {iperf_mbps:.1f}; resync/iperf3 = {resync / 1e6 / iperf_mbps:.3f}")
    return {"runs": results, "iperf3_loopback_MBps": iperf_mbps}


# -- metadata, mgmtd and etcd failover ----------------------------------------------------------
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


def _fault(load: MetadataLoad, do: Callable[[], Any], what: str) -> tuple[float, float]:
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


def _ha_faults(c: LocalCluster, clients: list[Any], load: MetadataLoad) -> dict[str, float]:
    out: dict[str, float] = {}
    routing_box: list[float] = []

    def kill_mgmtd() -> None:
        c.kill_mgmtd_primary()
        routing_box.append(_routing_back_after(c.address, time.monotonic()))

    def kill_meta() -> None:
        c.kill_meta(_meta_used_by(c, clients[0]))

    def hang_meta() -> Callable[[], None]:
        pid = c.metas[_meta_used_by(c, clients[0])].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        return lambda: os.kill(pid, signal.SIGCONT)

    def lose_a_host() -> None:
        c.kill_mgmtd_primary()
        c.kill_storage(0)

    out["mgmtd_meta_ops_s"], out["mgmtd_stall_s"] = _fault(load, kill_mgmtd, "mgmtd")
    out["mgmtd_routing_s"] = routing_box[0]
    c.restart_mgmtd(next(i for i, p in enumerate(c.mgmtds) if not p.alive()))
    out["meta_ops_s"], out["meta_stall_s"] = _fault(load, kill_meta, "meta kill")
    c.restart_meta(next(i for i, p in enumerate(c.metas) if not p.alive()))
    _poll(lambda: _online_metas(c.address) == 2, "the meta server back")
    out["meta_hang_ops_s"], out["meta_hang_stall_s"] = _fault(load, hang_meta, "hang")
    out["etcd_ops_s"], out["etcd_stall_s"] = _fault(
        load, lambda: c.kill_etcd(c.etcd_leader()), "etcd kill"
    )
    out["host_ops_s"], out["host_stall_s"] = _fault(load, lose_a_host, "host loss")
    return out


def _ha_run(base: Path, run: int, lease_ms: int) -> dict[str, float]:
    with LocalCluster(
        base, storage_nodes=3, targets_per_node=1, replicas=3, kv="etcd", etcd_members=3,
        mgmtds=2, metas=2, lease_ms=lease_ms, lease_renew_interval_ms=max(50, lease_ms // 6),
    ) as c:  # fmt: skip
        clients = [c.client() for _ in range(CLIENTS)]
        load = MetadataLoad(clients, seed=run, root="/ha")
        load.start()
        try:
            out = _ha_faults(c, clients, load)
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


def ha(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    results = _runs(opts, lambda base, r: _ha_run(base, r, opts["lease_ms"]), echo)
    echo(f"{opts['runs']} runs, lease {opts['lease_ms']} ms (seconds: median [min..max])")
    _spread(results, echo)
    return {"lease_ms": opts["lease_ms"], "runs": results}
