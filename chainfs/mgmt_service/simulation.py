"""mgmtd with a thousand simulated storage nodes, in one process, on a simulated clock.

The real :class:`~chainfs.mgmt_service.service.Mgmtd` (cluster state, target
state machine, chain table, the heartbeat checker's round) runs on a
``memory://`` store; the storage nodes are plain objects that register,
heartbeat and resync on a :class:`SimClock`. Their messages are direct calls,
with each request encoded and decoded and each reply encoded, as the framed
transport would. A reply that carries the whole routing info is the same
object for every node behind at that version, so its encoding is measured
once per routing version and counted for every node it goes to
(``routing_push_s``) instead of being repeated a thousand times.

Used by the 1,000-node test (tests/unit/mgmt/test_sim_1000.py) and by
``chainfs bench mgmt-scale``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from chainfs.common.rpc.mgmt_client import local_state_for
from chainfs.kv.memory import MemoryStore
from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.mgmt_service.service import Mgmtd
from chainfs.proto import mgmt_pb2 as mp

CAPACITY_BYTES = 8 << 40  # what each simulated target reports


@dataclass
class SimConfig:
    nodes: int = 1000
    targets_per_node: int = 10
    replicas: int = 3
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 10_000
    check_interval_ms: int = 200
    # A syncing target reports up-to-date this long after it was told to sync.
    resync_s: float = 3.0


class SimClock:
    """Seconds of simulated time; mgmtd reads it where it would read time.monotonic()."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now


@dataclass
class SimNode:
    index: int
    next_heartbeat_s: float
    node_id: int = 0
    target_ids: list[int] = field(default_factory=list)
    up: bool = True
    routing: mp.RoutingInfo | None = None  # the newest routing info it received
    syncing_since: dict[int, float] = field(default_factory=dict)  # target -> sim time

    @property
    def address(self) -> str:
        return f"sim-{self.index}:1"


