"""The benchmark's own machinery: client-process tasks on a local directory, the
content checks that keep fast wrong answers out of the figures, errors that
fail a figure, the report, `chainfs bench compare` and the studies' commands.

The chainfs figures themselves are exercised by tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import io
import json
import multiprocessing
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from chainfs.bench import compare, runner, smallops, workers
from chainfs.bench import report as rep
from chainfs.bench.ceilings import measure_all
from chainfs.bench.context import CLIENT_PROCS, QUICK, MiB, Result, WorkloadFailed, ratio_to_ceiling
from chainfs.bench.cpu import CpuWindow, cpu_lines, workload_ops
from chainfs.bench.studies import STUDIES
from chainfs.bench.workers import SEGMENT_BYTES, WorkerPool, aggregate, check_stamps, stamp
from chainfs.bench.workloads import FIGURES, REGISTRY, RunContext, Workload, figure, select
from chainfs.cli.bench import bench

POSIX = {"kind": "posix"}


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(CLIENT_PROCS)  # the small-operation parts run in 4 processes
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


def test_every_registered_figure_has_a_unit_and_the_required_names_exist() -> None:
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
        figure(
            "fuse_seq_read", None, ceilings, status="not run: /dev/fuse is missing on this machine"
        ),
        figure("meta_stat", 1234.0, {}),  # no ceiling measured
        figure("rss_client", 50.0, ceilings),
    ]
    assert results[0].ratio == pytest.approx(0.3) and results[0].below_target
    paths, notes = rep.write_reports(_report(results), tmp_path, "2026-01-01-000000")
    assert notes == []
    md = paths["markdown"].read_text()
    assert "**client_seq_read is below target**" in md
    assert "read_ranges_256k meets its target" in md
    assert "fuse_seq_read: not run: /dev/fuse is missing on this machine" in md
    for kind in ("ratios_png", "absolute_png"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(paths["json"].read_text())
    assert [r["name"] for r in doc["results"]] == [r.name for r in results]
    assert doc["results"][2]["value"] is None and doc["results"][3]["ratio"] is None
    # A second report in the same second does not overwrite the first.
    again, _ = rep.write_reports(_report(results), tmp_path, "2026-01-01-000000")
    assert again["json"] != paths["json"]


def test_without_matplotlib_the_json_and_markdown_are_complete_and_say_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def no_matplotlib(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else real(name, *args)

    monkeypatch.setattr(rep.importlib.util, "find_spec", no_matplotlib)
    results = [figure("client_seq_read", 300.0, {"iperf3_loopback_MBps": 1000.0})]
    paths, notes = rep.write_reports(_report(results), tmp_path, "2026-01-01-000000")
    assert sorted(paths) == ["json", "markdown"]
    assert notes == ["no charts: matplotlib is not installed (pip install 'chainfs[bench]')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "2026-01-01-000000.json",
        "2026-01-01-000000.md",
    ]
    md = paths["markdown"].read_text()
    assert "chainfs[bench]" in md and ".png" not in md
    assert "| client_seq_read | 300 |" in md


def _context(pool: WorkerPool) -> RunContext:
    return RunContext(pool=pool, sizes=QUICK, address="", profile="r3", root="/bench",
                      ceilings={"iperf3_loopback_MBps": 1000.0})  # fmt: skip


@pytest.mark.parametrize(
    ("error", "named"),
    [
        (OSError(errno.ENOSYS, "Function not implemented"), "OSError: [Errno 38]"),
        (ImportError("No module named 'chainfs.fuse_mount.mount'"), "ImportError: No module"),
    ],
)
def test_enosys_and_import_errors_fail_the_figure(
    pool: WorkerPool, error: Exception, named: str
) -> None:
    def broken(ctx: RunContext) -> list[Result]:
        raise error

    w = Workload("client_seq_read", ("client_seq_read",), "r3", (), broken, "")
    [r] = runner._run_workload(w, _context(pool), lambda msg: None)
    assert r.status.startswith(f"failed: {named}"), r.status
    assert r.value is None
    bench_run = runner.BenchRun({"results": [r.to_json()], "ceilings_detail": {}}, Path("."))
    assert bench_run.failures == ["client_seq_read"]


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSYS, "Function not implemented"), ImportError("no module x")]
)
def test_a_client_process_reports_enosys_and_import_errors_as_errors(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a client process these once made a figure "not run"; now they fail the task."""

    def broken(env: workers.TaskEnv, params: dict[str, Any]) -> workers.TaskOutput:
        raise error

    monkeypatch.setitem(workers.TASKS, "broken", broken)
    parent, child = multiprocessing.Pipe()
    parent.send(("broken", 1, {}))
    parent.send(None)  # then stop
    sigint = signal.getsignal(signal.SIGINT)
    try:
        workers._worker_main(0, child, {})  # here: it sets SIGINT, which only the main thread may
    finally:
        signal.signal(signal.SIGINT, sigint)
    kind, text = parent.recv()
    assert kind == "error"
    assert text.startswith(f"{type(error).__name__}: ")


