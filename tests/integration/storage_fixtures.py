"""A small storage cluster of real processes: one mgmtd + N storage nodes, chains of R.

Used by the storage integration tests and the storage benchmark. Only pids
started here are ever signalled; ``stop()`` runs even when start-up fails.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from chainfs.common import config as cfg
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import StorageClient, StorageClientConfig
from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.proto import mgmt_pb2 as mp
from chainfs.storage_service.config import StorageConfig
from chainfs.testing.proc import ServiceProcess

START_TIMEOUT_S = 60.0


class StorageCluster:
    def __init__(
        self,
        base_dir: Path,
        nodes: int = 3,
        targets_per_node: int = 1,
        replicas: int = 3,
        storage_overrides: dict[int, dict[str, Any]] | None = None,
        common_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.n_nodes = nodes
        self.targets_per_node = targets_per_node
        self.replicas = replicas
        self.storage_overrides = storage_overrides or {}
        self.common_overrides = common_overrides or {}
        self.mgmtd: ServiceProcess | None = None
        self.storage: list[ServiceProcess] = []
        self.chains: list[int] = []

    @property
    def address(self) -> str:
        assert self.mgmtd is not None
        return str(self.mgmtd.info["rpc_address"])

    def __enter__(self) -> StorageCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        mdir = self.base_dir / "mgmtd"
        mdir.mkdir(parents=True, exist_ok=True)
        mconf = MgmtdConfig(
            kv_url="memory://", heartbeat_interval_ms=200, heartbeat_timeout_ms=10_000
        )
        (mdir / "mgmtd.toml").write_text(cfg.to_toml(mconf))
        self.mgmtd = ServiceProcess("mgmtd", mdir / "mgmtd.toml", mdir, "mgmtd")
        self.mgmtd.start(START_TIMEOUT_S)
        for i in range(self.n_nodes):
            ndir = self.base_dir / f"storage{i}"
            ndir.mkdir(parents=True, exist_ok=True)
            data: dict[str, Any] = {
                "mgmtd_addresses": [self.address],
                "targets": [str(ndir / f"t{k}") for k in range(self.targets_per_node)],
                "heartbeat_interval_ms": 200,
                **self.common_overrides,
                **self.storage_overrides.get(i, {}),
            }
            conf = cfg.from_dict(StorageConfig, data)
            (ndir / "storage.toml").write_text(cfg.to_toml(conf))
            proc = ServiceProcess("storage", ndir / "storage.toml", ndir, f"storage{i}")
            proc.start(START_TIMEOUT_S, wait=False)
            self.storage.append(proc)
        for proc in self.storage:
            proc.wait_ready(START_TIMEOUT_S)
        self.chains = run(self._create_chains())

    async def _create_chains(self) -> list[int]:
        async with MgmtClient(self.address) as mgmt:
            rsp = await mgmt.create_chains(self.replicas)
            ids = [c.chain_id for c in rsp.chains]
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                routing = await mgmt.get_routing()
                assert routing is not None
                if ids and all(
                    len(routing.chain_targets(c, (mp.SERVING,))) == self.replicas for c in ids
                ):
                    return ids
                await asyncio.sleep(0.05)
        raise ChainfsError(Code.ETIMEDOUT, "chains did not become serving")

    def target_dirs(self) -> dict[int, Path]:
        """target id -> its directory, from the storage nodes' ready files."""
        out: dict[int, Path] = {}
        for proc in self.storage:
            for tid, path in proc.info["targets"].items():
                out[int(tid)] = Path(path)
        return out

    def stop(self) -> None:
        for proc in self.storage:
            proc.stop()
        if self.mgmtd is not None:
            self.mgmtd.stop()

    def check_alive(self) -> None:
        dead = [p.name for p in [*self.storage, self.mgmtd] if p is not None and not p.alive()]
        if dead:
            raise AssertionError(f"processes died: {dead}")

    async def client(self, **config: Any) -> tuple[StorageClient, MgmtClient]:
        mgmt = MgmtClient(self.address)
        routing = RoutingCache(mgmt)
        await routing.refresh()
        client = StorageClient(routing, os.urandom(16), StorageClientConfig(**config))
        return client, mgmt


def run(coro: Any) -> Any:
    return asyncio.run(coro)
