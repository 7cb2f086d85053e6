"""Fixtures for the KV conformance suite: every test runs on every backend.

``memory`` and ``rocksdb`` (a fresh directory per test) need nothing; ``etcd``
runs against one real etcd member started once per session, each test under
its own key prefix; ``postgresql`` against one real PostgreSQL server started
once per session, each store in its own schema.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import chainfs.kv as kv
from chainfs.kv import KVStore, RetryPolicy
from chainfs.local.postgres import PostgresServer, find_bindir
from chainfs.testing.etcd import EtcdCluster
from tests.conftest import require, require_binary

BACKENDS = ["memory", "rocksdb", "etcd", "postgresql"]
PG_DATABASE = "kvtest"
# Fast retries keep conflict-heavy tests short; the bound is still enforced.
FAST_RETRY = RetryPolicy(max_attempts=50, backoff_initial_ms=0.5, backoff_max_ms=20.0)
_names = itertools.count()


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_binary("etcd")
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    require("postgresql", find_bindir() is not None, "deploy/bootstrap.sh installs it")
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        server.create_database(PG_DATABASE)
        yield server


UrlFactory = Callable[[], str]


@pytest.fixture(params=BACKENDS)
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> UrlFactory:
    """Makes URLs of fresh, empty stores of one backend."""
    backend = request.param
    if backend == "memory":
        return lambda: "memory://"
    if backend == "rocksdb":
        return lambda: f"rocksdb://{tmp_path}/db{next(_names)}"
    if backend == "postgresql":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        return lambda: pg.url(PG_DATABASE, schema=f"t{next(_names)}")
    cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
    return lambda: cluster.url(f"t{next(_names)}")


@pytest.fixture
def backend(new_url: UrlFactory) -> str:
    return new_url().split(":", 1)[0]


@pytest.fixture
async def store(new_url: UrlFactory) -> AsyncIterator[KVStore]:
    s = kv.open(new_url(), FAST_RETRY)
    try:
        yield s
    finally:
        await s.close()
