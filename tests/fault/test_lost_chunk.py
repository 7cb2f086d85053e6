"""Every replica of a chunk corrupt (real processes): the chunk is marked lost once,
reads answer EIO, the storage nodes go quiet (no repair storm), admin output shows
the loss; one replica's good bytes put back, the loss clears and every replica is
repaired from it; lost again and rewritten by the client, the loss clears too."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.rpc import grpc_util
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg
from chainfs.testing import cluster as cluster_mod
from tests.fault import faultlib as fl
from tests.fault.test_storage_faults import _cluster, _file_crc_ok, _node_index

IDLE_CPU_RATIO_MAX = 0.05  # of one core, per storage process
CPU_WINDOW_S = 5.0


def _cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_ratios(pids: list[int], window_s: float) -> list[float]:
    before = [_cpu_s(p) for p in pids]
    time.sleep(window_s)
    return [(_cpu_s(p) - b) / window_s for p, b in zip(pids, before, strict=True)]


def _replicas(c: cluster_mod.LocalCluster, ino: int) -> list[tuple[int, Any, str, sp.ChunkMeta]]:
    """(target id, node, chunk file, metadata) of every replica of chunk (ino, 0)."""
    r = fl.routing(c.address)
    for chain in r.chains.values():
        out = []
        for tid in chain.targets:
            node = r.node_of_target(tid)
            meta = fl.dump_target(node, tid).get((ino, 0))
            if meta is None:
                break
            tdir = c.storage[_node_index(c, node.node_id)].info["targets"][str(tid)]
            files = fl.chunk_files(tdir, ino, 0)
            assert len(files) == 1, files
            out.append((int(tid), node, files[0], meta))
        else:
            return out
    raise AssertionError(f"no chain holds chunk ({ino}, 0) on every replica")


def _flip(path: str, offset: int) -> None:
    """Bit rot: one byte of a chunk file changes in place."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0x40]), offset)
    finally:
        os.close(fd)


def _query_chunk(address: str, ino: int) -> list[dict[str, Any]]:
    cmd = ["admin", "query-chunk", str(ino), "0", "--json", "--address", address]
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def _lost_counts(nodes: list[Any]) -> dict[int, int]:
    """Per target: the lost-chunk count its storage node reports (GetTargets)."""

    async def go() -> dict[int, int]:
        counts = {}
        for node in nodes:
            ch = grpc_util.channel(node.rpc_address, fl.operator_credential_of(node))
            try:
                rsp = await grpc_util.call(
                    sg.StorageControlStub(ch).GetTargets, sp.GetTargetsReq(), 10
                )
            finally:
                await ch.close()
            counts.update({t.target_id: t.lost_chunks for t in rsp.targets})
        return counts

    return fl.run(go)  # type: ignore[no-any-return]


def _quiet(pids: list[int]) -> list[float] | None:
    ratios = _cpu_ratios(pids, CPU_WINDOW_S)
    return ratios if max(ratios) < IDLE_CPU_RATIO_MAX else None


@pytest.mark.timeout(300)
def test_chunk_corrupt_everywhere_is_lost_quietly_then_recovers(tmp_path: Path) -> None:
    # The scrubber is what notices the good bytes put back (one pass every 2 s).
    with _cluster(tmp_path, scrub=True, scrub_round_pause_ms=2000) as c:
        fs = c.client()
        data = random.Random(5).randbytes(700_000)
        fs.write_file("/lost", data)
        fs.write_file("/fine", b"fine" * 1000)
        ino = fs.stat("/lost").st_ino
        replicas = _replicas(c, ino)
        good_file = replicas[0][2]
        good_bytes = Path(good_file).read_bytes()
        for k, (_, _, path, meta) in enumerate(replicas):
            _flip(path, (k + 1) * meta.length // 4)
            assert not _file_crc_ok(path, meta.crc32c)

        with pytest.raises(OSError) as err:
            fs.read_file("/lost")
        assert err.value.errno == errno.EIO
        assert fs.read_file("/fine") == b"fine" * 1000

        # Within 60 s of idle the storage nodes are quiet, and stay so.
        pids = [p.pid for p in c.storage if p.pid is not None]
        fl.poll(lambda: _quiet(pids), 60, "storage CPU to settle", every_s=0)
        logs = [p.log_path for p in c.storage]
        sizes = [p.stat().st_size for p in logs]
        ratios = _cpu_ratios(pids, 10.0)
        assert max(ratios) < IDLE_CPU_RATIO_MAX, ratios
        grown = [
            p.read_bytes()[s:].decode(errors="replace") for p, s in zip(logs, sizes, strict=True)
        ]
        assert sum(g.count("\n") for g in grown) < 10, grown

        # Lost: one log line per replica, a per-target count, admin query-chunk.
        text = "".join(p.read_text() for p in logs)
        for tid, *_ in replicas:
            assert text.count(f"chunk ({ino}, 0) of target {tid} is lost") == 1, text[-3000:]
        rows = _query_chunk(c.address, ino)
        assert {r["target_id"]: r["lost"] for r in rows} == {t: True for t, *_ in replicas}
        nodes = [node for _, node, _, _ in replicas]
        counts = _lost_counts(nodes)
        assert all(counts[t] == 1 for t, *_ in replicas), counts
        with pytest.raises(OSError) as err:
            fs.read_file("/lost")
        assert err.value.errno == errno.EIO

        # One replica's good bytes come back: the scrubber finds them, the loss
        # clears and the other replicas copy from it.
        Path(good_file).write_bytes(good_bytes)
        fl.poll(
            lambda: all(_file_crc_ok(path, m.crc32c) for _, _, path, m in replicas),
            60,
            "every replica repaired from the good one",
        )
        fl.poll(
            lambda: not any(r["lost"] for r in _query_chunk(c.address, ino)),
            30,
            "the loss to clear in admin query-chunk",
        )
        assert all(_lost_counts(nodes)[t] == 0 for t, *_ in replicas)
        assert fs.read_file("/lost") == data
        assert fl.replica_differences(c.address) == []

        # Lost again; this time the client rewrites the file: the loss clears too.
        for k, (_, _, path, meta) in enumerate(replicas):
            _flip(path, (k + 1) * meta.length // 4)
        with pytest.raises(OSError) as err:
            fs.read_file("/lost")
        assert err.value.errno == errno.EIO
        fl.poll(lambda: all(_lost_counts(nodes)[t] == 1 for t, *_ in replicas), 30, "lost again")
        fs.write_file("/lost", data[::-1])
        fl.poll(
            lambda: all(_lost_counts(nodes)[t] == 0 for t, *_ in replicas),
            30,
            "the loss to clear after the rewrite",
        )
        assert fs.read_file("/lost") == data[::-1]
        assert fl.replica_differences(c.address) == []
