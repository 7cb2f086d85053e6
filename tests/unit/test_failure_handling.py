"""Unit tests of the storage node's failure handling pieces (no processes)."""

from __future__ import annotations

import asyncio
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
from chainfs.storage_service.resync import RateLimiter, Resyncer, SyncReceiver, predecessor


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
    finished: list[int] = []  # on_done calls: the node heartbeats at once after each
    rx = SyncReceiver(lambda: box["r"], lambda: finished.append(1))
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
    assert finished == []
    rx.handle_report(report, targets)
    assert rx.heartbeat(7, 0, 1).local_state == mp.UPTODATE
    assert finished == [1]
    rx.handle_report(report, targets)  # a repeated "done" is not news
    assert finished == [1]
    # Offline again: the finished sync no longer counts.
    box["r"] = _routing({7: mp.OFFLINE, 8: mp.SERVING}, [8, 7])
    assert rx.heartbeat(7, 0, 1).local_state == mp.ONLINE
    box["r"] = _routing({7: mp.SYNCING, 8: mp.SERVING}, [8, 7])
    assert rx.heartbeat(7, 0, 1).local_state == mp.ONLINE
    rx.handle_report(report, targets)  # the next sync's end is
    assert finished == [1, 1]


async def test_rate_change_releases_sends_waiting_under_the_old_rate() -> None:
    limiter = RateLimiter(1)  # 1 byte/s: a second send of 1 MB would wait ~12 days
    await limiter.consume(1 << 20)
    waiting = asyncio.create_task(limiter.consume(1 << 20))
    await asyncio.sleep(0)
    assert not waiting.done()
    limiter.set_rate(0)  # a rebalance lifts the limit
    await asyncio.wait_for(waiting, 30)
    await asyncio.wait_for(limiter.consume(1 << 20), 30)  # and later sends do not wait


async def test_resync_start_asks_for_a_heartbeat() -> None:
    """A node starting a sync heartbeats at once: the answer carries a rebalance's rate."""
    box: dict[str, Routing] = {"r": _routing({1: mp.SERVING, 2: mp.SERVING}, [1, 2])}
    started: list[int] = []
    targets: Any = {1: object()}
    cfg = FailureConfig(resync_retry_ms=60_000)
    resyncer = Resyncer(
        cfg, targets, lambda: box["r"], None, None, lambda: True,  # type: ignore[arg-type]
        on_start=lambda: started.append(1),
    )  # fmt: skip
    try:
        resyncer._schedule()
        assert started == [] and not resyncer.tasks
        box["r"] = _routing({1: mp.SERVING, 2: mp.SYNCING}, [1, 2])
        resyncer._schedule()  # fenced: no sync, no heartbeat
        assert started == [] and not resyncer.tasks
        resyncer.fenced = lambda: False
        resyncer._schedule()
        assert started == [1] and set(resyncer.tasks) == {(1, 2)}
        resyncer._schedule()  # already running: nothing new
        assert started == [1]
    finally:
        await resyncer.stop()


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
    with pytest.raises(ValueError):
        FailureConfig(resync_buffer_bytes=0).validate()
