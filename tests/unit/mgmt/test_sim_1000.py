"""1,000 storage nodes, 10,000 targets, rolling failures: the real mgmtd in one process.

mgmtd (cluster state, target state machine, chain table, the heartbeat
checker's round) runs on a simulated clock; the nodes are
:class:`~chainfs.mgmt_service.simulation.SimNode` objects heartbeating every
simulated second. Nodes fail (silent: a crash or a partition) two at a time,
chosen so that every chain keeps a live up-to-date replica; some come back
before the heartbeat timeout, the others after it, by re-registering (a
restart: their targets resync) or by heartbeating again (a healed partition).

After every checker interval: each chain's head serves, a head on a node
silent for longer than the timeout plus one check is gone, no target is in
two chains and each chain spans distinct nodes, chain and routing versions
never go back (and a chain whose order or states changed has a newer
version), and a node polling routing (heartbeats carry the newer routing)
sees a node marked offline within two heartbeat intervals of mgmtd marking
it. At the end every target serves again.

The CPU figures (measured, never asserted) are printed; ``chainfs bench
mgmt-scale`` reports the same.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.mgmt_service.simulation import CpuMeter, MgmtSim, SimConfig, SimNode
from chainfs.proto import mgmt_pb2 as mp

pytestmark = pytest.mark.timeout(600)

CFG = SimConfig(nodes=1000, targets_per_node=10, replicas=3)
STEPS_PER_S = 1000 // CFG.check_interval_ms
INTERVAL_S = CFG.heartbeat_interval_ms / 1000.0
TIMEOUT_S = CFG.heartbeat_timeout_ms / 1000.0
FAIL_EVERY_STEPS = 3 * STEPS_PER_S  # two nodes fail every 3 simulated seconds
FAILING_S = 30  # failures are started during this long
SETTLE_S = 30  # then everything comes back (at most 18 s down) and resyncs


class Invariants:
    """What must hold after every step, and what it remembers between steps."""

    def __init__(self, sim: MgmtSim) -> None:
        self.sim = sim
        self.routing_version = 0
        self.encoded = b""  # the routing info at the last full check
        self.chains: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {}
        self.down_since: dict[int, float] = {}  # node id -> sim time it went silent
        self.marked_at: dict[int, float] = {}  # node id -> sim time mgmtd marked it offline
        self.seen_offline: set[int] = set()

    def check(self) -> None:
        info = self.sim.state.info
        assert info.version >= self.routing_version, "routing version went back"
        self.routing_version = info.version
        encoded = info.SerializeToString(deterministic=True)
        if encoded != self.encoded:  # unchanged: what held last step holds
            self.encoded = encoded
            self._check_chains(info)
        self._check_silent_heads()
        self._check_poller()

    def _check_chains(self, info: mp.RoutingInfo) -> None:
        states = {t.target_id: t for t in info.targets}
        in_chain: Counter[int] = Counter()
        for c in info.chains:
            in_chain.update(c.targets)
            sig = tuple((t, states[t].public_state) for t in c.targets)
            old = self.chains.get(c.chain_id)
            if old is not None:
                assert c.chain_version >= old[0], f"chain {c.chain_id} version went back"
                if sig != old[1]:
                    assert c.chain_version > old[0], f"chain {c.chain_id} changed, same version"
            self.chains[c.chain_id] = (c.chain_version, sig)
            assert all(states[t].chain_id == c.chain_id for t in c.targets)
            assert len({states[t].node_id for t in c.targets}) == len(c.targets)
            head = states[c.targets[0]]
            assert head.public_state == mp.SERVING, f"chain {c.chain_id} head is not serving"
        assert max(in_chain.values()) == 1, "a target in two chains"

    def _check_silent_heads(self) -> None:
        """A node silent past the timeout (plus the checker's rounds) heads nothing."""
        state = self.sim.state
        now = self.sim.clock.now
        for nid, since in self.down_since.items():
            if now - since <= TIMEOUT_S + 2 * CFG.check_interval_ms / 1000.0:
                continue
            for t in state.targets_of(nid):
                chain = state.chain(t.chain_id)
                assert chain is None or chain.targets[0] != t.target_id, (
                    f"chain {t.chain_id} still headed by node {nid}, silent {now - since:.1f}s"
                )

    def _check_poller(self) -> None:
        """Node 0 never fails and only heartbeats: it must see each marked node offline."""
        now = self.sim.clock.now
        for nid in self.down_since:
            n = self.sim.state.node(nid)
            if n is not None and n.status == mp.NODE_OFFLINE:
                self.marked_at.setdefault(nid, now)
        poller = self.sim.nodes[0]
        assert poller.routing is not None
        seen = {n.node_id for n in poller.routing.nodes if n.status == mp.NODE_OFFLINE}
        for nid, at in self.marked_at.items():
            if nid in seen:
                self.seen_offline.add(nid)
            elif nid not in self.seen_offline:
                assert now - at <= 2 * INTERVAL_S, f"poller still sees node {nid} online"


def _eligible(sim: MgmtSim, node: SimNode, troubled: set[int]) -> bool:
    """Failing ``node`` leaves every chain of it a live, serving replica."""
    state = sim.state
    for tid in node.target_ids:
        t = state.target(tid)
        assert t is not None
        chain = state.chain(t.chain_id)
        assert chain is not None
        for other in chain.targets:
            o = state.target(other)
            assert o is not None
            if o.node_id in troubled or o.public_state != mp.SERVING:
                return False
    return True


async def test_rolling_failures_on_1000_nodes() -> None:
    rng = random.Random(1000)
    sim = MgmtSim(CFG)
    await sim.start()
    assert len(sim.state.info.targets) == 10_000 and len(sim.state.info.chains) == 3333
    inv = Invariants(sim)
    # The first reports settle (the one target left out of the chains reports
    # online, as a waiting target does), then every heartbeat is a no-op.
    for _ in range(2 * STEPS_PER_S):
        await sim.step()
        inv.check()
    before = sim.cpu.minus(CpuMeter())
    for _ in range(5 * STEPS_PER_S):
        await sim.step()
        inv.check()
    steady = sim.cpu.minus(before)
    assert steady.routing_pushes == 0, "steady heartbeats changed routing"

    plans: dict[int, tuple[int, str]] = {}  # node index -> (step it returns, how)
    troubled: set[int] = set()  # node ids down, or back but not all serving again
    fail_start = sim.cpu.minus(CpuMeter())
    steps = (FAILING_S + SETTLE_S) * STEPS_PER_S
    for step in range(steps):
        if step < FAILING_S * STEPS_PER_S and step % FAIL_EVERY_STEPS == 0:
            picked = 0
            for node in rng.sample(sim.nodes[1:], 40):  # node 0 polls routing: never fails
                if picked == 2:
                    break
                if node.index in plans or not _eligible(sim, node, troubled):
                    continue
                picked += 1
                how = rng.choice(["blip", "restart", "partition"])
                down_s = 4 if how == "blip" else rng.uniform(TIMEOUT_S + 2, TIMEOUT_S + 8)
                node.up = False
                troubled.add(node.node_id)
                inv.down_since[node.node_id] = sim.clock.now
                plans[node.index] = (step + int(down_s * STEPS_PER_S), how)
        for index, (back_at, how) in list(plans.items()):
            if back_at == step:
                node = sim.nodes[index]
                if how == "restart":
                    await sim.register(node, reregister=True)
                node.up = True
                inv.down_since.pop(node.node_id)
                inv.marked_at.pop(node.node_id, None)
        await sim.step()
        inv.check()
        troubled = {
            sim.nodes[i].node_id
            for i, (back_at, _) in plans.items()
            if back_at > step or not _all_serving(sim, sim.nodes[i])
        }
    churn = sim.cpu.minus(fail_start)
    failed = len(plans)
    detected = len(inv.seen_offline)
    assert failed >= 15 and detected >= 5, (failed, detected)
    assert all(t.public_state == mp.SERVING for t in sim.state.info.targets if t.chain_id)
    assert all(n.status == mp.NODE_ONLINE for n in sim.state.info.nodes)
    # Every change reached the store: a new primary would load this very state.
    stored = await sim.svc.store.transact(
        lambda tx: ClusterState.load(tx, sim.svc.cfg.cluster_id), read_only=True
    )
    assert stored.encode() == sim.state.encode()
    _print_figures(steady, 5.0, churn, FAILING_S + SETTLE_S, failed, detected)


def _all_serving(sim: MgmtSim, node: SimNode) -> bool:
    return all(
        (t := sim.state.target(tid)) is not None and t.public_state == mp.SERVING
        for tid in node.target_ids
    )


def _print_figures(
    steady: CpuMeter, steady_s: float, churn: CpuMeter, churn_s: float, failed: int, seen: int
) -> None:
    print(
        f"\n1000 nodes, 10000 targets, 1 s heartbeats: steady mgmtd CPU "
        f"{100 * steady.total_s() / steady_s:.1f}% of a core "
        f"(heartbeats {100 * steady.heartbeat_s / steady_s:.1f}%, "
        f"{1e6 * steady.heartbeat_s / max(steady.heartbeats, 1):.0f} us each; "
        f"checker {100 * steady.checker_s / steady_s:.1f}%)"
    )
    print(
        f"rolling failures ({failed} nodes, {seen} timed out): mgmtd CPU "
        f"{100 * churn.total_s() / churn_s:.1f}% of a core "
        f"(heartbeats {100 * churn.heartbeat_s / churn_s:.1f}%, routing pushes "
        f"{100 * churn.routing_push_s / churn_s:.1f}% for {churn.routing_pushes}, "
        f"checker {100 * churn.checker_s / churn_s:.1f}%)"
    )


async def test_a_new_primary_steps_every_chain_once_then_only_what_changes() -> None:
    """After loading the state, one checker round steps every chain; when none
    changes, later rounds must not walk them all again (no transaction either)."""
    sim = MgmtSim(SimConfig(nodes=30, targets_per_node=3))
    await sim.start()
    await sim.svc._load_state()  # as a takeover does
    assert sim.state.has_unsettled_chains()
    version = sim.state.info.version
    await sim.step()
    assert not sim.state.has_unsettled_chains()
    assert sim.state.info.version == version
