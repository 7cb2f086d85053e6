"""Chain planning and the cluster-state operations (registration, bad input, timeouts)."""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.common.errors import ChainfsError, Code
from chainfs.mgmt_service.chain_table import max_chains, plan_chains
from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.proto import mgmt_pb2 as mp


@functools.cache
def _brute_max(left: tuple[int, ...], replicas: int) -> int:
    """Most chains of distinct nodes, by exhaustive search over sorted counts."""
    best = 0
    for combo in itertools.combinations(range(len(left)), replicas):
        if all(left[i] for i in combo):
            nxt = list(left)
            for i in combo:
                nxt[i] -= 1
            best = max(best, 1 + _brute_max(tuple(sorted(nxt)), replicas))
    return best


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(0, 4), min_size=1, max_size=5),
    replicas=st.integers(1, 3),
)
def test_max_chains_is_optimal(counts: list[int], replicas: int) -> None:
    free = {n: list(range(n * 100, n * 100 + c)) for n, c in enumerate(counts, start=1)}
    expected = (
        _brute_max(tuple(sorted(counts)), replicas)
        if sum(1 for c in counts if c) >= replicas
        else 0
    )
    assert max_chains(free, replicas) == expected
    if expected:
        assert len(plan_chains(free, replicas)) == expected


def test_plan_rejects_more_chains_than_possible() -> None:
    free = {1: [1], 2: [2], 3: [3]}
    with pytest.raises(ChainfsError) as e:
        plan_chains(free, 3, num_chains=2)
    assert e.value.code == Code.NOT_ENOUGH_NODES
    assert plan_chains(free, 3, num_chains=1) == [[1, 2, 3]]


# -- ClusterState -----------------------------------------------------------


def _node(i: int, node_id: int = 0) -> mp.NodeInfo:
    return mp.NodeInfo(node_id=node_id, type=mp.STORAGE, rpc_address=f"127.0.0.1:{7000 + i}")


def _targets(i: int, n: int = 2) -> list[mp.TargetInfo]:
    return [mp.TargetInfo(path=f"/d{i}/{j}") for j in range(n)]


def _cluster(nodes: int, per_node: int = 2) -> ClusterState:
    s = ClusterState.decode(None, None, "test")
    before = s.copy()
    for i in range(nodes):
        s.register(_node(i), _targets(i, per_node), reregister=False)
    s.finish(before)
    return s


def _commit(s: ClusterState, op: object) -> ClusterState:
    """Apply ``op(copy)`` + finish, like mgmtd's transaction."""
    after = s.copy()
    op(after)  # type: ignore[operator]
    after.finish(s)
    return after


def test_register_assigns_ids_and_reregistration_keeps_them() -> None:
    s = _cluster(2)
    assert [n.node_id for n in s.info.nodes] == [1, 2]
    assert sorted(t.target_id for t in s.info.targets) == [1, 2, 3, 4]
    ids = {t.path: t.target_id for t in s.targets_of(1)}
    after = s.copy()
    nid, tids = after.register(_node(0, node_id=1), _targets(0), reregister=True)
    assert nid == 1 and tids == [ids["/d0/0"], ids["/d0/1"]]
    assert len(after.info.nodes) == 2 and len(after.info.targets) == 4


@pytest.mark.parametrize(
    ("node", "targets", "code"),
    [
        (_node(0, node_id=1), [], Code.ALREADY_REGISTERED),  # same id again
        (_node(0), [], Code.ALREADY_REGISTERED),  # same address again
        (_node(5), [mp.TargetInfo(target_id=1)], Code.ALREADY_REGISTERED),  # node 1's target
        (mp.NodeInfo(type=mp.MGMTD, rpc_address="x:1"), [], Code.EINVAL),
        (mp.NodeInfo(type=mp.STORAGE), [], Code.EINVAL),  # no address
        (mp.NodeInfo(type=mp.META, rpc_address="x:1"), _targets(9), Code.EINVAL),
        (_node(6), [mp.TargetInfo(path="/a"), mp.TargetInfo(path="/a")], Code.EINVAL),
    ],
)
def test_bad_registration_changes_nothing(
    node: mp.NodeInfo, targets: list[mp.TargetInfo], code: int
) -> None:
    s = _cluster(2)
    snapshot = s.encode()
    trial = s.copy()
    with pytest.raises(ChainfsError) as e:
        trial.register(node, targets, reregister=False)
    assert e.value.code == code
    assert trial.encode() == snapshot


def test_heartbeat_from_unknown_node() -> None:
    s = _cluster(1)
    with pytest.raises(ChainfsError) as e:
        s.check_heartbeat(mp.HeartbeatReq(node_id=42))
    assert e.value.code == Code.UNKNOWN_NODE


