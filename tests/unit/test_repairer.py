"""Repairer's schedule against a real chunk engine, with the copier (its neighbour)
replaced: repeated requests are one repair, failures back off and stop at
repair_attempts_max, a chunk with no good copy is counted lost, and a chain
change or a rewrite resumes it; once repaired the peers are asked to copy too."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_copy import PullResult
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.failure_config import FailureConfig
from chainfs.storage_service.scrubber import Repairer

TID = 7
KEY = (5, 0)


class FakeCopier:
    """Every pull fails as when every peer's copy is damaged, until ``good`` is set."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1)
        self.pulls = 0
        self.good = False
        self.version = 1
        self.asked: list[tuple[int, tuple[int, int]]] = []

    async def pull(self, target_id: int, key: tuple[int, int], **_: Any) -> PullResult:
        self.pulls += 1
        if not self.good:
            raise ChainfsError(Code.CHECKSUM_MISMATCH, "replica 8 sent damaged bytes")
        return PullResult(True, 8, 4)

    def chain_version(self, target_id: int) -> int:
        return self.version

    async def ask_peers_to_repair(self, target_id: int, key: tuple[int, int]) -> None:
        self.asked.append((target_id, key))


def _write(eng: ChunkEngine, data: bytes, version: int) -> None:
    eng.prepare_write(KEY[0], 0, 0, memoryview(data), crc.value(data), 1 << 20, version)
    assert eng.commit(KEY[0], 0, version, 1) is not None


async def _rounds(rep: Repairer, until: Callable[[], bool], at_least_s: float = 0.0) -> None:
    """Run the repairer's rounds until ``until()`` holds (and ``at_least_s`` passed)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not (until() and loop.time() - start >= at_least_s):
        assert loop.time() - start < 60, "the repairer never got there"
        await rep.round()
        await asyncio.sleep(0.005)


def _parked(rep: Repairer) -> bool:
    return rep.entries[(TID, *KEY)].due == math.inf


def test_backoff_bound_lost_and_resume(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = FailureConfig(repair_retry_min_ms=10, repair_retry_max_ms=40, repair_attempts_max=4)
        eng = ChunkEngine(tmp_path / "t")
        _write(eng, b"data", 1)
        copier = FakeCopier()
        rep = Repairer(cfg, {TID: LocalTarget(TID, eng)}, copier)  # type: ignore[arg-type]
        try:
            assert rep.request(TID, *KEY) is True
            assert rep.request(TID, *KEY) is False  # already queued: one repair
            # 10 + 20 + 40 ms of backoff between 4 attempts, then parked: no more pulls.
            await _rounds(rep, lambda: _parked(rep))
            await _rounds(rep, lambda: True, at_least_s=0.2)
            assert copier.pulls == cfg.repair_attempts_max
            assert rep.is_lost(TID, *KEY) and rep.lost_chunks(TID) == 1
            assert rep.request(TID, *KEY) is False  # reads of the lost chunk start nothing

            copier.version = 2  # the chain changed: try again, a bounded number of times
            await _rounds(rep, lambda: copier.pulls > cfg.repair_attempts_max and _parked(rep))
            await _rounds(rep, lambda: True, at_least_s=0.2)
            assert copier.pulls == 2 * cfg.repair_attempts_max
            assert rep.lost_chunks(TID) == 1

            copier.good = True
            _write(eng, b"new data", 2)  # the chunk was rewritten: resume
            await _rounds(rep, lambda: not rep.entries)
            assert rep.lost_chunks(TID) == 0
            await asyncio.sleep(0)
            assert copier.asked == [(TID, KEY)]
        finally:
            await rep.stop()
            copier.executor.shutdown()
            eng.close()

    asyncio.run(go())


def test_queue_bound(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = FailureConfig(repair_queue_entries=2)
        eng = ChunkEngine(tmp_path / "t")
        rep = Repairer(cfg, {TID: LocalTarget(TID, eng)}, FakeCopier())  # type: ignore[arg-type]
        try:
            assert [rep.request(TID, i, 0) for i in range(4)] == [True, True, False, False]
            assert len(rep.entries) == 2 and rep.dropped == 2
        finally:
            eng.close()

    asyncio.run(go())
