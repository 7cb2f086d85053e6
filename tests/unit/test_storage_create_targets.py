"""The storage node's side of create-targets against a scripted mgmtd client: on
success the targets are served, recorded and registered; when mgmtd refuses, no
directory, record entry or served target is left behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import mgmt_pb2 as mp
from chainfs.storage_service import extra_targets
from chainfs.storage_service.config import StorageConfig
from chainfs.storage_service.node import StorageNode


class _Mgmt:
    """mgmtd's AddTargets: answers ids from 100 up, or raises ``error``."""

    def __init__(self, error: ChainfsError | None = None) -> None:
        self.error = error
        self.calls: list[list[mp.TargetInfo]] = []
        self.removed: list[int] = []

    async def add_targets(self, node_id: int, targets: list[mp.TargetInfo]) -> mp.AddTargetsRsp:
        self.calls.append(list(targets))
        if self.error is not None:
            raise self.error
        ids = [100 + i for i in range(len(targets))]
        routing = mp.RoutingInfo(version=7)
        for tid, t in zip(ids, targets, strict=True):
            routing.targets.add(target_id=tid, node_id=node_id, path=t.path)
        return mp.AddTargetsRsp(target_ids=ids, routing=routing)

    async def get_routing(self, known_version: int = 0) -> Any:
        from chainfs.common.routing import Routing

        return Routing(mp.RoutingInfo(version=1))

    async def update_target(self, target_id: int, action: int) -> None:
        self.removed.append(target_id)

    async def close(self) -> None:
        pass


class _Heartbeat:
    def __init__(self) -> None:
        self.added: list[mp.TargetInfo] = []

    def add_registered_targets(self, targets: list[mp.TargetInfo]) -> None:
        self.added.extend(targets)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[StorageNode]:
    t0 = tmp_path / "n" / "target0"
    cfg = StorageConfig(targets=[str(t0)], mgmtd_addresses=["127.0.0.1:1"], direct_writes=False)
    n = StorageNode(cfg)
    n.open_targets()
    n.node_id = 3
    n.heartbeat = _Heartbeat()  # type: ignore[assignment]
    n.craq = object()  # type: ignore[assignment]  # "started"
    yield n
    n.executor.shutdown(wait=True)
    for eng in n.engines:
        eng.close()


async def test_created_targets_are_served_recorded_and_registered(
    node: StorageNode, tmp_path: Path
) -> None:
    mgmt = _Mgmt()
    node.mgmt = mgmt  # type: ignore[assignment]
    rsp = await node.create_targets(2, "")
    want = [str(tmp_path / "n" / "target1"), str(tmp_path / "n" / "target2")]
    assert [(t.target_id, t.path) for t in rsp.targets] == [(100, want[0]), (101, want[1])]
    assert [t.path for t in mgmt.calls[0]] == want
    assert sorted(node.targets) == [100, 101]
    assert extra_targets.load(node.config) == want
    assert [t.target_id for t in node.heartbeat.added] == [100, 101]  # type: ignore[union-attr]
    assert node.targets[100].engine.load_ids() == {"target_id": 100, "node_id": 3}
    assert node.routing.current is not None and node.routing.current.version == 7
    # A restarted node opens them again, after the configured target.
    for eng in node.engines:
        eng.close()
    again = StorageNode(node.config)
    try:
        assert [i.path for i in again.open_targets()] == [node.config.targets[0], *want]
    finally:
        again.executor.shutdown(wait=True)
        for eng in again.engines:
            eng.close()


@pytest.mark.parametrize(
    "error",
    [
        ChainfsError(Code.EHOSTUNREACH, "storage node 3 is offline"),
        ChainfsError(Code.UNAVAILABLE, "mgmtd unreachable"),
    ],
)
async def test_refused_registration_leaves_nothing_behind(
    node: StorageNode, tmp_path: Path, error: ChainfsError
) -> None:
    extra_targets.save(node.config, ["/elsewhere/target9"])
    mgmt = _Mgmt(error)
    node.mgmt = mgmt  # type: ignore[assignment]
    before = sorted(p.name for p in (tmp_path / "n").iterdir())
    with pytest.raises(ChainfsError) as e:
        await node.create_targets(2, "")
    assert e.value.code == error.code
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == before
    assert extra_targets.load(node.config) == ["/elsewhere/target9"]
    assert list(node.targets) == [] and len(node.engines) == 1
    assert node.heartbeat.added == []  # type: ignore[union-attr]


async def test_bad_requests_create_nothing(node: StorageNode, tmp_path: Path) -> None:
    node.mgmt = _Mgmt()  # type: ignore[assignment]
    for count, parent, code in [
        (0, "", Code.EINVAL),
        (65, "", Code.EINVAL),
        (1, str(tmp_path / "missing"), Code.ENOENT),
        (1, node.config.targets[0], Code.EEXIST),
    ]:
        if parent == node.config.targets[0]:
            node.engines[0].save_ids({"target_id": 1, "node_id": 3})
        with pytest.raises(ChainfsError) as e:
            await node.create_targets(count, parent)
        assert e.value.code == code
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["target0"]
    assert node.mgmt.calls == []  # type: ignore[attr-defined]