@dataclass
class CpuMeter:
    """Process CPU seconds spent inside mgmtd, by kind of work."""

    heartbeat_s: float = 0.0  # decode, handle, encode (routing-free part)
    heartbeats: int = 0
    routing_push_s: float = 0.0  # encoding the routing info for each node behind
    routing_pushes: int = 0
    checker_s: float = 0.0
    checker_rounds: int = 0

    def total_s(self) -> float:
        return self.heartbeat_s + self.routing_push_s + self.checker_s

    def minus(self, earlier: CpuMeter) -> CpuMeter:
        return CpuMeter(
            *(getattr(self, f) - getattr(earlier, f) for f in self.__dataclass_fields__)
        )

    def plus(self, other: CpuMeter) -> CpuMeter:
        return CpuMeter(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def _call(method: Any) -> Any:
    """The servicer method without its gRPC wrapper (as the framed handler calls it)."""
    return method.__wrapped__


class MgmtSim:
    """A primary mgmtd and ``cfg.nodes`` simulated storage nodes."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.clock = SimClock()
        mcfg = MgmtdConfig(
            kv_url="memory://",
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            heartbeat_timeout_ms=cfg.heartbeat_timeout_ms,
            check_interval_ms=cfg.check_interval_ms,
            # The lease runs on the real clock: one round holds it for the whole run.
            lease_ms=3_600_000,
            lease_renew_interval_ms=1000,
        )
        mcfg.validate()
        self.svc = Mgmtd(mcfg, MemoryStore(), 1, "sim-mgmtd:1", clock=self.clock)
        interval_s = cfg.heartbeat_interval_ms / 1000.0
        self.nodes = [
            SimNode(i, self.clock.now + interval_s * i / cfg.nodes) for i in range(cfg.nodes)
        ]
        self.cpu = CpuMeter()
        self._states: dict[int, dict[int, int]] = {}  # routing version -> target -> public
        self._pushed: dict[int, float] = {}  # id(HeartbeatRsp) -> seconds to encode it
        self._next_check_s = self.clock.now

    @property
    def state(self) -> ClusterState:
        assert self.svc.state is not None, "the simulated mgmtd is not primary"
        return self.svc.state

    async def start(self) -> None:
        """Take the lease, register every node, create the chains."""
        await self.svc.election_round()
        for node in self.nodes:
            await self.register(node, reregister=False)
        rsp = await _call(Mgmtd.CreateChains)(
            self.svc, mp.CreateChainsReq(replicas=self.cfg.replicas, init=True), None
        )
        for node in self.nodes:  # as if each watched routing: serving from the start
            node.routing = rsp.routing

    async def register(self, node: SimNode, reregister: bool) -> None:
        """First start, or (``reregister``) a restart: its targets must resync."""
        info = mp.NodeInfo(
            node_id=node.node_id,
            type=mp.STORAGE,
            hostname=f"sim{node.index}",
            rpc_address=node.address,
            data_address=node.address,
        )
        known = node.target_ids or [0] * self.cfg.targets_per_node  # 0: mgmtd assigns
        # New empty targets are up to date; a restarted node's must resync.
        local = mp.ONLINE if reregister else mp.UPTODATE
        targets = [
            mp.TargetInfo(
                target_id=tid,
                path=f"/sim/{node.index}/{j}",
                capacity_bytes=CAPACITY_BYTES,
                local_state=local,
            )
            for j, tid in enumerate(known)
        ]
        req = mp.RegisterNodeReq(node=info, targets=targets, reregister=reregister)
        rsp = await _call(Mgmtd.RegisterNode)(self.svc, req, None)
        node.node_id, node.target_ids = rsp.node_id, list(rsp.target_ids)
        node.routing = rsp.routing
        node.syncing_since.clear()
        node.up = True

    def public_states(self, routing: mp.RoutingInfo) -> dict[int, int]:
        """Target -> public state in ``routing`` (built once per version)."""
        states = self._states.get(routing.version)
        if states is None:
            states = {t.target_id: t.public_state for t in routing.targets}
            self._states = {routing.version: states}  # nodes move on together
        return states

    def _report(self, node: SimNode) -> mp.HeartbeatReq:
        """What the node's storage service would report (see local_state_for)."""
        assert node.routing is not None
        states = self.public_states(node.routing)
        now = self.clock.now
        req = mp.HeartbeatReq(node_id=node.node_id, routing_version=node.routing.version)
        for tid in node.target_ids:
            public = states.get(tid, mp.PUBLIC_STATE_UNSPECIFIED)
            if public == mp.SYNCING:
                node.syncing_since.setdefault(tid, now)
            else:
                node.syncing_since.pop(tid, None)
            done = now - node.syncing_since.get(tid, now) >= self.cfg.resync_s
            req.targets.add(
                target_id=tid,
                local_state=local_state_for(public, sync_done=public == mp.SYNCING and done),
                used_bytes=1 << 30,
                capacity_bytes=CAPACITY_BYTES,
            )
        return req

    async def heartbeat(self, node: SimNode) -> None:
        wire = self._report(node).SerializeToString()
        t0 = time.process_time()
        rsp = await _call(Mgmtd.Heartbeat)(self.svc, mp.HeartbeatReq.FromString(wire), None)
        if rsp.HasField("routing"):
            self.cpu.heartbeat_s += time.process_time() - t0
            self._count_push(rsp)
            node.routing = rsp.routing
        else:
            rsp.SerializeToString()
            self.cpu.heartbeat_s += time.process_time() - t0
        self.cpu.heartbeats += 1

    def _count_push(self, rsp: mp.HeartbeatRsp) -> None:
        cost = self._pushed.get(id(rsp))
        if cost is None:
            t0 = time.process_time()
            rsp.SerializeToString()
            cost = time.process_time() - t0
            self._pushed = {id(rsp): cost}  # one shared answer per routing version
        self.cpu.routing_push_s += cost
        self.cpu.routing_pushes += 1

    async def step(self) -> None:
        """One checker interval: every heartbeat due in it (at its own time),
        then the checker's round."""
        end = self._next_check_s + self.cfg.check_interval_ms / 1000.0
        interval_s = self.cfg.heartbeat_interval_ms / 1000.0
        due = sorted((n for n in self.nodes if n.next_heartbeat_s < end), key=_due)
        for node in due:
            self.clock.now = max(self.clock.now, node.next_heartbeat_s)
            node.next_heartbeat_s += interval_s
            if node.up:
                await self.heartbeat(node)
        self.clock.now = end
        self._next_check_s = end
        t0 = time.process_time()
        await self.svc.check_heartbeats()
        self.cpu.checker_s += time.process_time() - t0
        self.cpu.checker_rounds += 1


def _due(node: SimNode) -> float:
    return node.next_heartbeat_s
