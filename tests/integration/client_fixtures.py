"""Shared helpers for the client tests: one LocalCluster per test module, test data."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.auth.secret import SECRET_FILE_NAME, load_secret, node_credential
from chainfs.common.rpc.storage_client import StorageClient
from chainfs.local import LocalCluster
from chainfs.proto import storage_pb2 as sp

CHUNK = 4 * 1024 * 1024  # the default chunk size of new files (meta's default layout)


def module_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: object
) -> Iterator[LocalCluster]:
    """Body of a module-scoped fixture: start, yield, check nothing died, stop."""
    base = Path(tmp_path_factory.mktemp(name))
    with LocalCluster(base, **kwargs) as cluster:  # type: ignore[arg-type]
        yield cluster
        dead = cluster.dead_processes()
        assert not dead, f"processes died during the tests: {dead}"


def pattern(size: int, seed: str = "") -> bytes:
    """Deterministic pseudo-random bytes: a misplaced or swapped chunk cannot match."""
    return random.Random(seed).randbytes(size)


async def stored_chunks(afs: Any, chain_id: int, ino: int) -> list[sp.ChunkMeta]:
    """What storage holds of ``ino`` on one chain. Listings are for nodes: the test
    asks as one, with the secret its LocalCluster keeps in its base directory
    (two levels above every target directory)."""
    routing = afs.io.routing
    target = next(iter((await routing.get()).targets.values()))
    secret = load_secret(Path(target.path).parents[1] / SECRET_FILE_NAME)
    cred = node_credential(secret, target.node_id)
    async with StorageClient(routing, os.urandom(16), credential=cred) as storage:
        return await storage.list_chunks(chain_id, ino)


def poll(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Call ``cond`` every 50 ms until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def in_threads(work: Callable[[int], object], count: int) -> list[BaseException]:
    """Run ``work(k)`` for k in range(count), each in its own thread, all at once;
    what any of them raised (empty when all returned)."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
