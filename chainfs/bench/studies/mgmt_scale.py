"""``chainfs bench mgmt-scale``: mgmtd's CPU with a thousand storage nodes.

The real mgmtd in one process with simulated nodes and a simulated clock
(:mod:`chainfs.mgmt_service.simulation`). Figures are process CPU seconds
spent inside mgmtd per simulated second, as a fraction of one core:

- ``steady``: every node heartbeats once per interval and nothing changes.
- ``failure``: ``--failures`` nodes go silent at once, are timed out, come
  back (heartbeating again), resync and serve; from the failure until every
  target serves again. Each routing change is sent whole to every node at its
  next heartbeat: ``routing_push`` is the encoding of those replies
  (measured once per version, counted per node).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chainfs.bench.studies import Echo
from chainfs.mgmt_service.simulation import CpuMeter, MgmtSim, SimConfig
from chainfs.proto import mgmt_pb2 as mp

SETTLE_LIMIT_S = 120  # bound on the simulated wait for every target to serve again


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    return asyncio.run(_measure(opts, echo))


async def _measure(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    cfg = SimConfig(
        nodes=int(opts["nodes"]),
        targets_per_node=int(opts["targets_per_node"]),
        heartbeat_interval_ms=int(opts["heartbeat_interval_ms"]),
    )
    sim = MgmtSim(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    await sim.start()
    echo(
        f"started {cfg.nodes} nodes, {len(sim.state.info.targets)} targets, "
        f"{len(sim.state.info.chains)} chains in {time.perf_counter() - t0:.1f}s "
        f"({time.process_time() - c0:.1f}s CPU)"
    )
    steps_per_s = 1000 / cfg.check_interval_ms
    await _steps(sim, int(2 * steps_per_s))  # first reports settle
    steady_s = float(opts["seconds"])
    steady = await _steps(sim, int(steady_s * steps_per_s))
    version = sim.state.info.version
    victims = sim.nodes[1 : 1 + int(opts["failures"])]
    for node in victims:
        node.up = False
    timeout_steps = int((cfg.heartbeat_timeout_ms / 1000 + 1) * steps_per_s)
    failure = await _steps(sim, timeout_steps)
    for node in victims:
        node.up = True
    settle_steps = 0
    while not _all_serving(sim):
        if settle_steps > SETTLE_LIMIT_S * steps_per_s:
            raise RuntimeError(f"targets not serving after {SETTLE_LIMIT_S} simulated s")
        failure = failure.plus(await _steps(sim, 1))
        settle_steps += 1
    failure_s = (timeout_steps + settle_steps) / steps_per_s
    steady_figures = _figures(steady, steady_s)
    failure_figures = _figures(failure, failure_s)
    report = {
        "nodes": cfg.nodes,
        "targets": len(sim.state.info.targets),
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "steady": steady_figures,
        "failure": failure_figures,
        "failure_nodes": len(victims),
        "failure_routing_versions": sim.state.info.version - version,
        "failure_sim_s": failure_s,
    }
    echo("| phase | mgmtd CPU | heartbeats | per heartbeat | routing pushes | checker |")
    echo("|---|---|---|---|---|---|")
    for phase, f in (("steady", steady_figures), ("failure", failure_figures)):
        echo(
            f"| {phase} | {f['mgmtd_core_fraction']:.3f} | {f['heartbeat_core_fraction']:.3f} "
            f"| {f['us_per_heartbeat']:.0f} us | {f['routing_push_core_fraction']:.3f} "
            f"({f['routing_pushes']}) | {f['checker_core_fraction']:.3f} |"
        )
    echo("(CPU figures: fractions of one core)")
    echo(
        f"failure: {len(victims)} nodes, {report['failure_routing_versions']} routing versions "
        f"in {failure_s:.0f} simulated s"
    )
    return report


async def _steps(sim: MgmtSim, n: int) -> CpuMeter:
    start = sim.cpu.minus(CpuMeter())
    for _ in range(n):
        await sim.step()
    return sim.cpu.minus(start)


def _all_serving(sim: MgmtSim) -> bool:
    return all(t.public_state == mp.SERVING for t in sim.state.info.targets if t.chain_id)


def _figures(cpu: CpuMeter, seconds: float) -> dict[str, Any]:
    return {
        "mgmtd_core_fraction": cpu.total_s() / seconds,
        "heartbeat_core_fraction": cpu.heartbeat_s / seconds,
        "us_per_heartbeat": 1e6 * cpu.heartbeat_s / max(cpu.heartbeats, 1),
        "routing_push_core_fraction": cpu.routing_push_s / seconds,
        "routing_pushes": cpu.routing_pushes,
        "checker_core_fraction": cpu.checker_s / seconds,
    }
