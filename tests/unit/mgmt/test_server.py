"""mgmtd's serve(): its background loops outlive a failing round."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.mgmt_service.server import serve
from chainfs.mgmt_service.service import Mgmtd

pytestmark = pytest.mark.timeout(60)


async def test_a_failing_checker_round_does_not_end_the_checker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its checker mgmtd would look alive and never time a node out:
    a round that fails (a bug, a store error) is logged and the next one runs."""
    rounds = 0
    original = Mgmtd.check_heartbeats

    async def flaky(self: Mgmtd) -> None:
        nonlocal rounds
        rounds += 1
        if rounds <= 2:
            raise RuntimeError("bug in the checker")
        await original(self)

    monkeypatch.setattr(Mgmtd, "check_heartbeats", flaky)
    cfg = MgmtdConfig(kv_url="memory://", check_interval_ms=20)
    cfg.validate()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(cfg, stop, str(tmp_path / "ready.json")))
    try:
        async with asyncio.timeout(30):  # a checker that died fails here
            while rounds < 4:
                await asyncio.sleep(0.02)
                assert not server.done(), "mgmtd stopped"
    finally:
        stop.set()
        await server  # a clean stop: no error
