"""Metadata and mgmtd high availability: a 3-member etcd, two mgmtd, two
meta servers and three storage nodes (default lease and heartbeat settings)
under a seeded metadata + small-file load from three clients. In sequence:
kill -9 the mgmtd primary (and restart it: a standby), kill -9 the meta server
the first client uses (and restart it), hang that client's meta server
(SIGSTOP: no connection reset), kill -9 the etcd leader (and restart it),
kill -9 the new mgmtd primary (the restarted one takes over again).

After each fault every client goes on within its bounded retry and no call
fails; at the end every acknowledged operation is there with its bytes,
nothing else is, and `chainfs fsck` is clean. One cluster start for all of it
(~10 s of the ~45 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from chainfs.bench.metaload import MetadataLoad
from chainfs.common.rpc.meta_client import MetaClient
from chainfs.local import LocalCluster
from chainfs.proto import meta_pb2 as pb
from chainfs.proto import mgmt_pb2 as mp
from tests.conftest import require_binary
from tests.fault import faultlib as fl
from tests.fault.test_fsck import fsck

SEED = 7
CLIENT_THREADS = 3
ACKS_BEFORE_FAULT = 20  # warm-up before each fault
ACKS_AFTER_FAULT = 20  # operations sent after a fault that must succeed
PHASE_TIMEOUT_S = 60.0  # bound on each wait below (2 busy cores)


def ha_cluster(base: Path) -> LocalCluster:
    return LocalCluster(
        base,
        storage_nodes=3,
        targets_per_node=1,
        replicas=3,
        kv="etcd",
        etcd_members=3,
        mgmtds=2,
        metas=2,
    )


def meta_used_by(c: LocalCluster, fs: Any) -> int:
    """Index in ``c.metas`` of the meta server ``fs`` sent its last call to."""
    current = fs.aio.io.meta._current  # "frame://host:port", "frame://unix:/path" or gRPC
    for i, p in enumerate(c.metas):
        framed = [p.info["data_address"], f"unix:{p.info['unix_socket']}"]
        if current in [*(f"frame://{a}" for a in framed), p.info["rpc_address"]]:
            return i
    raise AssertionError(f"{current} is none of our meta servers")


def _meta_online(c: LocalCluster) -> int:
    return len(fl.routing(c.address).nodes_of_type(mp.META))


def _after_fault(load: MetadataLoad, what: str, killed_at: float) -> float:
    """Wait until operations sent after the kill are acknowledged, by every client;
    returns the seconds until the slowest client had an operation it sent after the
    fault acknowledged."""

    def going_on() -> bool:
        return (
            load.acks_started_after(killed_at) >= ACKS_AFTER_FAULT
            and all(load.acks_started_after(killed_at, k) > 0 for k in range(CLIENT_THREADS))
        ) or bool(load.problems)

    fl.poll(going_on, PHASE_TIMEOUT_S, f"metadata operations to continue after {what}")
    assert not load.problems, load.problems
    worst = max(load.resumed_after(killed_at, k) or 0.0 for k in range(CLIENT_THREADS))
    return worst


def _retry_on_the_other_meta_server_gets_the_first_answer(c: LocalCluster) -> None:
    """What a client's failover relies on: a mutating request that ran on one meta
    server, retried (same client and request id) on the other, is answered from
    the record the first one left in the shared store, not run twice."""

    async def go() -> None:
        a, b = (MetaClient(str(p.info["rpc_address"])) for p in c.metas)
        try:
            await a.mkdir("/idem")
            await a.create("/idem/src", write=False)
            req = pb.RenameReq(
                req=a.request_info(),
                src=pb.PathAt(path=b"/idem/src"),
                dst=pb.PathAt(path=b"/idem/dst"),
            )
            first = await a.call("Rename", req)
            again = await b.call("Rename", req)  # the reply was lost: retried elsewhere
            # Not ENOENT (the source is gone since the first run): the first
            # answer, less the directories' attributes, which are not kept for
            # retries (a client asks meta for them when it needs them).
            assert first.HasField("src_parent") and not again.HasField("src_parent")
            want = pb.RenameRsp()
            want.CopyFrom(first)
            for name in ("src_parent", "dst_parent", "replaced"):
                want.ClearField(name)
            assert again == want
            assert sorted(await b.listdir("/idem")) == ["dst"]
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(go())


def _warm(load: MetadataLoad) -> None:
    """Let the load run a little between faults."""
    n = load.ack_count()
    fl.poll(lambda: load.ack_count() >= n + ACKS_BEFORE_FAULT, PHASE_TIMEOUT_S, "warm-up")


@pytest.mark.timeout(300)
def test_mgmtd_meta_and_etcd_faults_under_metadata_load(tmp_path: Path) -> None:
    require_binary("etcd")
    with ha_cluster(tmp_path) as c:
        assert len(c.mgmtd_addresses) == 2 and _meta_online(c) == 2
        clients = [c.client() for _ in range(CLIENT_THREADS)]
        load = MetadataLoad(clients, seed=SEED, root="/ha")
        load.start()
        resumed: dict[str, float] = {}
        try:
            # kill -9 the mgmtd primary: the standby takes over; restart the old one.
            _warm(load)
            killed_at = time.monotonic()
            first = c.kill_mgmtd_primary()
            resumed["kill -9 mgmtd primary"] = _after_fault(load, "mgmtd kill", killed_at)
            second = c.mgmtd_primary(PHASE_TIMEOUT_S)
            resumed["  (new mgmtd primary)"] = time.monotonic() - killed_at
            assert second != first
            assert c.client().isdir("/ha")  # a new client finds the cluster
            c.restart_mgmtd(first)

            # kill -9 the meta server client 0 uses; restart it.
            _warm(load)
            victim = meta_used_by(c, clients[0])
            killed_at = time.monotonic()
            c.kill_meta(victim)
            resumed["kill -9 meta"] = _after_fault(load, "meta kill", killed_at)
            c.restart_meta(victim)
            fl.poll(lambda: _meta_online(c) == 2, PHASE_TIMEOUT_S, "the meta server back")

            # A hung meta server (no reset): left after one attempt timeout.
            _warm(load)
            pid = c.metas[meta_used_by(c, clients[0])].pid
            assert pid is not None
            stopped_at = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                resumed["SIGSTOP meta"] = _after_fault(load, "meta hang", stopped_at)
            finally:
                os.kill(pid, signal.SIGCONT)

            # kill -9 the etcd leader (a new election); restart it.
            _warm(load)
            leader = c.etcd_leader()
            killed_at = time.monotonic()
            c.kill_etcd(leader)
            resumed["kill -9 etcd leader"] = _after_fault(load, "etcd kill", killed_at)
            c.restart_etcd(leader)

            # kill -9 the new mgmtd primary: the restarted first one takes over again.
            _warm(load)
            killed_at = time.monotonic()
            c.kill_mgmtd(second)
            resumed["kill -9 mgmtd primary again"] = _after_fault(load, "mgmtd kill", killed_at)
            assert c.mgmtd_primary(PHASE_TIMEOUT_S) == first
            _warm(load)
        finally:
            load.stop()

        assert not load.problems, load.problems
        assert load.errors == []  # every call failed over within its bounded retry
        assert load.verify() == []
        assert not c.dead_processes()
        # Meta and storage heartbeats went on through both mgmtd handovers.
        fl.poll(
            lambda: _meta_online(c) == 2 and fl.all_serving(c.address),
            PHASE_TIMEOUT_S,
            "both meta servers online and every target serving",
        )
        _retry_on_the_other_meta_server_gets_the_first_answer(c)
        # Unlinked files' chunks are dropped by meta's GC in the background: poll.
        fl.poll(lambda: fsck(c.address) == (0, []), PHASE_TIMEOUT_S, "fsck clean", every_s=1.0)
        print(f"\nHA: {load.ack_count()} operations acknowledged {load.counts()}")
        print("seconds from the fault until every client had an operation acknowledged:")
        for what, s in resumed.items():
            print(f"  {what}: {s:.3f}")


def test_several_mgmtd_or_meta_servers_need_a_shared_store(tmp_path: Path) -> None:
    from chainfs.common.errors import ChainfsError, Code

    for kwargs in ({"mgmtds": 2}, {"metas": 2}, {"etcd_members": 3}, {"kv": "etcd", "mgmtds": 0}):
        with pytest.raises(ChainfsError) as e:
            LocalCluster(tmp_path, **kwargs)
        assert e.value.code == Code.EINVAL
    assert not any(tmp_path.iterdir())  # refused before anything started
