"""The benchmark's own machinery: client-process tasks on a local directory, the
content checks that keep fast wrong answers out of the figures, and the report.

The chainfs figures themselves are exercised by tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.bench import report as rep
from chainfs.bench.context import MiB, Result, WorkloadFailed
from chainfs.bench.workers import SEGMENT_BYTES, WorkerPool, aggregate, check_stamps, stamp
from chainfs.bench.workloads import FIGURES, REGISTRY, figure, select

POSIX = {"kind": "posix"}


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(2)
    try:
        yield p
    finally:
        p.close()


def test_stamps_catch_misplaced_bytes() -> None:
    buf = bytearray(3 * SEGMENT_BYTES)
    stamp(buf, len(buf), 5 * SEGMENT_BYTES)
    check_stamps(buf, len(buf), 5 * SEGMENT_BYTES, "f")
    # A read that starts mid-segment checks only the segments that start inside it.
    check_stamps(memoryview(buf)[100:], len(buf) - 100, 5 * SEGMENT_BYTES + 100, "f")
    with pytest.raises(Exception, match="expected"):
        check_stamps(buf, len(buf), 6 * SEGMENT_BYTES, "f")  # the right bytes, wrong place
    with pytest.raises(Exception, match="expected"):
        check_stamps(bytes(len(buf)), len(buf), 0, "f")  # zeros


@pytest.mark.timeout(120)
def test_write_read_random_read_on_a_local_directory(pool: WorkerPool, tmp_path: Path) -> None:
    paths = [str(tmp_path / f"f{i}") for i in range(2)]
    size = 3 * MiB
    write = {"backend": POSIX, "paths": paths, "size_bytes": size, "block_bytes": 2 * MiB,
             "max_seconds": 60}  # fmt: skip
    outs = pool.run("seq_write", [write] * 2, 60)
    nbytes, ops, secs = aggregate(outs, "write")
    assert nbytes == 2 * size and ops == 4 and secs > 0
    assert [Path(p).stat().st_size for p in paths] == [size, size]

    read = {"backend": POSIX, "paths": paths, "sizes": [size, size], "block_bytes": 2 * MiB,
            "max_seconds": 60}  # fmt: skip
    nbytes, _, _ = aggregate(pool.run("seq_read", [read] * 2, 60), "read")
    assert nbytes == 2 * size

    rand = {"backend": POSIX, "path": paths[0], "size_bytes": size, "io_bytes": 4096,
            "seconds": 0.2, "warmup_seconds": 0.05, "seed": 1}  # fmt: skip
    _, ops, _ = aggregate(pool.run("rand_read", [rand], 60), "read")
    assert ops > 0

    # One wrong byte in a stamp and the read fails instead of counting.
    with open(paths[1], "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"X")
    with pytest.raises(WorkloadFailed, match="segment at offset 2097152"):
        pool.run("seq_read", [read] * 2, 60)
    # The pool is still usable after a failed task (the barrier was reset).
    assert len(pool.run("seq_read", [{**read, "paths": [paths[0]] * 2}] * 2, 60)) == 2


@pytest.mark.timeout(120)
def test_meta_task_counts_every_operation(pool: WorkerPool, tmp_path: Path) -> None:
    params = {"backend": POSIX, "root": str(tmp_path), "files": 50, "max_seconds": 60,
              "readdir_rounds": 3}  # fmt: skip
    outs = pool.run("meta", [params] * 2, 60)
    for phase, want in (("create", 100), ("stat", 100), ("readdir", 300), ("rename", 100),
                        ("unlink", 100)):  # fmt: skip
        assert aggregate(outs, phase)[1] == want, phase
    assert [sorted(p.name for p in tmp_path.iterdir())] == [["w0", "w1"]]
    assert not any((tmp_path / "w0").iterdir())


def test_every_registered_figure_has_a_unit_and_the_issue_names_exist() -> None:
    names = [r for w in REGISTRY.values() for r in w.results]
    assert len(names) == len(set(names))
    assert set(names) == set(FIGURES)
    for required in ("client_seq_read", "client_seq_write_r3", "fuse_seq_read", "fuse_seq_write",
                     "read_ranges_256k", "meta_create", "meta_stat", "meta_readdir",
                     "kvcache_batch_get_1m"):  # fmt: skip
        assert required in FIGURES
    assert [w.name for w in select(["meta_stat", "client_seq_read"])] == ["client_seq_read", "meta"]
    with pytest.raises(ValueError, match="unknown workload nope"):
        select(["nope"])


def _report(results: list[Result]) -> dict:
    return {
        "schema": 1,
        "created_utc": "2026-01-01T00:00:00+00:00",
        "duration_s": 1.0,
        "machine": {"cores": 2, "memory_GiB": 8.0, "kernel": "6", "cpu_model": "x"},
        "config": {"mode": "quick", "cluster": {"started_by_bench": True}},
        "ceilings": {"iperf3_loopback_MBps": 1000.0, "local_meta_stat_per_s": None},
        "ceilings_detail": {},
        "results": [r.to_json() for r in results],
        "warnings": [],
    }


def test_report_says_below_target_and_not_run_plainly(tmp_path: Path) -> None:
    ceilings = {"iperf3_loopback_MBps": 1000.0}
    results = [
        figure("client_seq_read", 300.0, ceilings),  # 0.3 < target 0.6
        figure("read_ranges_256k", 500.0, ceilings),  # 0.5 >= target 0.4
        figure("fuse_seq_read", None, ceilings, status="not run: FUSE mount not built yet"),
        figure("meta_stat", 1234.0, {}),  # no ceiling measured
        figure("rss_client", 50.0, ceilings),
    ]
    assert results[0].ratio == pytest.approx(0.3) and results[0].below_target
    paths = rep.write_reports(_report(results), tmp_path, "2026-01-01-000000")
    md = paths["markdown"].read_text()
    assert "**client_seq_read is below target**" in md
    assert "read_ranges_256k meets its target" in md
    assert "fuse_seq_read: not run: FUSE mount not built yet" in md
    for kind in ("ratios_png", "absolute_png"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(paths["json"].read_text())
    assert [r["name"] for r in doc["results"]] == [r.name for r in results]
    assert doc["results"][2]["value"] is None and doc["results"][3]["ratio"] is None
    # A second report in the same second does not overwrite the first.
    again = rep.write_reports(_report(results), tmp_path, "2026-01-01-000000")
    assert again["json"] != paths["json"]
