"""Rebalance planning: drain empties a node, add-node and rebalance even out replicas,
and every planned move is one the cluster state accepts (distinct nodes per chain)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.common.errors import ChainfsError, Code
from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.mgmt_service.rebalance import plan
from chainfs.proto import mgmt_pb2 as mp

MAX_MOVES = 10_000


def _cluster(nodes: int, per_node: int, replicas: int = 3) -> ClusterState:
    s = ClusterState.decode(None, None, "test")
    before = s.copy()
    for i in range(nodes):
        node = mp.NodeInfo(type=mp.STORAGE, rpc_address=f"127.0.0.1:{7000 + i}")
        targets = [mp.TargetInfo(path=f"/d{i}/{j}") for j in range(per_node)]
        s.register(node, targets, reregister=False)
    s.create_chains(replicas, 0, init=True)
    s.finish(before)
    return s


def _join(s: ClusterState, per_node: int) -> int:
    """A new storage node with ``per_node`` free targets -> its id."""
    i = len(s.info.nodes)
    node = mp.NodeInfo(type=mp.STORAGE, rpc_address=f"127.0.0.1:{7000 + i}")
    nid, _ = s.register(node, [mp.TargetInfo(path=f"/d{i}/{j}") for j in range(per_node)], False)
    return nid


def _apply(s: ClusterState, moves: list[mp.Move]) -> None:
    """Each move as the executor makes it (join, resync until serving, then leave),
    validated by ClusterState."""
    for m in moves:
        s.update_chain(m.chain_id, [m.to_target], [])
        joined = s.target(m.to_target)
        assert joined is not None
        joined.public_state = mp.SERVING
        s.update_chain(m.chain_id, [], [m.from_target])


def _load(s: ClusterState) -> Counter[int]:
    node_of = {t.target_id: t.node_id for t in s.info.targets}
    return Counter(node_of[t] for c in s.info.chains for t in c.targets)


def test_add_node_moves_its_share_onto_it() -> None:
    s = _cluster(3, 4)  # 4 chains of 3: 4 replicas per node
    new = _join(s, 4)
    moves = plan(s, mp.ADD_NODE, new, MAX_MOVES)
    assert len(moves) == 3 and all(m.to_node == new for m in moves)
    _apply(s, moves)
    assert sorted(_load(s).values()) == [3, 3, 3, 3]


def test_drain_moves_every_replica_off_the_node() -> None:
    s = _cluster(4, 3)  # 4 chains of 3 over 4 nodes: 3 replicas per node, no spare
    free = _join(s, 3)
    moves = plan(s, mp.DRAIN_NODE, 1, MAX_MOVES)
    assert len(moves) == 3 and {m.from_node for m in moves} == {1}
    assert {m.to_node for m in moves} == {free}
    _apply(s, moves)
    assert 1 not in _load(s)


def test_drain_without_room_changes_nothing() -> None:
    s = _cluster(3, 2)  # every node is in every chain: nowhere to move to
    with pytest.raises(ChainfsError) as e:
        plan(s, mp.DRAIN_NODE, 1, MAX_MOVES)
    assert e.value.code == Code.NOT_ENOUGH_NODES and "chain" in e.value.message


def test_bad_requests() -> None:
    s = _cluster(3, 2)
    with pytest.raises(ChainfsError) as e:
        plan(s, mp.DRAIN_NODE, 99, MAX_MOVES)
    assert e.value.code == Code.UNKNOWN_NODE
    with pytest.raises(ChainfsError) as e:
        plan(s, mp.ADD_NODE, 1, MAX_MOVES)  # no free target on node 1
    assert e.value.code == Code.EINVAL
    with pytest.raises(ChainfsError) as e:
        plan(s, mp.BALANCE, 1, MAX_MOVES)
    assert e.value.code == Code.EINVAL
    assert plan(s, mp.BALANCE, 0, MAX_MOVES) == []  # already even
    _join(s, 6)
    with pytest.raises(ChainfsError) as e:
        plan(s, mp.BALANCE, 0, 0)  # over the bound on moves
    assert e.value.code == Code.EINVAL


@settings(max_examples=100, deadline=None)
@given(
    nodes=st.integers(3, 6),
    per_node=st.integers(1, 4),
    new_nodes=st.integers(1, 3),
    new_per_node=st.integers(1, 6),
)
def test_rebalance_evens_out_replicas(
    nodes: int, per_node: int, new_nodes: int, new_per_node: int
) -> None:
    s = _cluster(nodes, per_node)
    joined = [_join(s, new_per_node) for _ in range(new_nodes)]
    moves = plan(s, mp.BALANCE, 0, MAX_MOVES)
    _apply(s, moves)
    load = _load(s)
    counts = [load.get(n.node_id, 0) for n in s.info.nodes]
    # Even, except where a new node ran out of free targets.
    full = {n for n in joined if load.get(n, 0) == new_per_node}
    spread = [load.get(n.node_id, 0) for n in s.info.nodes if n.node_id not in full]
    assert max(spread) - min(spread) <= 1, counts