def test_a_missing_file_in_a_client_process_fails_the_task_with_its_error(
    pool: WorkerPool, tmp_path: Path
) -> None:
    read = {"backend": POSIX, "paths": [str(tmp_path / "absent")], "sizes": [MiB],
            "block_bytes": MiB, "max_seconds": 5}  # fmt: skip
    with pytest.raises(WorkloadFailed, match="FileNotFoundError"):
        pool.run("seq_read", [read], 60)


def test_default_out_dir_is_named_for_the_run_under_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        runner.default_out_dir("2026-01-01-000000") == tmp_path / "chainfs-bench-2026-01-01-000000"
    )


def _write(path: Path, results: list[Result]) -> Path:
    path.write_text(json.dumps(_report(results)))
    return path


def test_compare_shows_every_figure_and_names_the_ones_that_dropped(tmp_path: Path) -> None:
    ceilings = {"iperf3_loopback_MBps": 1000.0}
    old = _write(tmp_path / "old.json", [
        figure("client_seq_read", 300.0, ceilings),
        figure("meta_stat", 1234.0, {}),
        figure("rss_client", 50.0, ceilings),
    ])  # fmt: skip
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    _write(new_dir / "2026-01-02-000000.json", [
        figure("client_seq_read", 600.0, ceilings),
        figure("meta_stat", None, {}, status="failed: OSError: [Errno 38] ENOSYS"),
    ])  # fmt: skip
    text, dropped = compare.compare(compare.load(old), compare.load(new_dir))
    assert dropped == ["meta_stat", "rss_client"]
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "2.00x" in rows["client_seq_read"] and "0.30" in rows["client_seq_read"]
    assert "NEW failed" in rows["meta_stat"] and "NEW absent" in rows["rss_client"]
    assert "iperf3_loopback_MBps" in rows

    result = CliRunner().invoke(bench, ["compare", str(old), str(new_dir)])
    assert result.exit_code == 1
    assert "meta_stat, rss_client" in result.output
    same = CliRunner().invoke(bench, ["compare", str(old), str(old)])
    assert same.exit_code == 0, same.output
    assert "dropped (ran in OLD, not in NEW): none" in same.output
    _write(new_dir / "2026-01-03-000000.json", [])
    bad = CliRunner().invoke(bench, ["compare", str(old), str(new_dir)])
    assert bad.exit_code == 2 and "expected one report" in bad.output


def test_every_study_is_a_command_whose_function_exists() -> None:
    for study in STUDIES:
        module, function = study.entry.rsplit(".", 1)
        assert callable(
            getattr(importlib.import_module(f"chainfs.bench.studies.{module}"), function)
        )
        result = CliRunner().invoke(bench, [study.name, "--help"])
        assert result.exit_code == 0, result.output
        for opt in study.options:
            assert f"--{opt.name}" in result.output
        assert "--json" in result.output and "--data-dir" in result.output


def test_kv_study_measures_the_memory_backend_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    result = CliRunner().invoke(bench, ["kv", "--backends", "memory", "--seconds", "0.1",
                                        "--concurrency", "1,4", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["concurrency"]) for r in rows] == [("memory", 1), ("memory", 4)]
    assert all(r["txns"] > 0 and r["retries"] >= 0 for r in rows)
    unknown = CliRunner().invoke(bench, ["kv", "--backends", "nope"])
    assert unknown.exit_code == 2 and "unknown backend nope" in unknown.output


