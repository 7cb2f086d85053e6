"""`chainfs bench --quick` end to end: the report's structure, never its figures.

Ceilings run for real (iperf3, fio with tiny sizes). Cluster figures run as
far as chainfs is built: a component that is not built yet shows up as
"not run: <reason>"; once it is built, its figures must have run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

REQUIRED_CEILINGS = ("iperf3_loopback_MBps", "fio_seq_read_MBps", "fio_seq_write_MBps")
REQUIRED_FIGURES = (  # issue 9
    "client_seq_read",
    "client_seq_write_r3",
    "fuse_seq_read",
    "fuse_seq_write",
    "read_ranges_256k",
    "meta_create",
    "meta_stat",
    "meta_readdir",
    "kvcache_batch_get_1m",
)
# Run whenever a LocalCluster and the client are built.
CORE_FIGURES = (
    "client_seq_write_r3",
    "client_seq_write_r3_4p",
    "client_seq_read",
    "client_seq_read_4p",
    "client_rand_read_4k",
    "client_rand_read_1m",
    "read_ranges_256k",
    "read_ranges_64k_1m",
    "meta_create",
    "meta_stat",
    "meta_readdir",
    "meta_rename",
    "meta_unlink",
    "rss_peak_mgmtd",
    "rss_peak_meta",
    "rss_peak_storage_max",
    "client_seq_write_r1",
    "client_seq_read_r1",
)
FUSE_FIGURES = ("fuse_seq_write", "fuse_seq_write_4p", "fuse_seq_read", "fuse_seq_read_4p")
KV_FIGURES = ("kvcache_put_1m", "kvcache_batch_get_1m", "kvcache_batch_get_4k", "kvcache_get_4k")


def _built(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


def _cluster_and_client_built() -> bool:
    import chainfs

    return getattr(chainfs, "connect", None) is not None and _built(
        "chainfs.testing.cluster",
        "chainfs.mgmt_service.server",
        "chainfs.meta_service.server",
        "chainfs.storage_service.server",
    )


def _fuse_built() -> bool:
    return (
        _cluster_and_client_built()
        and os.path.exists("/dev/fuse")
        and _built("pyfuse3", "chainfs.fuse_mount.mount")
    )


def _kvcache_built() -> bool:
    if not _cluster_and_client_built():
        return False
    fs_cls = getattr(importlib.import_module("chainfs.client.sync"), "FileSystem", None)
    return fs_cls is not None and hasattr(fs_cls, "kvcache")


@pytest.mark.timeout(240)
def test_bench_quick_writes_a_complete_report(tmp_path: Path) -> None:
    require_binary("iperf3")
    require_binary("fio")
    out = tmp_path / "results"
    proc = subprocess.run(
        # The default scratch directory (system temp, removed by the run): a deep
        # pytest path would push the storage nodes' unix sockets past 108 bytes.
        [sys.executable, "-m", "chainfs", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=230,
    )  # fmt: skip
    # Exit 1 means some figure or ceiling failed (not: was not run).
    assert proc.returncode == 0, proc.stderr[-4000:]

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
    for r in report["results"]:
        assert {"name", "value", "unit", "ceiling", "ratio"} <= set(r)
        if r["status"] == "ok":
            assert isinstance(r["value"], float), r
            assert (r["ratio"] is None) == (r["ceiling"] is None), r
        else:
            assert r["status"].startswith("not run: "), r
            assert r["value"] is None and r["ratio"] is None, r

    # Once a component lands, its figures run.
    # ENOSYS is how a built component says a part of it is not (DESIGN, STYLE).
    must_run = []
    if _cluster_and_client_built():
        must_run += CORE_FIGURES
    if _fuse_built():
        must_run += FUSE_FIGURES
    if _kvcache_built():
        must_run += KV_FIGURES
    assert by_name["rss_client"]["status"] == "ok"
    not_run = {
        n: by_name[n]["status"]
        for n in must_run
        if by_name[n]["status"] != "ok" and "[ENOSYS]" not in by_name[n]["status"]
    }
    assert not not_run, not_run

    md = json_path.with_suffix(".md").read_text()
    for name in REQUIRED_FIGURES:
        assert f"| {name} |" in md
    for png in (f"{json_path.stem}-ratios.png", f"{json_path.stem}-absolute.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in md
