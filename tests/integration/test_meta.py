"""Meta servers as real processes: two servers over one etcd under conflicting
concurrent operations, and file length / truncate / GC against real storage.

One module-scoped cluster (a real mgmtd and three storage nodes, chains of 3)
serves both tests; meta servers are started per test.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.common import config as config_mod
from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_client import RENAME_NOREPLACE, MetaClient, UserInfo
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.meta_service.config import MetaConfig
from chainfs.proto import meta_pb2 as pb
from chainfs.proto import mgmt_pb2
from chainfs.testing.proc import ServiceProcess
from tests.conftest import require_binary
from tests.integration.storage_fixtures import StorageCluster

pytestmark = pytest.mark.timeout(180)

ROOT = UserInfo(0, 0, ())
KiB = 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageCluster]:
    with StorageCluster(
        tmp_path_factory.mktemp("meta-cluster"), nodes=3, targets_per_node=2, replicas=3
    ) as c:
        yield c


def start_meta(
    cluster: StorageCluster, workdir: Path, name: str, kv_url: str, wait: bool = True
) -> ServiceProcess:
    cfg = MetaConfig(kv_url=kv_url, mgmtd_addresses=[cluster.address])
    cfg.gc_interval_ms = 50
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.toml"
    path.write_text(config_mod.to_toml(cfg))
    proc = ServiceProcess("meta", path, workdir, name)
    proc.start(wait=wait)
    return proc


@pytest.fixture
async def stopper() -> AsyncIterator[list[Any]]:
    """Things to stop at the end of a test, even when it fails."""
    things: list[Any] = []
    yield things
    for t in reversed(things):
        if hasattr(t, "aclose"):
            await t.aclose()
        else:
            t.stop()


async def code_of(aw: Any) -> str:
    try:
        await aw
        return "ok"
    except ChainfsError as e:
        return errno.errorcode.get(e.errno or 0, str(e.code))


async def walk(m: MetaClient) -> tuple[dict[int, list[str]], dict[str, pb.Inode]]:
    """Every entry under /: inode -> its paths, and directory path -> inode."""
    where: dict[int, list[str]] = {}
    dirs: dict[str, pb.Inode] = {"/": await m.stat("/")}

    async def go(path: str, ino: int) -> None:
        async for e in m.iterdir(ino, with_attrs=True):
            child = f"{path.rstrip('/')}/{e.name.decode()}"
            where.setdefault(e.ino, []).append(child)
            if e.type == pb.DIRECTORY:
                dirs[child] = e.inode
                await go(child, e.ino)

    await go("/", dirs["/"].ino)
    return where, dirs


@pytest.mark.etcd
async def test_two_meta_servers_over_one_etcd_lose_and_duplicate_nothing(
    cluster: StorageCluster, tmp_path: Path, stopper: list[Any]
) -> None:
    require_binary("etcd")
    from chainfs.testing.etcd import EtcdCluster

    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    stopper.append(etcd)
    url = etcd.url("meta")
    # Both start at once: the store is formatted exactly once.
    metas = [
        start_meta(cluster, tmp_path / f"meta{i}", f"meta{i}", url, wait=False) for i in (0, 1)
    ]
    stopper.extend(metas)
    for p in metas:
        p.wait_ready()
    assert all(p.info["node_id"] for p in metas)  # registered with mgmtd
    async with MgmtClient(cluster.address) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None
        listed = {(n.rpc_address, n.data_address) for n in routing.nodes_of_type(mgmt_pb2.META)}
        for p in metas:
            assert (p.info["rpc_address"], p.info["data_address"]) in listed
    clients = [MetaClient(p.info["rpc_address"], user=ROOT, timeout_s=60) for p in metas]
    stopper.extend(clients)
    roots = [await c.stat("/") for c in clients]
    assert roots[0] == roots[1]

    dirs = [f"/d{i}" for i in range(4)]
    for d in dirs:
        await clients[random.randrange(2)].mkdir(d)

    # Both servers race to create every name exclusively: exactly one wins each.
    names = [f"f{i}" for i in range(40)]
    home = {n: dirs[i % len(dirs)] for i, n in enumerate(names)}
    outcomes = await asyncio.gather(
        *(
            code_of(c.create(f"{home[n]}/{n}", exclusive=True, write=False))
            for n in names
            for c in clients
        )
    )
    per_name = Counter(zip([n for n in names for _ in clients], outcomes, strict=True))
    for n in names:
        assert (per_name[(n, "ok")], per_name[(n, "EEXIST")]) == (1, 1), n
    inos = {n: (await clients[0].stat(f"{home[n]}/{n}")).ino for n in names}

    # Conflicting renames from both servers: files hop between directories
    # (NOREPLACE, so a file is never overwritten) and directory pairs race to
    # move into each other (only one may win, or the tree would lose a cycle).
    rng = random.Random(7)

    async def hopper(c: MetaClient, seed: int) -> Counter[str]:
        r = random.Random(seed)
        seen: Counter[str] = Counter()
        for _ in range(30):
            n = r.choice(names)
            src, dst = r.choice(dirs), r.choice(dirs)
            seen[await code_of(c.rename(f"{src}/{n}", f"{dst}/{n}", RENAME_NOREPLACE))] += 1
        return seen

    async def cycles(round_: int) -> list[str]:
        a, b = f"/c{round_}a", f"/c{round_}b"
        await clients[0].mkdir(a)
        await clients[1].mkdir(b)
        return list(
            await asyncio.gather(
                code_of(clients[0].rename(a, f"{b}/x")), code_of(clients[1].rename(b, f"{a}/y"))
            )
        )

    async def rmdir_vs_create(round_: int) -> list[str]:
        # The phantom: an rmdir that saw the directory empty must not commit
        # beside a create inside it.
        d = f"/r{round_}"
        await clients[0].mkdir(d)
        return list(
            await asyncio.gather(
                code_of(clients[0].rmdir(d)),
                code_of(clients[1].create(f"{d}/x", write=False)),
            )
        )

    results = await asyncio.gather(
        *(hopper(clients[i % 2], rng.randrange(1 << 30)) for i in range(8)),
        *(cycles(k) for k in range(6)),
    )
    for k in range(8):
        rmdir_code, create_code = await rmdir_vs_create(k)
        assert (rmdir_code, create_code) in (("ok", "ENOENT"), ("ENOTEMPTY", "ok")), k
        assert create_code != "ok" or await clients[0].listdir(f"/r{k}") == ["x"]
    hops = sum((r for r in results if isinstance(r, Counter)), Counter())
    # EEXIST: src == dst with RENAME_NOREPLACE (Linux answers the same).
    assert hops["ok"] > 0 and set(hops) <= {"ok", "ENOENT", "EEXIST"}, hops
    for r in results:
        if isinstance(r, list):
            assert sorted(r) in (["ENOENT", "ok"], ["EINVAL", "ok"]), r

    # The tree, as either server sees it: every file exactly once, every
    # directory reachable, nlink and '..' consistent.
    where, dirmap = await walk(clients[1])
    assert (where, dirmap) == await walk(clients[0])
    for n, ino in inos.items():
        assert len(where.get(ino, [])) == 1, (n, where.get(ino))
    dir_inos = {d.ino for d in dirmap.values()}
    files = {ino for ino, paths in where.items() if ino not in dir_inos and paths[0][:2] != "/r"}
    assert files == set(inos.values())
    for path, d in dirmap.items():
        subdirs = sum(1 for p in dirmap if p != "/" and p.rsplit("/", 1)[0] == path.rstrip("/"))
        assert d.nlink == 2 + subdirs, path
        if path != "/":
            parent = path.rsplit("/", 1)[0] or "/"
            assert (await clients[0].stat(f"{path}/..")).ino == dirmap[parent].ino
    assert len([p for p in dirmap if p.startswith("/c")]) == 12  # 6 pairs, none lost
    for k in range(8):  # each race left either an empty tree or /rK/x, never /rK/x orphaned
        assert (f"/r{k}" in dirmap) == any(p == f"/r{k}/x" for ps in where.values() for p in ps)
    for p in metas:
        assert p.alive(), p.tail_log()


async def test_length_truncate_and_gc_on_real_storage(
    cluster: StorageCluster, tmp_path: Path, stopper: list[Any]
) -> None:
    meta = start_meta(cluster, tmp_path / "meta", "meta", f"rocksdb://{tmp_path / 'meta-kv'}")
    stopper.append(meta)
    m = MetaClient(meta.info["rpc_address"], user=ROOT)
    stopper.append(m)
    storage, mgmt = await cluster.client()
    stopper.append(_Closer(storage, mgmt))

    cs = 64 * KiB
    # The admin CLI finds meta through mgmtd's routing info (stopped meta servers
    # of the previous test may still be listed: it fails over past them).
    shown = admin_json(cluster.address, "set-layout", "/", "--chunk-size", "64K", "--stripe", "2")
    assert (shown["chunk_size"], shown["stripe"]) == (cs, 2)
    shown = admin_json(cluster.address, "get-layout", "/")
    assert (shown["type"], shown["chunk_size"], shown["stripe"]) == ("directory", cs, 2)
    r = await m.create("/f", exclusive=True)
    ino, chains = r.inode.ino, list(r.inode.layout.chains)
    assert len(chains) == 2 and r.inode.layout.chunk_size == cs
    size = 5 * cs + 1000
    for index in range(6):
        data = bytes([index]) * min(cs, size - index * cs)
        await storage.write(chains[index % 2], ino, index, 0, data, cs)
    # Another writer has the file open: its bytes may reach past this writer's
    # length, so close asks storage for the exact length.
    other = await m.open("/f", write=True)
    closed = await m.close(ino, r.session_id, length_hint=cs, wrote=True)
    assert closed is not None and closed.size == size
    # The last writer's close takes its own length (no storage query to lower it).
    closed = await m.close(ino, other.session_id, length_hint=size, wrote=True)
    assert closed is not None and closed.size == size

    await m.truncate("/f", 2 * cs + 100)
    left = {
        c: [(x.chunk.index, x.length) for x in await storage.list_chunks(c, ino)] for c in chains
    }
    assert sorted(p for v in left.values() for p in v) == [(0, cs), (1, cs), (2, 100)]
    assert (await m.stat("/f")).size == 2 * cs + 100

    await m.link("/f", "/g")
    await m.unlink("/f")
    assert sum([len(await storage.list_chunks(c, ino)) for c in chains]) == 3  # /g still names it
    await m.unlink("/g")
    for _ in range(400):
        remaining = sum([len(await storage.list_chunks(c, ino)) for c in chains])
        if remaining == 0 and await code_of(m.stat(ino)) == "ENOENT":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"chunks or inode of {ino} still there:\n{meta.tail_log()}")
    statfs = await m.statfs()
    assert statfs.chains == len(cluster.chains) and statfs.capacity_bytes > 0


def admin_json(address: str, *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "chainfs", "admin", *args, "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class _Closer:
    def __init__(self, *things: Any) -> None:
        self.things = things

    async def aclose(self) -> None:
        for t in self.things:
            await t.close()
