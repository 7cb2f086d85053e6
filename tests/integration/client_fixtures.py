"""Shared helpers for the client tests: one LocalCluster per test module, test data."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.local import LocalCluster

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
