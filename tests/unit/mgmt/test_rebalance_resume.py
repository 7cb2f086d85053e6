"""A stored rebalance run resumed by a new primary, against the in-memory
ClusterState: each move goes on from where the chain table shows it, whatever
its stored state says, and a finished run stays readable."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.mgmt_service.rebalance import Rebalancer
from chainfs.proto import mgmt_pb2 as mp
from tests.unit.mgmt.conftest import eventually
from tests.unit.mgmt.test_rebalance_plan import _cluster, _join

pytestmark = pytest.mark.timeout(60)


class Primary:
    """The primary's state as the Rebalancer sees it; resync finishes at once."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.stored: list[mp.RebalanceRun] = []

    async def mutate(self, op: Callable[[ClusterState], None]) -> tuple[None, ClusterState]:
        trial = self.state.copy()
        op(trial)
        trial.finish(self.state)
        self.state = trial
        return None, trial

    async def wait_change(self, known: int, wait_ms: int) -> ClusterState:
        await self.mutate(_sync_all)  # every joined target is filled
        return self.state

    async def persist(self, run: mp.RebalanceRun) -> None:
        self.stored.append(mp.RebalanceRun.FromString(run.SerializeToString()))

    def rebalancer(self) -> Rebalancer:
        return Rebalancer(
            self.mutate,
            lambda: self.state,
            self.wait_change,
            lambda target_id: 1000,
            poll_ms=10,
            move_timeout_s=10,
            drop_timeout_s=0.5,
            persist=self.persist,
        )


def _sync_all(s: ClusterState) -> None:
    for c in s.info.chains:
        head = s.target(c.targets[0])
        assert head is not None
        for tid in c.targets:
            t = s.target(tid)
            assert t is not None
            if t.public_state != mp.SERVING:
                t.public_state = mp.SERVING
                t.local_state = head.local_state


def _members(s: ClusterState, chain_id: int) -> list[int]:
    c = s.chain(chain_id)
    assert c is not None
    return list(c.targets)


async def test_resume_goes_on_from_each_move_state() -> None:
    s = _cluster(3, 5)  # 5 chains, each with one target on every node
    new = _join(s, 5)
    src_node = s.info.nodes[0].node_id
    free = s.free_targets_by_node()[new]
    moves = []
    for c, to in zip(sorted(s.info.chains, key=lambda c: c.chain_id), free, strict=True):
        frm = next(t for t in c.targets if s.target(t).node_id == src_node)  # type: ignore[union-attr]
        moves.append(
            mp.Move(
                chain_id=c.chain_id,
                from_target=frm,
                from_node=src_node,
                to_target=to,
                to_node=new,
                state=mp.MOVE_PLANNED,
            )
        )
    done, joined, joined_unrecorded, gone, left_unrecorded = moves
    # What the old primary did before it died (each a chain change it committed).
    for m in (done, joined, joined_unrecorded, left_unrecorded):
        s.update_chain(m.chain_id, [m.to_target], [])
    _sync_all(s)
    for m in (done, left_unrecorded):
        s.update_chain(m.chain_id, [], [m.from_target])
    s.update_chain(gone.chain_id, [], [gone.from_target])  # an operator took it out
    done.state = mp.MOVE_DONE
    joined.state = left_unrecorded.state = mp.MOVE_SYNCING
    run = mp.RebalanceRun(concurrency=2, rate_bytes_per_s=5000)
    run.status.CopyFrom(
        mp.RebalanceStatus(
            running=True,
            mode=mp.ADD_NODE,
            node_id=new,
            moves_total=len(moves),
            moves_done=1,
            moves=moves,
        )
    )
    before = s.copy()
    s.finish(before)
    primary = Primary(s)
    r = primary.rebalancer()

    r.resume(run)
    assert r.running and r.rate_bytes_per_s == 5000  # the rate is given to nodes again
    await eventually(lambda: not r.running, what="the resumed run to end")

    status = r.status()
    states = {m.chain_id: m.state for m in status.moves}
    assert states == {
        done.chain_id: mp.MOVE_DONE,
        joined.chain_id: mp.MOVE_DONE,
        joined_unrecorded.chain_id: mp.MOVE_DONE,
        gone.chain_id: mp.MOVE_FAILED,
        left_unrecorded.chain_id: mp.MOVE_DONE,
    }
    failed = next(m for m in status.moves if m.chain_id == gone.chain_id)
    assert "no longer in chain" in failed.error
    assert (status.moves_done, status.moves_failed) == (4, 1)
    assert r.rate_bytes_per_s is None
    end = primary.state
    for m in (done, joined, joined_unrecorded, left_unrecorded):
        members = _members(end, m.chain_id)
        assert len(members) == 3 and m.to_target in members and m.from_target not in members
    assert gone.to_target not in _members(end, gone.chain_id)
    in_chains = [t for c in end.info.chains for t in c.targets]
    assert len(in_chains) == len(set(in_chains))
    # The last record stored is the finished run, as the status shows it.
    last = primary.stored[-1]
    assert not last.status.running and last.status.moves == status.moves


async def test_a_finished_run_stays_readable_and_changes_nothing() -> None:
    s = _cluster(3, 2)
    primary = Primary(s)
    version = s.info.version
    run = mp.RebalanceRun(concurrency=1)
    run.status.CopyFrom(
        mp.RebalanceStatus(
            running=False,
            mode=mp.DRAIN_NODE,
            node_id=1,
            moves_total=1,
            moves_done=1,
            elapsed_s=12.5,
            moves=[mp.Move(chain_id=1, from_target=1, to_target=9, state=mp.MOVE_DONE)],
        )
    )
    r = primary.rebalancer()
    r.resume(run)
    status = r.status()
    assert not status.running and status.moves == run.status.moves
    assert status.elapsed_s == pytest.approx(12.5, abs=0.5)
    assert r.rate_bytes_per_s is None
    assert primary.state.info.version == version and primary.stored == []


async def test_a_run_is_stored_before_it_starts_and_when_it_ends() -> None:
    s = _cluster(3, 2)
    new = _join(s, 2)
    s.finish(s.copy())
    primary = Primary(s)
    r = primary.rebalancer()
    free = s.free_targets_by_node()[new]
    c = s.info.chains[0]
    frm = c.targets[0]
    move = mp.Move(
        chain_id=c.chain_id,
        from_target=frm,
        from_node=s.target(frm).node_id,  # type: ignore[union-attr]
        to_target=free[0],
        to_node=new,
        state=mp.MOVE_PLANNED,
    )
    req = mp.RebalanceReq(mode=mp.ADD_NODE, node_id=new, rate_bytes_per_s=0)
    await r.start(req, [move], concurrency=1)
    first = primary.stored[0]
    assert first.status.running and first.status.moves[0].state == mp.MOVE_PLANNED
    assert first.HasField("rate_bytes_per_s") and first.rate_bytes_per_s == 0
    await eventually(lambda: not r.running, what="the run to end")
    seen = [m.state for run in primary.stored for m in run.status.moves]
    assert mp.MOVE_SYNCING in seen
    last = primary.stored[-1]
    assert not last.status.running and last.status.moves[0].state == mp.MOVE_DONE
