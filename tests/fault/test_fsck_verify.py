"""`chainfs fsck --verify-data` against real processes: bit rot that no read has met
is found on the replica that holds it, reported by path, and repaired by --repair;
a chunk damaged on every replica is reported lost."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fault import faultlib as fl
from tests.fault.test_fsck import fsck
from tests.fault.test_lost_chunk import _flip, _query_chunk, _replicas
from tests.fault.test_storage_faults import _cluster, _file_crc_ok, _flip_one_replica


def fsck_verify(address: str, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    cmd = ["fsck", "--address", address, "--json", "--verify-data", *args]
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", *cmd],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout), out.stderr


@pytest.mark.timeout(180)
def test_verify_data_finds_and_repairs_bit_rot(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:  # no scrubber: nothing else looks at the bytes
        fs = c.client()
        rng = random.Random(17)
        data = {p: rng.randbytes(700_000) for p in ("/d/a", "/d/b", "/d/c")}
        fs.makedirs("/d", exist_ok=True)
        for p, d in data.items():
            fs.write_file(p, d)
        # One replica of /d/a rots; every replica of /d/b does.
        rotten, want_crc = _flip_one_replica(c, fs, "/d/a")
        ino_b = fs.stat("/d/b").st_ino
        for k, (_, _, path, meta) in enumerate(_replicas(c, ino_b)):
            _flip(path, (k + 1) * meta.length // 4)

        # Metadata alone sees nothing.
        assert fsck(c.address) == (0, [])

        code, problems, err = fsck_verify(c.address)
        assert code == 1
        assert "verify-data:" in err
        by_kind = {(p["kind"], p["path"]): p for p in problems}
        assert sorted(by_kind) == [("damaged_replica", "/d/a"), ("lost_chunk", "/d/b")], problems
        damaged = by_kind[("damaged_replica", "/d/a")]
        assert damaged["chunk"] == [fs.stat("/d/a").st_ino, 0]
        assert rotten.startswith(_target_dir(c, damaged["target_id"]) + "/")
        lost = by_kind[("lost_chunk", "/d/b")]
        assert sorted(lost["damaged_targets"]) == sorted(t for t, *_ in _replicas(c, ino_b))

        code, problems, _ = fsck_verify(c.address, "--repair", "--rate", str(64 * 1024 * 1024))
        fixed = next(p for p in problems if p["kind"] == "damaged_replica")
        assert fixed["repair"].startswith("copied from target"), fixed
        assert fixed["bytes_copied"] == 700_000
        assert _file_crc_ok(rotten, want_crc)

        # Afterwards: every replica of /d/a verifies and carries the same CRC32C;
        # only the lost chunk is left.
        ino_a = fs.stat("/d/a").st_ino
        rows = _query_chunk(c.address, ino_a)
        assert len(rows) == 3 and len({r["crc32c"] for r in rows}) == 1, rows
        assert rows[0]["crc32c"] == want_crc
        code, problems, _ = fsck_verify(c.address)
        assert [(p["kind"], p["path"]) for p in problems] == [("lost_chunk", "/d/b")]
        assert fs.read_file("/d/a") == data["/d/a"]
        assert fs.read_file("/d/c") == data["/d/c"]
        assert fl.replica_differences(c.address) == []


def _target_dir(c: Any, target_id: int) -> str:
    for p in c.storage:
        if p.info and str(target_id) in p.info["targets"]:
            return str(p.info["targets"][str(target_id)])
    raise AssertionError(f"no storage process serves target {target_id}")