def test_too_many_replicas_changes_nothing() -> None:
    s = _cluster(2)
    snapshot = s.encode()
    trial = s.copy()
    with pytest.raises(ChainfsError) as e:
        trial.create_chains(3, 0, init=True)
    assert e.value.code == Code.NOT_ENOUGH_NODES
    assert trial.encode() == snapshot


def test_chains_created_once_with_init_and_versions_start_at_one() -> None:
    s = _commit(_cluster(3), lambda x: x.create_chains(3, 0, init=True))
    assert len(s.info.chains) == 2
    assert all(c.chain_version == 1 for c in s.info.chains)
    assert all(t.public_state == mp.SERVING for t in s.info.targets)
    assert s.info.replicas == 3
    with pytest.raises(ChainfsError) as e:
        s.copy().create_chains(3, 0, init=True)
    assert e.value.code == Code.EEXIST


def test_node_timeout_reorders_chains_and_bumps_versions() -> None:
    s = _commit(_cluster(3), lambda x: x.create_chains(3, 0, init=True))
    head_node = s.target(s.info.chains[0].targets[0]).node_id  # type: ignore[union-attr]
    after = _commit(s, lambda x: x.mark_offline([head_node]))
    assert after.info.version == s.info.version + 1
    for old, new in zip(s.info.chains, after.info.chains, strict=True):
        assert new.chain_version == old.chain_version + 1
        last = after.target(new.targets[-1])
        assert last is not None and last.node_id == head_node
        assert last.public_state == mp.OFFLINE and last.local_state == mp.LOCAL_OFFLINE
    # Nothing new: no version bump.
    again = after.copy()
    assert not again.finish(after)


def test_reregistered_node_must_resync() -> None:
    s = _commit(_cluster(3), lambda x: x.create_chains(3, 0, init=True))
    after = _commit(s, lambda x: x.register(_node(0, node_id=1), [], reregister=True))
    for t in after.targets_of(1):
        assert t.public_state == mp.OFFLINE and t.local_state == mp.LOCAL_OFFLINE
    # It reports online: waiting, then syncing on the next step, then serving once up to date.
    hb = mp.HeartbeatReq(
        node_id=1,
        targets=[
            mp.TargetHeartbeat(target_id=t.target_id, local_state=mp.ONLINE)
            for t in after.targets_of(1)
        ],
    )
    after = _commit(after, lambda x: x.apply_heartbeat(hb))
    assert {t.public_state for t in after.targets_of(1)} == {mp.WAITING}
    after = _commit(after, lambda x: None)
    assert {t.public_state for t in after.targets_of(1)} == {mp.SYNCING}
    for th in hb.targets:
        th.local_state = mp.UPTODATE
    after = _commit(after, lambda x: x.apply_heartbeat(hb))
    assert {t.public_state for t in after.targets_of(1)} == {mp.SERVING}


def test_offline_target_is_held_against_heartbeats_until_online_target() -> None:
    s = _commit(_cluster(3), lambda x: x.create_chains(3, 0, init=True))
    chain = s.info.chains[0]
    tid = chain.targets[0]
    node = s.target(tid).node_id  # type: ignore[union-attr]
    hb = mp.HeartbeatReq(
        node_id=node, targets=[mp.TargetHeartbeat(target_id=tid, local_state=mp.UPTODATE)]
    )
    held = _commit(s, lambda x: x.offline_target(tid))
    t = held.target(tid)
    assert t is not None and t.held_offline and t.public_state == mp.OFFLINE
    assert held.chain(chain.chain_id).targets[-1] == tid  # type: ignore[union-attr]
    # The node keeps saying the target is fine: it stays out, and the
    # heartbeat is not even a change worth a commit.
    assert not held.heartbeat_changes(hb)
    for _ in range(3):
        held = _commit(held, lambda x: x.apply_heartbeat(hb))
    t = held.target(tid)
    assert t is not None and t.public_state == mp.OFFLINE and t.local_state == mp.LOCAL_OFFLINE
    # ... so the operator can remove it (or release it).
    removable = _commit(held, lambda x: x.remove_target(tid))
    assert removable.target(tid) is None
    back = _commit(held, lambda x: x.online_target(tid))
    back = _commit(back, lambda x: x.apply_heartbeat(hb))
    back = _commit(back, lambda x: None)
    t = back.target(tid)
    assert t is not None and not t.held_offline
    assert t.public_state in (mp.WAITING, mp.SYNCING, mp.SERVING)
    # Releasing a target nobody held is an error that changes nothing.
    snapshot = back.encode()
    trial = back.copy()
    with pytest.raises(ChainfsError) as e:
        trial.online_target(tid)
    assert e.value.code == Code.EINVAL and f"target {tid}" in str(e.value)
    assert trial.encode() == snapshot