# -- small operations, steady state, --compare ---------------------------------------------
def test_a_duration_s_ratio_is_the_ceilings_time_over_ours() -> None:
    assert ratio_to_ceiling(4.0, 1.0, "s") == pytest.approx(0.25)  # 4x slower than local
    assert ratio_to_ceiling(500.0, 1000.0, "files/s") == pytest.approx(0.5)
    assert ratio_to_ceiling(1.0, None, "s") is None and ratio_to_ceiling(None, 1.0, "s") is None
    r = figure("fuse_smallfiles", 2.0, {"local_smallfiles_s": 0.5})
    assert (r.unit, r.ceiling_name, r.ratio) == ("s", "local_smallfiles_s", pytest.approx(0.25))


def test_meta_task_runs_only_the_phases_asked_for(pool: WorkerPool, tmp_path: Path) -> None:
    params = {"backend": POSIX, "root": str(tmp_path), "files": 30, "max_seconds": 60,
              "phases": ["create", "stat", "unlink"]}  # fmt: skip
    outs = pool.run("meta", [params] * 2, 60)
    assert sorted(outs[0]) == ["create", "stat", "unlink"]
    assert [aggregate(outs, p)[1] for p in ("create", "stat", "unlink")] == [60, 60, 60]
    assert not any((tmp_path / "w0").iterdir())


@pytest.mark.timeout(120)
def test_small_parts_on_a_local_directory_count_every_operation(
    pool: WorkerPool, tmp_path: Path
) -> None:
    got = smallops.run_part("fuse_meta", pool, tmp_path, QUICK)
    files = CLIENT_PROCS * QUICK.small_meta_files_per_proc
    assert {k: v[1]["files"] for k, v in got.items()} == dict.fromkeys(
        ("create", "stat", "unlink"), files
    )
    [(rate, how)] = smallops.run_part("fuse_readdir", pool, tmp_path, QUICK).values()
    assert how["listings"] >= 3 and how["entries"] == QUICK.readdir_entries
    assert rate == pytest.approx(how["listings"] * how["entries"] / how["seconds"])
    assert list(tmp_path.iterdir()) == []  # every part cleans up after itself


def test_a_listing_that_misses_an_entry_fails(pool: WorkerPool, tmp_path: Path) -> None:
    base = {"backend": POSIX, "dir": str(tmp_path), "count": 10}
    pool.run("populate", [base] * 2, 60)
    assert len(list(tmp_path.iterdir())) == 10
    (tmp_path / "e0000003").unlink()
    loop = {**base, "min_reps": 3, "min_seconds": 0.0}
    with pytest.raises(WorkloadFailed, match="gave 9 entries, created 10"):
        pool.run("listdir_loop", [loop], 60)


def test_churn_does_at_least_the_operations_asked_and_leaves_nothing(
    pool: WorkerPool, tmp_path: Path
) -> None:
    params = {"backend": POSIX, "root": str(tmp_path), "ops": 90, "batch": 10}
    _, ops, _ = aggregate(pool.run("churn", [params] * 2, 60), "churn")
    assert ops >= 90 and ops % 20 == 0
    assert all(not any(d.iterdir()) for d in tmp_path.iterdir())


def test_the_source_tree_is_the_same_every_run_and_checked_byte_for_byte(tmp_path: Path) -> None:
    tar_a, members = smallops.source_tree_tar(30)
    assert smallops.source_tree_tar(30)[0] == tar_a and len(members) == 30
    with tarfile.open(fileobj=io.BytesIO(tar_a)) as tar:
        tar.extractall(tmp_path, filter="data")
    smallops.check_tree(tmp_path, members)
    victim = tmp_path / next(iter(members))
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    with pytest.raises(WorkloadFailed, match="differ"):
        smallops.check_tree(tmp_path, members)


@pytest.mark.timeout(120)
def test_smallfiles_untars_commits_and_copies(pool: WorkerPool, tmp_path: Path) -> None:
    [(seconds, how)] = smallops.run_part("fuse_smallfiles", pool, tmp_path, QUICK).values()
    skipped = [n for n in ("git", "rsync") if smallops.shutil.which(n) is None]
    assert how["skipped"] == skipped and how["files"] == QUICK.smallfiles_count
    steps = [v for k, v in how.items() if k.endswith("_s")]
    # The steps lie inside the whole; each is reported rounded to 1 ms.
    assert seconds + 0.0005 * len(steps) >= sum(steps)


