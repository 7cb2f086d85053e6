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
