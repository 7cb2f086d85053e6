"""LocalCluster(kv="postgresql"): mgmtd and meta keep their state in one local
PostgreSQL server; files and namespace operations work, survive a kill -9 of
the server, and the state really lives in PostgreSQL."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import asyncpg
import pytest

from chainfs.local import LocalCluster
from chainfs.local.postgres import SUPERUSER, PostgresServer, find_bindir
from tests.conftest import require
from tests.integration.test_local_cluster import _wait_gone

pytestmark = pytest.mark.timeout(240)


async def _rows_per_schema(pg: PostgresServer) -> dict[str, int]:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user=SUPERUSER, database="chainfs")
    try:
        return {
            schema: int(await conn.fetchval(f"SELECT count(*) FROM {schema}.kv"))
            for schema in ("mgmtd", "meta")
        }
    finally:
        await conn.close()


def test_postgres_backed_cluster(tmp_path: Path) -> None:
    require("postgresql", find_bindir() is not None, "deploy/bootstrap.sh installs it")
    base = tmp_path / "pg-cluster"
    data = bytes(range(256)) * 20_000  # 5 MB: two chunks
    with LocalCluster(base, storage_nodes=2, targets_per_node=1, replicas=2, kv="postgresql") as c:
        fs = c.client()
        fs.makedirs("/on-pg/sub")
        fs.write_file("/on-pg/sub/f", data)
        assert fs.read_file("/on-pg/sub/f") == data
        fs.rename("/on-pg/sub/f", "/on-pg/g")
        fs.symlink("g", "/on-pg/link")
        assert fs.readlink("/on-pg/link") == "g"
        assert sorted(fs.listdir("/on-pg")) == ["g", "link", "sub"]
        assert fs.stat("/on-pg/g").st_size == len(data)
        fs.rmdir("/on-pg/sub")
        with pytest.raises(OSError) as e:
            fs.stat("/on-pg/sub")
        assert e.value.errno == errno.ENOENT

        rows = asyncio.run(_rows_per_schema(c.postgres))
        assert rows["mgmtd"] > 0 and rows["meta"] > 0  # both services' state is there

        # A crash of the metadata store: meta reconnects, nothing acknowledged is lost.
        c.postgres.kill()
        c.postgres.restart()
        assert fs.read_file("/on-pg/g") == data
        fs.write_file("/on-pg/after", b"written after the crash")
        fs.remove("/on-pg/link")
        assert sorted(fs.listdir("/on-pg")) == ["after", "g"]
        assert c.dead_processes() == []
    assert not _wait_gone(base)  # postgres too: its command line names the data dir
