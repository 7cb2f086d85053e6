"""`chainfs bench --quick` end to end: the report's structure, never its figures.

Ceilings run for real (iperf3, fio with tiny sizes). Every figure must run:
a part of chainfs that fails (ENOSYS and ImportError included) fails the run
and this test. Only FUSE may be "not run", and only on a machine that cannot
mount it (no /dev/fuse, no `chainfs[fuse]` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chainfs.bench import smallops
from chainfs.bench.cluster import fuse_unavailable
from chainfs.bench.workloads import META_PHASES
from chainfs.common.auth.tokens import TOKEN_ENV, TOKEN_FILE_ENV
from tests.conftest import require_binary

REQUIRED_CEILINGS = ("iperf3_loopback_MBps", "fio_seq_read_MBps", "fio_seq_write_MBps")
REQUIRED_FIGURES = (
    "client_seq_read",
    "client_seq_write_r3",
    "fuse_seq_read",
    "fuse_seq_write",
    "read_ranges_256k",
    "meta_create",
    "meta_stat",
    "meta_readdir",
    "kvcache_batch_get_1m",
    "kvcache_get_4k_4p",
    "kvcache_get_4k_first",
    "kvcache_batch_get_4k_4p",
    "kvcache_put_1m_4p",
    "meta_create_steady",
    "meta_unlink_steady",
    "fuse_create",
    "fuse_readdir",
    "fuse_rand_write_4k",
    "fuse_smallfiles",
    "usrbio_batch_64x1m",
    "dataloader_fork_8w_256k",
)
SMALL_FIGURES = tuple(f.figure for f in smallops.SMALL_FIGURES.values())
META_FIGURES = tuple(META_PHASES.values())
FUSE_FIGURES = ("fuse_seq_write", "fuse_seq_write_4p", "fuse_seq_read", "fuse_seq_read_4p",
                *SMALL_FIGURES)  # fmt: skip


@pytest.mark.timeout(240)
def test_bench_quick_writes_a_complete_report(tmp_path: Path) -> None:
    require_binary("iperf3")
    require_binary("fio")
    require_binary("git")
    require_binary("rsync")
    out = tmp_path / "results"
    peer = tmp_path / "peer"  # --compare: the mount workloads on another directory too
    peer.mkdir()
    proc = subprocess.run(
        # The default scratch directory (system temp, removed by the run): a deep
        # pytest path would push the storage nodes' unix sockets past 108 bytes.
        [sys.executable, "-m", "chainfs", "bench", "--quick", "--out", str(out),
         "--compare", str(peer)],
        capture_output=True,
        text=True,
        timeout=230,
        # As a new user runs it: no token of its own (the session's would hide a
        # worker that does not act as the cluster's admin).
        env={k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)},
    )  # fmt: skip
    # Exit 1 means some figure or ceiling failed (not: was not run).
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"report written to {out}" in proc.stdout

    [json_path] = list(out.glob("*.json"))
    report = json.loads(json_path.read_text())
    assert {"machine", "config", "ceilings", "results"} <= set(report)
    assert {"cores", "memory_bytes", "kernel"} <= set(report["machine"])
    assert report["config"]["mode"] == "quick"
    for name in REQUIRED_CEILINGS:  # measured: both tools are installed
        assert isinstance(report["ceilings"][name], float), (name, report["ceilings_detail"])

    by_name = {r["name"]: r for r in report["results"]}
    assert len(by_name) == len(report["results"])
    assert set(REQUIRED_FIGURES) <= set(by_name)
    no_fuse = fuse_unavailable()
    no_torch = importlib.util.find_spec("torch") is None  # optional, like FUSE
    for r in report["results"]:
        assert {"name", "value", "unit", "ceiling", "ratio"} <= set(r)
        if r["name"] == "dataloader_fork_8w_256k" and no_torch:
            assert r["status"] == "not run: torch not installed (the chainfs[torch] extra)", r
        elif r["name"] in FUSE_FIGURES and no_fuse is not None:
            assert r["status"] == f"not run: {no_fuse}", r
            assert r["value"] is None and r["ratio"] is None, r
        else:
            assert r["status"] == "ok", r
            assert isinstance(r["value"], float), r
            assert (r["ratio"] is None) == (r["ceiling"] is None), r

    for name in SMALL_FIGURES:  # each with its local-directory ceiling of this run
        assert isinstance(report["ceilings"][by_name[name]["ceiling_name"]], float), name
    smallfiles = by_name["fuse_smallfiles"]["details"]
    if no_fuse is None:
        assert smallfiles["skipped"] == [] and smallfiles["files"] > 0, smallfiles
    peer_results = {r["name"]: r for r in report["peer"]["results"]}
    assert sorted(peer_results) == sorted(SMALL_FIGURES)
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in peer_results.values())
    assert list(peer.iterdir()) == []  # the run cleaned up what it made there

    # CPU of the processes each workload made busy: the metadata servers did work
    # during the metadata figures, and the mix's CPU per operation is counted.
    meta_cpu = report["cpu"]["meta"]
    assert meta_cpu["wall_s"] > 0 and meta_cpu["ops"] == sum(
        by_name[n]["details"]["ops"] for n in META_FIGURES
    )
    assert any(name.startswith("meta") and s > 0 for name, s in meta_cpu["cpu_s"].items()), meta_cpu
    assert any(name.startswith("client") and s > 0 for name, s in meta_cpu["cpu_s"].items())
    assert "ops" not in report["cpu"]["meta_steady"]  # its window holds the churn too

    md = json_path.with_suffix(".md").read_text()
    for name in REQUIRED_FIGURES:
        assert f"| {name} |" in md
    assert "## CPU by process (each workload)" in md and "| meta |" in md
    assert "## Metadata, fresh and in steady state" in md and "## Side by side with" in md
    for png in (f"{json_path.stem}-ratios.png", f"{json_path.stem}-absolute.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in md
