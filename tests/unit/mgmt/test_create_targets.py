"""admin create-targets pieces without processes: mgmtd's AddTargets state change,
the CLI's chain choice, and the storage node's directory checks and record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chainfs.cli.admin.create_targets import check_node, plan_chains
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.proto import mgmt_pb2 as mp
from chainfs.storage_service import extra_targets
from chainfs.storage_service.config import StorageConfig
from tests.unit.mgmt.test_cluster_state import _cluster, _commit


def _chained(nodes: int = 3, replicas: int = 2) -> ClusterState:
    s = _cluster(nodes)
    return _commit(s, lambda x: x.create_chains(replicas, 0, init=True))


def _new(*paths: str) -> list[mp.TargetInfo]:
    return [mp.TargetInfo(path=p) for p in paths]


def test_add_targets_registers_free_waiting_targets_and_leaves_others_alone() -> None:
    s = _chained()
    before = {t.target_id: (t.public_state, t.local_state, t.chain_id) for t in s.info.targets}
    ids: list[int] = []
    after = _commit(s, lambda x: ids.extend(x.add_targets(1, _new("/new/a", "/new/b"))))
    assert ids == [max(before) + 1, max(before) + 2]
    for tid, st in before.items():
        t = after.target(tid)
        assert t is not None and (t.public_state, t.local_state, t.chain_id) == st
    for tid, path in zip(ids, ["/new/a", "/new/b"], strict=True):
        t = after.target(tid)
        assert t is not None
        assert (t.node_id, t.chain_id, t.path) == (1, 0, path)
        assert (t.public_state, t.local_state) == (mp.WAITING, mp.ONLINE)
    assert after.info.version == s.info.version + 1
    # Joining a chain: offline -> waiting -> syncing, one state-machine step at a time.
    node_of = {t.target_id: t.node_id for t in after.info.targets}
    chain = next(c for c in after.info.chains if 1 not in {node_of[t] for t in c.targets})
    joined = _commit(after, lambda x: x.update_chain(chain.chain_id, [ids[0]], []))
    t = joined.target(ids[0])
    assert t is not None and t.chain_id == chain.chain_id and t.public_state == mp.WAITING
    stepped = _commit(joined, lambda x: None)
    assert stepped.target(ids[0]).public_state == mp.SYNCING  # type: ignore[union-attr]
    assert stepped.chain(chain.chain_id).targets[-1] == ids[0]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("node_id", "targets", "code", "words"),
    [
        (9, _new("/x"), Code.UNKNOWN_NODE, "node 9"),
        (1, [], Code.EINVAL, "no targets"),
        (1, _new("/x", "/x"), Code.EINVAL, "own path"),
        (1, _new(""), Code.EINVAL, "own path"),
        (1, [mp.TargetInfo(path="/x", target_id=77)], Code.EINVAL, "ids from mgmtd"),
        (1, _new("/d0/0"), Code.EEXIST, "already has target 1 at /d0/0"),
    ],
)
def test_add_targets_errors_change_nothing(
    node_id: int, targets: list[mp.TargetInfo], code: int, words: str
) -> None:
    s = _chained()
    trial = s.copy()
    with pytest.raises(ChainfsError) as e:
        trial.add_targets(node_id, targets)
    assert e.value.code == code and words in e.value.message
    assert trial.encode() == s.encode()


def test_add_targets_refuses_offline_and_non_storage_nodes() -> None:
    s = _chained()
    off = _commit(s, lambda x: x.mark_offline([2]))
    with pytest.raises(ChainfsError) as e:
        off.copy().add_targets(2, _new("/x"))
    assert e.value.code == Code.EHOSTUNREACH and "storage node 2 is offline" in e.value.message
    meta = s.copy()
    nid, _ = meta.register(
        mp.NodeInfo(type=mp.META, rpc_address="127.0.0.1:9999"), [], reregister=False
    )
    with pytest.raises(ChainfsError) as e:
        meta.add_targets(nid, _new("/x"))
    assert "not a storage node" in e.value.message


def test_cli_checks_node_and_plans_chains() -> None:
    s = _chained()  # 3 nodes, 3 chains of 2: each node misses exactly one chain
    r = Routing(s.info)
    with pytest.raises(ChainfsError, match="node 7 is not registered"):
        check_node(r, 7)
    assert check_node(r, 1).node_id == 1
    node_of = {t.target_id: t.node_id for t in s.info.targets}
    missing = [c.chain_id for c in s.info.chains if 1 not in {node_of[t] for t in c.targets}]
    present = [c.chain_id for c in s.info.chains if c.chain_id not in missing]
    assert plan_chains(r, 1, 1, tuple(missing), False) == missing
    with pytest.raises(ChainfsError, match=f"chain {present[0]} already has target"):
        plan_chains(r, 1, 1, (present[0],), False)
    with pytest.raises(ChainfsError, match="chain 99 does not exist"):
        plan_chains(r, 1, 1, (99,), False)
    with pytest.raises(ChainfsError, match="--auto: 0 chains lack a replica"):
        plan_chains(r, 1, 1, (), True)  # every chain is complete
    # A chain that lost its node-1 replica is what --auto refills.
    victim = next(t for t in s.chain(present[0]).targets if node_of[t] == 1)  # type: ignore[union-attr]
    short = _commit(s, lambda x: x.update_chain(present[0], [], [victim]))
    assert plan_chains(Routing(short.info), 1, 1, (), True) == [present[0]]
    with pytest.raises(ChainfsError, match="2 new targets asked for"):
        plan_chains(Routing(short.info), 1, 2, (), True)
    off = _commit(s, lambda x: x.mark_offline([3]))
    with pytest.raises(ChainfsError, match=r"storage node 3 .* is offline"):
        check_node(Routing(off.info), 3)


def test_storage_parent_checks_names_and_record(tmp_path: Path) -> None:
    t0 = tmp_path / "node" / "target0"
    t0.mkdir(parents=True)
    (t0 / "target.json").write_text(json.dumps({"target_id": 4, "node_id": 2}))
    cfg = StorageConfig(targets=[str(t0)])
    assert extra_targets.default_parent(cfg) == str(tmp_path / "node")
    for bad, code in [
        ("rel", Code.EINVAL),
        (str(tmp_path / "nope"), Code.ENOENT),
        (str(t0 / "target.json"), Code.ENOTDIR),
        (str(t0), Code.EEXIST),
    ]:
        with pytest.raises(ChainfsError) as e:
            extra_targets.check_parent(bad, 2)
        assert e.value.code == code and "node 2" in e.value.message
    parent = extra_targets.check_parent(str(tmp_path / "node"), 2)
    (tmp_path / "node" / "target2").mkdir()
    picked = extra_targets.pick_dirs(parent, 3, [str(t0), str(tmp_path / "node" / "target1")])
    assert [p.name for p in picked] == ["target3", "target4", "target5"]
    assert extra_targets.load(cfg) == []
    extra_targets.save(cfg, [str(p) for p in picked[:2]])
    assert extra_targets.load(cfg) == [str(p) for p in picked[:2]]
    assert (t0 / "extra_targets.json").exists()
    (t0 / "extra_targets.json").write_text("{bad")
    with pytest.raises(ChainfsError) as e:
        extra_targets.load(cfg)
    assert e.value.code == Code.CONFIG_ERROR and "extra_targets.json" in e.value.message