def test_a_missing_tool_is_skipped_unless_every_tool_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smallops.shutil, "which", lambda name: None)
    monkeypatch.delenv("CHAINFS_REQUIRE_ALL", raising=False)
    assert smallops.tool("git") is None
    monkeypatch.setenv("CHAINFS_REQUIRE_ALL", "1")
    with pytest.raises(WorkloadFailed, match="git not on PATH"):
        smallops.tool("git")


def test_fio_iops_reads_the_side_asked_and_a_job_without_io_fails() -> None:
    job = {"jobname": "j", "read": {"iops": 1234.5, "total_ios": 10}, "write": {"iops": 0.0,
           "total_ios": 0}}  # fmt: skip
    assert smallops.fio_iops(job, "read") == 1234.5
    with pytest.raises(WorkloadFailed, match="no write completed"):
        smallops.fio_iops(job, "write")


def test_mount_only_selects_the_mount_workloads_and_only_their_ceilings() -> None:
    opts = runner.BenchOptions(mount_only=True)
    selected = select(runner.selection(opts))
    assert [w.name for w in selected] == list(smallops.PARTS)
    assert runner.needed_ceilings(selected) == {f.ceiling for f in smallops.SMALL_FIGURES.values()}
    both = runner.selection(runner.BenchOptions(mount_only=True, only=["meta", "fuse_meta"]))
    assert both == [*smallops.PARTS, "meta"]


def test_ceilings_no_selected_figure_needs_are_not_run(pool: WorkerPool, tmp_path: Path) -> None:
    values, detail, _ = measure_all(pool, tmp_path, QUICK, lambda m: None, {"local_stat_per_s"})
    assert values["local_stat_per_s"] and values["local_create_per_s"]  # one group
    assert values["iperf3_loopback_MBps"] is None
    assert detail["iperf3_loopback_MBps"]["status"].startswith("not run: no selected figure")


def test_markdown_shows_fresh_and_steady_and_the_peer_side_by_side(tmp_path: Path) -> None:
    ceilings = {"local_meta_create_per_s": 1000.0, "local_smallfiles_s": 1.0}
    results = [
        figure("meta_create", 500.0, ceilings),
        figure("meta_create_steady", 250.0, ceilings, details={"churn_ops": 100_000}),
        figure("fuse_smallfiles", 4.0, ceilings),
    ]
    report = _report(results)
    report["peer"] = {
        "directory": "/mnt/mfs",
        "filesystem": {"fstype": "fuse.mfs", "device": "mfs#x"},
        "results": [
            figure("fuse_smallfiles", 2.0, ceilings).to_json(),
            figure("fuse_rand_read_4k", 9e5, ceilings, details={"o_direct": False}).to_json(),
        ],
    }
    md = rep.markdown(report, {"json": tmp_path / "x.json"})
    assert "after 100,000 creates and unlinks" in md
    assert "| meta_create | 500 | 250 | 0.50 | ops/s | 0.50 | 0.25 |" in md
    assert "## Side by side with /mnt/mfs (fuse.mfs on mfs#x)" in md
    assert "| fuse_smallfiles | s | 4.00 | 2.00 | 1.00 | 0.25 | 0.50 | 0.50 |" in md
    assert (
        "Without O_DIRECT (the file system refused it: page cache): fuse_rand_read_4k (peer)." in md
    )
    bad = {"status": "failed: x", "name": "fuse_smallfiles"}
    report["peer"]["results"] = [{**report["peer"]["results"][0], **bad}]
    failures = runner.BenchRun(report, tmp_path).failures
    assert failures == ["fuse_smallfiles on /mnt/mfs"]


