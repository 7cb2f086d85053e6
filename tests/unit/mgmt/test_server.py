"""mgmtd's serve(): what happens when one of its background loops dies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.mgmt_service.server import Mgmtd, serve

pytestmark = pytest.mark.timeout(60)


async def test_a_dead_background_loop_stops_mgmtd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its checker (or election) loop mgmtd would look alive and never
    time a node out; it must exit with the error instead."""

    async def broken(self: Mgmtd) -> None:
        raise RuntimeError("bug in the checker")

    monkeypatch.setattr(Mgmtd, "checker_loop", broken)
    cfg = MgmtdConfig(kv_url="memory://")
    cfg.validate()
    with pytest.raises(ChainfsError) as e:
        async with asyncio.timeout(30):  # a hang fails here
            await serve(cfg, asyncio.Event(), str(tmp_path / "ready.json"))
    assert e.value.code == Code.INTERNAL
    assert "checker" in e.value.message
    assert isinstance(e.value.__cause__, RuntimeError)
