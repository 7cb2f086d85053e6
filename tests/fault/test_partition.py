"""A storage node cut off from the others and from mgmtd fences itself; no client
reads stale bytes from it.

The node runs inside a network namespace this test creates (ip netns and a
veth pair, chainfs.testing.netns); mgmtd and the other storage nodes listen on
this side's end of the veth, so the node reaches them only across that link.
A probe client runs inside the namespace as well (tests/fault/partition_probe.py):
the client on the node's side of the partition, holding the routing from
before the cut, reading the chunk straight from the node every 20 ms.

Cutting the link: the node fences itself (the probe gets FENCED) before mgmtd
drops its target; the chain moves on and takes a new write; no read the probe
sent after that write was acknowledged returns the old bytes, and a client on
this side that sends its read to the cut-off node gets an error, never bytes.
Restoring the link: the node resyncs and serves the new bytes, the replicas
are identical and `chainfs fsck` is clean. Throughout, a seeded workload on
this side writes and re-reads checksummed files: writes go on while the node
is cut off and nothing acknowledged is lost or read back wrong.

Run twice: with the chain's head cut off and with its tail. Needs root and
ip(8). About 20 s per case on 2 cores.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.common import config as cfg
from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.local import cluster as cluster_mod
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.testing.netns import NetnsLink
from chainfs.testing.proc import ServiceProcess
from tests.conftest import require, require_binary
from tests.fault import faultlib as fl
from tests.fault.test_fsck import fsck

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_TIMEOUT_MS = 4000  # the node fences after half of it, mgmtd drops it after all of it
# Across a partition nothing answers (no reset): a request to the cut-off node
# waits for its whole timeout. 2 s here keeps the test short: the client's
# (default 30 s) and the chain forward's (default 10 s, tried 3 times: a
# partitioned successor stalls its chain's writes ~30 s with the defaults).
REQUEST_TIMEOUT_MS = 2000


class PartitionedCluster(cluster_mod.LocalCluster):
    """LocalCluster with storage node ``isolated`` inside ``net``'s namespace and
    mgmtd and the other storage nodes listening on the veth's outer address."""

    def __init__(self, base_dir: Path, net: NetnsLink, isolated: int, **kwargs: Any) -> None:
        self.net = net
        self.isolated = f"storage{isolated}"

        def configure(i: int, c: Any) -> None:
            c.listen_host = net.inner_address if i == isolated else net.outer_address
            c.forward_timeout_ms = REQUEST_TIMEOUT_MS
            # A unix socket path is reachable across network namespaces (the file
            # system is shared): it would bridge the partition.
            c.unix_socket = ""

        super().__init__(base_dir, configure_storage=configure, **kwargs)

    def _spawn(self, kind: str, name: str, config_obj: Any) -> ServiceProcess:
        if kind == "mgmtd":
            config_obj.listen_host = self.net.outer_address
        if name != self.isolated:
            return super()._spawn(kind, name, config_obj)
        workdir = self.base_dir / name
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / f"{kind}.toml"
        config_path.write_text(cfg.to_toml(config_obj))
        proc = ServiceProcess(kind, config_path, workdir, name=name, prefix=self.net.exec_prefix())
        self._procs.append(proc)
        proc.start(timeout_s=self.start_timeout_s)
        return proc


