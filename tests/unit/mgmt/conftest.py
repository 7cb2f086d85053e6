"""An in-process mgmtd on a memory:// store, for client and server unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from chainfs.kv import KVStore
from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.mgmt_service.server import serve


@dataclass
class InProcMgmtd:
    address: str
    node_id: int
    cfg: MgmtdConfig
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def run_mgmtd(
    workdir: Path, store: KVStore | None = None, name: str = "mgmtd", **overrides: object
) -> AsyncIterator[InProcMgmtd]:
    fields: dict[str, object] = {
        "kv_url": "memory://",
        "heartbeat_interval_ms": 100,
        "heartbeat_timeout_ms": 1000,
        "check_interval_ms": 50,
        "lease_ms": 1000,
        "lease_renew_interval_ms": 100,
        "lease_safety_margin_ms": 200,
    }
    fields.update(overrides)
    cfg = MgmtdConfig(**fields)  # type: ignore[arg-type]
    cfg.validate()
    ready = workdir / f"{name}.ready.json"
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(serve(cfg, stop, str(ready), store))
    try:
        async with asyncio.timeout(10):
            while not ready.exists():
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        info = json.loads(ready.read_text())
        yield InProcMgmtd(info["rpc_address"], info["node_id"], cfg, stop)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


@pytest.fixture
async def mgmtd(tmp_path: Path) -> AsyncIterator[InProcMgmtd]:
    async with run_mgmtd(tmp_path) as m:
        yield m


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0, what: str = ""
) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout_s`` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {what or predicate}")
        await asyncio.sleep(0.02)
