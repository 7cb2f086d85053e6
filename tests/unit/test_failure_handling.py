"""Unit tests of the storage node's failure handling pieces (no processes)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.failure_config import FailureConfig
from chainfs.storage_service.fencing import Fence
from chainfs.storage_service.resync import SyncReceiver, predecessor


def _routing(states: dict[int, int], order: list[int]) -> Routing:
    info = mp.RoutingInfo(version=3)
    info.nodes.add(node_id=1, type=mp.STORAGE)
    for tid, st in states.items():
        info.targets.add(target_id=tid, node_id=1, chain_id=1, public_state=st)  # type: ignore[arg-type]
    info.chains.add(chain_id=1, chain_version=2, targets=order)
    return Routing(info)


def test_predecessor_is_last_serving_target_before() -> None:
    r = _routing({1: mp.SERVING, 2: mp.SERVING, 3: mp.SYNCING, 4: mp.OFFLINE}, [1, 2, 3, 4])
    chain = r.chains[1]
    assert predecessor(r, chain, 3) == 2
    assert predecessor(r, chain, 1) is None
    r = _routing({1: mp.SERVING, 2: mp.OFFLINE, 3: mp.SYNCING}, [1, 2, 3])
    assert predecessor(r, r.chains[1], 3) == 1


def test_sync_receiver_local_states_follow_3fs_rules() -> None:
    box: dict[str, Routing] = {"r": _routing({7: mp.SERVING}, [7])}
    rx = SyncReceiver(lambda: box["r"])
    assert rx.heartbeat(7, 0, 1).local_state == mp.UPTODATE
    box["r"] = _routing({7: mp.WAITING, 8: mp.SERVING}, [8, 7])
    assert rx.heartbeat(7, 0, 1).local_state == mp.ONLINE
    targets: Any = {7: object()}
    report = sp.SyncReportReq(target_id=7, from_target=8, done=True)
    with pytest.raises(ChainfsError) as e:  # not syncing here: rejected
        rx.handle_report(report, targets)
    assert e.value.code == Code.STALE_CHAIN_VERSION
    box["r"] = _routing({7: mp.SYNCING, 8: mp.SERVING}, [8, 7])
    progress = sp.SyncReportReq(target_id=7, from_target=8, bytes_left=100, rate_bytes_per_s=5)
    rx.handle_report(progress, targets)
    hb = rx.heartbeat(7, 0, 1)
    assert hb.local_state == mp.ONLINE and hb.sync_bytes_left == 100
    assert hb.sync_rate_bytes_per_s == 5
    rx.handle_report(report, targets)
    assert rx.heartbeat(7, 0, 1).local_state == mp.UPTODATE
    # Offline again: the finished sync no longer counts.
    box["r"] = _routing({7: mp.OFFLINE, 8: mp.SERVING}, [8, 7])
    assert rx.heartbeat(7, 0, 1).local_state == mp.ONLINE
    box["r"] = _routing({7: mp.SYNCING, 8: mp.SERVING}, [8, 7])
    assert rx.heartbeat(7, 0, 1).local_state == mp.ONLINE


@dataclass
class _FakeHeartbeat:
    heartbeat_timeout_s: float
    last_ack_monotonic: float

    def since_last_ack_s(self) -> float:
        return time.monotonic() - self.last_ack_monotonic


def test_fence_after_half_the_heartbeat_timeout() -> None:
    hb = _FakeHeartbeat(10.0, time.monotonic())
    fence = Fence(lambda: hb, 0.5)  # type: ignore[arg-type,return-value]
    assert not fence.fenced()
    fence.check()
    hb.last_ack_monotonic = time.monotonic() - 6.0
    assert fence.fenced()
    with pytest.raises(ChainfsError) as e:
        fence.check()
    assert e.value.code == Code.FENCED
    hb.last_ack_monotonic = time.monotonic()
    assert not fence.fenced() and fence.times_fenced == 1
    assert not Fence(lambda: None, 0.5).fenced()  # not registered yet


def test_failure_config_validation() -> None:
    FailureConfig().validate()
    with pytest.raises(ValueError):
        FailureConfig(fence_after_timeout_ratio=1.0).validate()
    with pytest.raises(ValueError):
        FailureConfig(resync_parallel_chunks=0).validate()