class Probe:
    """partition_probe.py inside the namespace; its answers as dicts."""

    def __init__(self, net: NetnsLink, workdir: Path, **args: Any) -> None:
        self.out = workdir / "probe.jsonl"
        self.stop_file = workdir / "probe.stop"
        self.log = workdir / "probe.log"
        cmd = [*net.exec_prefix(), sys.executable, "-m", "tests.fault.partition_probe"]
        for k, v in args.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        cmd += ["--out", str(self.out), "--stop-file", str(self.stop_file)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def read(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def answers(self) -> list[dict[str, Any]]:
        """The answers so far (the probe must still be running)."""
        assert self.proc.poll() is None, f"probe exited: {self.log.read_text()[-2000:]}"
        return self.read()

    def stop(self) -> None:
        self.stop_file.touch()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child only
            self.proc.wait()


async def _read_direct(
    address: str, chain: int, target: int, ino: int, length: int, cred: cpb.Credential
) -> Any:
    """One read sent straight to ``target`` at ``address`` with a node's
    credential ``cred``: bytes or the error code."""
    dc = DataClient(credential=cred)
    try:
        req = sp.BatchReadReq(
            ios=[
                sp.ReadIO(
                    chain_id=chain,
                    target_id=target,
                    chunk=sp.ChunkId(inode=ino, index=0),
                    offset=0,
                    length=length,
                )
            ]
        )
        got: list[memoryview] = []

        def sink(_t: int, header: bytes) -> list[memoryview]:
            got.append(memoryview(bytearray(sp.BatchReadRsp.FromString(header).results[0].length)))
            return got

        try:
            reply = await dc.request(
                address, sp.BATCH_READ, req.SerializeToString(), payload_sink=sink, timeout_s=5
            )
        except ChainfsError as e:
            return e.code
        rsp = sp.BatchReadRsp.FromString(reply.header)
        return rsp.status.code or rsp.results[0].status.code or bytes(got[0] if got else b"")
    finally:
        await dc.close()


def _longest_gap(times: list[float], since: float) -> float:
    """Longest pause between consecutive times, counting from the last one before ``since``."""
    before = [t for t in times if t <= since]
    after = sorted(t for t in times if t > since)
    points = before[-1:] + after
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("isolated", [0, 2], ids=["node0", "node2"])  # chain head, tail today
def test_partitioned_node_fences_and_serves_no_stale_bytes(tmp_path: Path, isolated: int) -> None:
    require_binary("ip")
    require("root", os.geteuid() == 0, "network namespaces (ip netns add) need root")
    rng = random.Random(7)
    old, new = rng.randbytes(100_000), rng.randbytes(100_000)
    try:
        net = NetnsLink.create()
    except ChainfsError as e:
        require("network namespaces", False, e.message)
    with (
        net,
        PartitionedCluster(
            tmp_path,
            net,
            isolated,
            storage_nodes=3,
            targets_per_node=1,
            replicas=3,
            heartbeat_interval_ms=200,
            heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
        ) as c,
    ):
        fs = c.client(
            config=ClientConfig(storage=StorageClientConfig(timeout_ms=REQUEST_TIMEOUT_MS))
        )
        fs.write_file("/p", old)
        ino = fs.stat("/p").st_ino
        r = fl.routing(c.address)
        assert len(r.chains) == 1, "3 nodes x 1 target x 3 replicas: one chain"
        chain = next(iter(r.chains.values()))
        node = c.storage[isolated].info
        cut_target = node["target_ids"][0]
        address = r.nodes[node["node_id"]].data_address
        assert address.startswith(net.inner_address + ":"), address
        position = list(chain.targets).index(cut_target)

        probe = Probe(
            net,
            tmp_path,
            address=address,
            chain=chain.chain_id,
            target=cut_target,
            inode=ino,
            length=len(old),
            secret_file=c.secret_file,
            node_id=node["node_id"],
        )
        # Checksummed files written and read back on this side all along.
        w = fl.Workload(fs, seed=isolated)
        w.start()
        try:
            fl.poll(
                lambda: any(a.get("sha256") == _sha(old) for a in probe.answers()),
                30,
                "the probe to read the old bytes from inside the namespace",
            )
            fl.poll(lambda: w.acked_count() >= 5, 60, "5 files written before the cut")

            t_cut = time.monotonic()
            net.cut()
            fl.poll(
                lambda: fl.states(c.address)[cut_target] == mp.OFFLINE,
                30,
                "mgmtd to take the cut-off target offline",
                every_s=0.05,
            )
            t_offline = time.monotonic()
            acked_offline = w.acked_count()
            with fs.open("/p", "r+b") as f:
                f.write(new)
            t_ack = time.monotonic()
            assert fs.read_file("/p") == new

            # A client on this side with the old routing: the node is out of reach.
            cred = fl.node_credential_of(c.secret_file, r, node["node_id"])
            stale = asyncio.run(
                _read_direct(address, chain.chain_id, cut_target, ino, len(new), cred)
            )
            assert not isinstance(stale, bytes), "read across the partition returned bytes"

            fl.poll(
                lambda: sum(a["t0"] > t_ack for a in probe.answers()) >= 20,
                30,
                "20 probe reads after the new write",
            )
            fl.poll(
                lambda: w.acked_count() >= acked_offline + 5, 60, "writes going on while cut off"
            )
            t_restore = time.monotonic()
            net.restore()
            fl.poll(lambda: fl.all_serving(c.address), 60, "the node back and resynced")
            t_serving = time.monotonic()
            fl.poll(
                lambda: any(
                    a.get("sha256") == _sha(new) and a["t0"] > t_restore for a in probe.answers()
                ),
                30,
                "the new bytes from the node",
            )
        finally:
            w.stop()
            probe.stop()
        assert not w.corrupt, f"reads returned wrong bytes: {w.corrupt[:5]}"
        assert w.verify_all() == []

        answers = probe.read()
        events = {"cut": t_cut, "offline": t_offline, "ack": t_ack, "restore": t_restore}
        (tmp_path / "events.json").write_text(json.dumps(events))  # beside probe.jsonl
        fenced = [a for a in answers if a.get("code") == Code.FENCED and a["t0"] > t_cut]
        assert fenced, "the probe never got FENCED while the node was cut off"
        first = fenced[0]
        served = [a for a in answers if t_cut < a["t0"] < first["t0"] and "sha256" in a]
        # The node fenced itself before mgmtd declared it offline, and stayed fenced
        # while cut off: no read sent to it since was served (FENCED; on a starved
        # machine maybe a timeout, never bytes).
        during = [
            a for a in answers if min(first["t0"], t_offline) <= a["t0"] and a["t1"] < t_restore
        ]
        assert not [a for a in during if "sha256" in a], [a for a in during if "sha256" in a][:5]
        for a in answers:
            assert "sha256" not in a or a["sha256"] in (_sha(old), _sha(new)), a
            if a["t0"] > t_ack:
                assert a.get("sha256") != _sha(old), f"stale bytes after the new write: {a}"

        assert fl.replica_differences(c.address) == []
        assert fs.read_file("/p") == new
        assert fsck(c.address) == (0, [])
        print(
            f"\npartition: cut node at chain position {position}; "
            f"fenced {(served[-1]['t0'] if served else t_cut) - t_cut:.2f}-"
            f"{first['t1'] - t_cut:.2f}s after the cut "
            f"(limit {HEARTBEAT_TIMEOUT_MS / 2000:.1f}s), "
            f"offline at mgmtd seen {t_offline - t_cut:.2f}s, "
            f"new write acked {t_ack - t_cut:.2f}s, "
            f"serving again {t_serving - t_restore:.2f}s after restore; "
            f"longest pause between acknowledged writes {_longest_gap(w.ack_times, t_cut):.2f}s; "
            f"{len(answers)} probe reads, {len(w.acked)} files written"
        )
