"""Helpers of the fault suite: routing, replica comparison, a checksummed workload."""

from __future__ import annotations

import asyncio
import glob
import hashlib
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chainfs.common.auth.secret import SECRET_FILE_NAME, load_secret, node_credential
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def routing(address: str) -> Routing:
    async def go() -> Routing:
        async with MgmtClient([address]) as m:
            r = await m.get_routing()
            assert r is not None
            return r

    return run(go)  # type: ignore[no-any-return]


def poll(pred: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    """Poll ``pred`` until truthy; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def states(address: str) -> dict[int, int]:
    return {tid: t.public_state for tid, t in routing(address).targets.items()}


def all_serving(address: str) -> bool:
    r = routing(address)
    return all(
        r.targets[t].public_state == mp.SERVING for c in r.chains.values() for t in c.targets
    )


def operator_credential_of(node: mp.NodeInfo) -> cpb.Credential | None:
    """``node``'s credential, from the secret a LocalCluster keeps in its base
    directory (three levels above the node's unix socket, which lives in its
    first target directory): StorageControl serves nodes and admins only, and
    the fault suite reads replicas as an operator on the cluster's host can.
    None when there is no secret there (a cluster without authentication)."""
    if not node.unix_socket:
        return None
    secret_file = Path(node.unix_socket).parents[2] / SECRET_FILE_NAME
    if not secret_file.exists():
        return None
    return node_credential(load_secret(secret_file), node.node_id)


def node_credential_of(secret_file: Path, r: Routing, node_id: int | None = None) -> cpb.Credential:
    """The credential of storage node ``node_id`` (default: the first in
    routing), made from the cluster secret (``LocalCluster.secret_file``). The
    fault suite forges the requests a node sends (forwards, listings, direct
    chunk writes) as a node of the cluster would; without a credential storage
    answers BAD_CAPABILITY."""
    if node_id is None:
        node_id = next(iter(r.targets.values())).node_id
    return node_credential(load_secret(secret_file), node_id)


def node_credential_of_target(secret_file: Path, r: Routing, target_id: int) -> cpb.Credential:
    """The credential of the node that holds ``target_id``: a forwarded update
    claiming to come from that target is only taken from its node."""
    return node_credential_of(secret_file, r, r.targets[target_id].node_id)


def dump_target(node: mp.NodeInfo, target_id: int) -> dict[tuple[int, int], sp.ChunkMeta]:
    cred = operator_credential_of(node)

    async def go() -> dict[tuple[int, int], sp.ChunkMeta]:
        async with StorageControl(node.rpc_address, timeout_s=10, credential=cred) as control:
            return {(m.chunk.inode, m.chunk.index): m async for m in control.chunk_meta(target_id)}

    return run(go)  # type: ignore[no-any-return]


def replica_differences(address: str) -> list[str]:
    """Every difference between replicas of a chain (empty = byte-identical by CRC32C,
    length and version, and nothing pending)."""
    r = routing(address)
    problems = []
    for cid, chain in r.chains.items():
        dumps = {}
        for tid in chain.targets:
            dumps[tid] = dump_target(r.node_of_target(tid), tid)
        first = chain.targets[0]
        ref = {k: (m.committed_version, m.length, m.crc32c) for k, m in dumps[first].items()}
        for tid, d in dumps.items():
            for k, m in d.items():
                if m.pending_version:
                    problems.append(f"chain {cid} target {tid} chunk {k} pending")
            got = {k: (m.committed_version, m.length, m.crc32c) for k, m in d.items()}
            if got != ref:
                diff = sorted(set(got.items()) ^ set(ref.items()))[:5]
                problems.append(f"chain {cid}: target {tid} != target {first}: {diff}")
    return problems


def chunk_files(target_dir: str, inode: int, index: int) -> list[str]:
    return glob.glob(f"{target_dir}/data/{inode & 0xFF:02x}/{inode:016x}.{index:08x}.*")


class Workload:
    """Seeded writer + reader of checksummed files; records what was acknowledged.

    The writer writes whole files (random sizes, random bytes from the seed)
    and records the SHA-256 of each one whose close() succeeded. The reader
    re-reads acknowledged files and checks them; any mismatch is an error.
    Write failures are recorded (not acknowledged, so not checked later).
    """

    def __init__(self, fs: Any, seed: int, max_size: int = 300_000, prefix: str = "/w") -> None:
        self.fs = fs
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.prefix = prefix
        self.acked: dict[str, str] = {}
        self.ack_times: list[float] = []
        self.read_ok_times: list[float] = []
        self.write_errors: list[str] = []
        self.read_errors: list[str] = []
        self.corrupt: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._write_loop, daemon=True),
            threading.Thread(target=self._read_loop, daemon=True),
        ]
        fs.makedirs(prefix, exist_ok=True)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=120)
            assert not t.is_alive(), "workload thread did not stop"

    def _write_loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            size = self.rng.randrange(1, self.max_size)
            data = self.rng.randbytes(size)
            path = f"{self.prefix}/f{i:05d}"
            i += 1
            try:
                with self.fs.open(path, "wb") as f:
                    f.write(data)
            except OSError as e:
                self.write_errors.append(f"{path}: {e!r}")
                continue
            with self._lock:
                self.acked[path] = hashlib.sha256(data).hexdigest()
                self.ack_times.append(time.monotonic())

    def _read_loop(self) -> None:
        rng = random.Random(0)
        while not self._stop.is_set():
            with self._lock:
                paths = list(self.acked)
            if not paths:
                time.sleep(0.01)
                continue
            p = rng.choice(paths)
            try:
                with self.fs.open(p, "rb") as f:
                    got = f.read()
            except OSError as e:
                self.read_errors.append(f"{p}: {e!r}")
                continue
            if hashlib.sha256(got).hexdigest() != self.acked[p]:
                self.corrupt.append(p)
            self.read_ok_times.append(time.monotonic())

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def verify_all(self) -> list[str]:
        """Paths whose content does not read back as acknowledged."""
        bad = []
        for p, digest in sorted(self.acked.items()):
            with self.fs.open(p, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    bad.append(p)
        return bad
