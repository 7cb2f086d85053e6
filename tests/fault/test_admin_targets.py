"""Operator commands with a real cluster: offline-target holds a live target out
(its node's heartbeats do not revive it); online-target -> it resyncs back."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chainfs.proto import mgmt_pb2 as mp
from tests.fault import faultlib as fl
from tests.fault.test_storage_faults import _client_config, _cluster


def admin(address: str, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", "admin", *args, "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(120)
def test_offline_target_resyncs_back_and_sync_status(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        fs = c.client(config=_client_config())
        rng = random.Random(5)
        files = {f"/a{i}": rng.randbytes(rng.randrange(1, 400_000)) for i in range(20)}
        for p, d in files.items():
            fs.write_file(p, d)
        r = fl.routing(c.address)
        chain = r.chains[min(r.chains)]
        victim = int(chain.targets[0])
        rows = admin(c.address, "offline-target", str(victim))
        assert rows[0]["target_id"] == victim and rows[0]["state"] in ("offline", "waiting")
        # Writes while it is out: the resync must bring them over.
        more = {f"/b{i}": rng.randbytes(rng.randrange(1, 400_000)) for i in range(10)}
        for p, d in more.items():
            fs.write_file(p, d)
        files.update(more)
        # Held out: the node heartbeats every 300 ms, the target stays offline.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            row = next(t for t in admin(c.address, "targets") if t["target_id"] == victim)
            assert row["state"] == "offline" and row["held_offline"], row
            time.sleep(0.2)
        assert isinstance(admin(c.address, "sync-status"), list)
        rows = admin(c.address, "online-target", str(victim))
        assert rows[0]["target_id"] == victim
        fl.poll(lambda: fl.states(c.address)[victim] == mp.SERVING, 60, "the target serving again")
        fl.poll(lambda: fl.replica_differences(c.address) == [], 30, "identical replicas")
        for p, d in files.items():
            assert hashlib.sha256(fs.read_file(p)).digest() == hashlib.sha256(d).digest()
        assert admin(c.address, "sync-status") == []


@pytest.mark.timeout(120)
def test_resync_progress_in_admin_targets(tmp_path: Path) -> None:
    """A rate-limited resync paged in tiny batches: the target's routing entry (what
    `admin targets` prints) shows bytes left, counted up front, going down, and a
    rate while it runs; then the target serves again with identical bytes."""

    with _cluster(
        tmp_path,
        resync_rate_bytes_per_s=1024 * 1024,
        resync_report_interval_ms=100,
        resync_batch_chunks=2,  # many pages per side
    ) as c:
        fs = c.client(config=_client_config())
        r = fl.routing(c.address)
        chain = r.chains[min(r.chains)]
        victim = int(chain.targets[0])
        admin(c.address, "offline-target", str(victim))
        rng = random.Random(8)
        files = {f"/p{i}": rng.randbytes(rng.randrange(200_000, 1_000_000)) for i in range(16)}
        for p, d in files.items():
            fs.write_file(p, d)
        admin(c.address, "online-target", "--no-wait", str(victim))  # released: it resyncs
        seen: list[tuple[int, int]] = []

        def progress() -> bool:
            t = fl.routing(c.address).targets[victim]
            if t.public_state == mp.SYNCING and t.sync_bytes_left > 0:
                seen.append((t.sync_bytes_left, t.sync_rate_bytes_per_s))
            return len({left for left, _ in seen}) >= 2 and any(rate > 0 for _, rate in seen)

        fl.poll(progress, 60, "bytes left going down and a rate while syncing", every_s=0.05)
        assert seen[0][0] <= sum(len(d) for d in files.values())
        assert [left for left, _ in seen] == sorted((left for left, _ in seen), reverse=True)
        fl.poll(lambda: fl.states(c.address)[victim] == mp.SERVING, 60, "the target serving again")
        fl.poll(lambda: fl.replica_differences(c.address) == [], 30, "identical replicas")
        for p, d in files.items():
            assert fs.read_file(p) == d
        row = next(t for t in admin(c.address, "targets") if t["target_id"] == victim)
        assert (row["state"], row["sync_bytes_left"]) == ("serving", 0)