def test_a_negative_churn_count_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench, ["--quick", "--steady-churn-ops", "-1", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "must be >= 0" in result.output
    assert not (tmp_path / "r").exists()


def test_random_ranges_fit_their_file_and_keep_the_alignment_asked() -> None:
    import random

    rng = random.Random(7)
    files = [("/a", 3 * MiB), ("/b", MiB + 4096)]
    for align in (4096, SEGMENT_BYTES):
        for _ in range(500):
            path, off, n = workers.random_range(rng, files, 256 * 1024, align)
            size = dict(files)[path]
            assert n == 256 * 1024 and off % align == 0 and off + n <= size
    with pytest.raises(WorkloadFailed, match="smaller than one"):
        workers.random_range(rng, [("/tiny", 4096)], 8192)


def test_a_sample_of_the_wrong_length_or_place_fails_the_check() -> None:
    buf = bytearray(2 * SEGMENT_BYTES)
    stamp(buf, len(buf), 0)
    assert workers.check_sample("/f", SEGMENT_BYTES, SEGMENT_BYTES, buf[SEGMENT_BYTES:]) == MiB
    with pytest.raises(workers.DataMismatch, match="expected 4096"):
        workers.check_sample("/f", 0, 4096, buf[:100])
    with pytest.raises(workers.DataMismatch, match="expected"):
        workers.check_sample("/f", 0, SEGMENT_BYTES, buf[SEGMENT_BYTES:])  # bytes of segment 1


def test_without_torch_the_dataloader_figure_is_not_run_and_says_why(
    monkeypatch: pytest.MonkeyPatch, pool: WorkerPool
) -> None:
    from chainfs.bench import workloads

    ctx = RunContext(pool=pool, sizes=QUICK, address="-", profile="r3", root="/x", ceilings={})
    assert workloads.missing_need("torch", ctx) is None  # the torch extra is installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert "torch not installed" in str(workloads.missing_need("torch", ctx))
    w = REGISTRY["dataloader_fork_8w_256k"]
    assert w.needs == ("torch",) and w.results == ("dataloader_fork_8w_256k",)
    assert FIGURES["dataloader_fork_8w_256k"] == FIGURES["usrbio_batch_64x1m"]
    assert FIGURES["usrbio_batch_64x1m"] == ("MB/s", "iperf3_loopback_MBps")


def test_cpu_window_counts_each_process_and_says_which_ended() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(30)"])
    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    try:
        window = CpuWindow.start({"busy": busy.pid, "short": short.pid, "absent": 2**22 + 7})
        short.wait(10)
        time.sleep(0.6)  # the busy one burns its 0.3 s of CPU in here
        got = window.stop(ops=1000)
    finally:
        busy.kill()
        busy.wait()
    assert set(got["cpu_s"]) == {"busy", "short"}  # a pid that never existed is left out
    assert got["cpu_s"]["short"] is None  # it ended inside the window
    assert 0.2 <= got["cpu_s"]["busy"] <= got["wall_s"]
    assert got["total_cpu_s"] == got["cpu_s"]["busy"] and got["ops"] == 1000
    lines = cpu_lines({"meta": got}, cores=2)
    assert "| workload | wall s | CPU s by process (cores) | all | per op (mix) |" in lines
    row = next(line for line in lines if line.startswith("| meta |"))
    assert "busy " in row and "short ended" in row
    assert f"{1e6 * got['total_cpu_s'] / 1000:,.0f} us" in row


def test_workload_ops_counts_only_when_every_figure_counted_its_own() -> None:
    a = figure("meta_create", 10.0, {}, details={"ops": 100})
    b = figure("meta_stat", 20.0, {}, details={"ops": 300})
    assert workload_ops([a, b]) == 400
    assert workload_ops([a, figure("meta_rename", 5.0, {})]) is None
    assert workload_ops([a, figure("meta_stat", None, {}, status="failed: x")]) == 100
    churned = figure("meta_create_steady", 10.0, {}, details={"ops": 100, "churn_ops": 9})
    assert workload_ops([churned]) is None
    assert workload_ops([]) is None


def test_compare_shows_the_cpu_of_workloads_both_runs_measured() -> None:
    def run(meta_s: float, ops: int | None) -> dict[str, Any]:
        meta = {"wall_s": 10.0, "cpu_s": {"meta": meta_s}, "total_cpu_s": meta_s}
        if ops:
            meta["ops"] = ops
        return {"results": [], "cpu": {"meta": meta, "kvcache": {"total_cpu_s": 1.0}}}

    old, new = run(12.0, 10_000), run(9.0, 10_000)
    del new["cpu"]["kvcache"]
    text, _ = compare.compare(old, new)
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert rows["meta"].split()[1:] == ["12.0", "9.00", "0.75x", "1,200", "900"]
    assert "kvcache" not in rows  # measured by one run only
    assert "CPU of workload" not in compare.compare({"results": []}, new)[0]
