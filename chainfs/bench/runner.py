"""Run the suite: ceilings, then each cluster profile's workloads, then the report.

Order: start the client processes; measure the ceilings; for each profile
("r3": 3 replicas, the main cluster, optionally with a FUSE mount; "r1": 1
replica) start a LocalCluster (or use ``--address`` for "r3"), run its
workloads in registration order, stop it; then the "end" workloads (client
memory). Every selected figure ends up in the report as a number, "not run:
<reason>" or "failed: <reason>".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chainfs
from chainfs.bench import ceilings as ceil
from chainfs.bench.cluster import suite_cluster
from chainfs.bench.context import (
    CLIENT_PROCS,
    FULL,
    QUICK,
    NotRun,
    Result,
    Sizes,
    WorkloadFailed,
    sizes_dict,
)
from chainfs.bench.cpu import CpuWindow, workload_ops
from chainfs.bench.smallops import PARTS, SMALL_FIGURES, run_part, scratch_dir
from chainfs.bench.workers import WorkerPool
from chainfs.bench.workloads import (
    FIGURES,
    REGISTRY,
    RunContext,
    Workload,
    figure,
    missing_need,
    process_pids,
    select,
)

SCHEMA_VERSION = 1
PROFILE_REPLICAS = {"r3": 3, "r1": 1}
PROFILE_ORDER = ("r3", "r1", "end")

Log = Callable[[str], None]


@dataclass
class BenchOptions:
    address: str | None = None  # a running cluster's mgmtd address instead of a LocalCluster
    quick: bool = False
    out_dir: Path | None = None  # None: ./chainfs-bench-<stamp> in the current directory
    only: list[str] | None = None
    data_dir: Path | None = None  # parent of the run's scratch directory (the disk measured)
    keep_data: bool = False
    profile: bool = False  # py-spy every process during each workload (slows the figures)
    mountpoint: Path | None = None  # with --address: that cluster's FUSE mount, if any
    fuse: bool = True  # mount FUSE on the LocalCluster when this machine can
    storage_nodes: int = 3
    targets_per_node: int = 2
    kv: str = "rocksdb"
    command: str = ""
    compare_dir: Path | None = None  # also run the mount workloads in this directory (a peer)
    mount_only: bool = False  # only the mount workloads (and their ceilings)
    steady_churn_ops: int | None = None  # instead of the mode's steady_churn_ops


@dataclass
class BenchRun:
    report: dict[str, Any]
    out_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the report could not include

    @property
    def failures(self) -> list[str]:
        bad = [r["name"] for r in self.report["results"] if r["status"].startswith("failed")]
        bad += [
            n
            for n, d in self.report["ceilings_detail"].items()
            if str(d.get("status", "")).startswith("failed")
        ]
        peer = self.report.get("peer") or {}
        bad += [
            f"{r['name']} on {peer['directory']}"
            for r in peer.get("results", [])
            if r["status"].startswith("failed")
        ]
        return bad


def default_out_dir(stamp: str) -> Path:
    """Where a run writes without --out: a directory of its own, named for what it is."""
    return Path.cwd() / f"chainfs-bench-{stamp}"


def _git_info() -> dict[str, Any]:
    repo = Path(chainfs.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return {}
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "dirty": bool(dirty)}


def _outcome(w: Workload, status: str, ceilings: dict[str, float | None]) -> list[Result]:
    return [figure(n, None, ceilings, status=status) for n in w.results]


def _run_workload(w: Workload, ctx: RunContext, log: Log) -> list[Result]:
    for need in w.needs:
        why = missing_need(need, ctx)
        if why is not None:
            status = ctx.fuse_reason if need == "fuse" else f"not run: {why}"
            log(f"{w.name}: {status}")
            return _outcome(w, status, ctx.ceilings)
    t0 = time.monotonic()
    pids = process_pids(ctx)
    if ctx.profiler is not None:
        ctx.profiler.start(w.name, pids)
    window = CpuWindow.start(pids)
    results: list[Result] = []
    try:
        results = w.fn(ctx)
    except WorkloadFailed as e:
        log(f"{w.name}: FAILED: {e}")
        return _outcome(w, f"failed: {e}", ctx.ceilings)
    except Exception as e:
        log(f"{w.name}: FAILED: {traceback.format_exc()}")
        return _outcome(w, f"failed: {type(e).__name__}: {e}", ctx.ceilings)
    finally:
        ctx.cpu[w.name] = window.stop(workload_ops(results))
        if ctx.profiler is not None:
            ctx.profiles[w.name] = ctx.profiler.stop()
    got = {r.name for r in results}
    for n in w.results:
        if n not in got:
            results.append(figure(n, None, ctx.ceilings, status="failed: no figure returned"))
    for r in results:
        if r.value is None:
            log(f"{r.name}: {r.status}")
        else:
            ratio = f" = {r.ratio:.2f} of {r.ceiling_name}" if r.ratio is not None else ""
            log(f"{r.name}: {r.value:,.1f} {r.unit}{ratio}")
    log(f"{w.name} done in {time.monotonic() - t0:.1f}s")
    return results


def _release_clients(ctx: RunContext) -> None:
    """Close the client processes' connections before their cluster stops."""
    if not ctx.pool.broken:
        ctx.pool.run("close_backends", [{}] * ctx.pool.size, ctx.sizes.task_timeout_s)


def run(opts: BenchOptions, log: Log) -> BenchRun:
    """Measure everything selected and write the report; returns it with its paths."""
    from chainfs.bench import report as rep

    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    sizes = QUICK if opts.quick else FULL
    if opts.steady_churn_ops is not None:
        if opts.steady_churn_ops < 0:
            raise ValueError(f"--steady-churn-ops {opts.steady_churn_ops}: must be >= 0")
        sizes = dataclasses.replace(sizes, steady_churn_ops=opts.steady_churn_ops)
    selected = select(selection(opts))
    if opts.compare_dir is not None and not opts.compare_dir.is_dir():
        raise ValueError(f"--compare {opts.compare_dir}: not a directory")
    selected_names = {w.name for w in selected}
    stamp = started_at.strftime("%Y-%m-%d-%H%M%S")
    out_dir = default_out_dir(stamp) if opts.out_dir is None else opts.out_dir
    log(f"the report goes to {out_dir}")

    if opts.data_dir is not None:
        opts.data_dir.mkdir(parents=True, exist_ok=True)
    # Short names: storage nodes put a unix socket in their first target directory.
    scratch = Path(tempfile.mkdtemp(prefix="cfsb-", dir=opts.data_dir))
    log(f"scratch directory {scratch} ({'quick' if opts.quick else 'full'} run)")
    results: dict[str, list[Result]] = {}
    warnings: list[str] = []
    peer: dict[str, Any] | None = None
    profiles: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    profiler = None
    if opts.profile:
        from chainfs.bench.profile import Profiler

        profiler = Profiler(out_dir / f"{stamp}-profiles")
    pool = WorkerPool(CLIENT_PROCS)
    try:
        pool.wait_ready(sizes.task_timeout_s)  # their start-up must not disturb the ceilings
        machine = ceil.machine_info(scratch)
        ceilings, ceilings_detail, pool = ceil.measure_all(
            pool, scratch, sizes, log, needed_ceilings(selected)
        )
        if opts.compare_dir is not None:
            peer, pool = _measure_peer(pool, opts.compare_dir, selected, sizes, ceilings, log)
        for profile in PROFILE_ORDER:
            todo = [w for w in selected if w.profile == profile]
            if not todo:
                continue
            ctx = RunContext(
                pool=pool,
                sizes=sizes,
                address=opts.address or "",
                profile=profile,
                root="/bench" if opts.address is None else f"/bench-{stamp}-{os.getpid()}",
                ceilings=ceilings,
                profiler=profiler if profile != "end" else None,
                profiles=profiles,
                cpu=cpu,
            )
            if profile == "end":
                for w in todo:
                    results[w.name] = _run_workload(w, ctx, log)
            elif opts.address is not None:
                _run_on_address(ctx, todo, opts, results, warnings, log)
            else:
                _run_on_local_cluster(ctx, todo, opts, scratch / profile, results, log)
            pool = ctx.pool
    finally:
        t_close = time.monotonic()
        pool.close()
        log(f"client processes stopped in {time.monotonic() - t_close:.1f}s")
        if opts.keep_data:
            log(f"data kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    machine["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    ordered: list[Result] = []
    for w in REGISTRY.values():
        if w.name in selected_names:
            ordered += results.get(w.name, _outcome(w, "failed: did not run", ceilings))
        else:
            ordered += _outcome(w, "not run: not selected (--only)", ceilings)
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "created_utc": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "config": {
            "mode": "quick" if opts.quick else "full",
            "command": opts.command or "chainfs bench " + shlex.join(sys.argv[2:]),
            "address": opts.address,
            "cluster": {
                "started_by_bench": opts.address is None,
                "storage_nodes": opts.storage_nodes if opts.address is None else None,
                "targets_per_node": opts.targets_per_node if opts.address is None else None,
                "replicas": {"r3": 3, "r1": 1} if opts.address is None else "as at --address",
                "kv": opts.kv if opts.address is None else None,
            },
            "client_processes": CLIENT_PROCS,
            "only": selection(opts),
            "compare_dir": str(opts.compare_dir) if opts.compare_dir else None,
            "profiled": opts.profile,
            "sizes": sizes_dict(sizes),
            "chainfs_version": chainfs.__version__,
            "git": _git_info(),
        },
        "ceilings": ceilings,
        "ceilings_detail": ceilings_detail,
        "results": [r.to_json() for r in ordered],
        "warnings": warnings,
    }
    if peer is not None:
        report["peer"] = peer
    report["cpu"] = cpu
    if opts.profile:
        report["profiles"] = profiles
    run_ = BenchRun(report, out_dir)
    t_report = time.monotonic()
    run_.paths, run_.notes = rep.write_reports(report, out_dir, stamp)
    log(f"report written in {time.monotonic() - t_report:.1f}s")
    return run_


def selection(opts: BenchOptions) -> list[str] | None:
    """The workloads ``--only`` and ``--mount-only`` ask for (None: all of them)."""
    if not opts.mount_only:
        return opts.only
    return list(PARTS) + [n for n in opts.only or [] if n not in PARTS]


def needed_ceilings(selected: list[Workload]) -> set[str]:
    """The ceilings the selected workloads' figures are divided by."""
    return {c for w in selected for n in w.results if (c := FIGURES[n][1]) is not None}


def _measure_peer(
    pool: WorkerPool,
    directory: Path,
    selected: list[Workload],
    sizes: Sizes,
    ceilings: dict[str, float | None],
    log: Log,
) -> tuple[dict[str, Any], WorkerPool]:
    """The selected mount workloads in ``directory`` (another file system's mount),
    each figure with the same local ceiling as chainfs's; the pool (fresh if broken)."""
    work = scratch_dir(directory, "peer")
    log(f"--compare: the mount workloads in {work}")
    out: list[Result] = []
    try:
        for part in [w.name for w in selected if w.name in PARTS]:
            names = [SMALL_FIGURES[k].figure for k in PARTS[part][0]]
            try:
                got = run_part(part, pool, work, sizes)
                for key, (value, how) in got.items():
                    out.append(figure(SMALL_FIGURES[key].figure, value, ceilings, details=how))
                    log(f"peer {SMALL_FIGURES[key].figure}: {value:,.1f}")
            except Exception as e:  # any error fails the peer's figure, as it would ours
                status = (
                    f"not run: {e}" if isinstance(e, NotRun) else f"failed: {type(e).__name__}: {e}"
                )
                log(f"peer {part}: {status}")
                out += [figure(n, None, ceilings, status=status) for n in names]
                if pool.broken:
                    pool = WorkerPool(pool.size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peer = {
        "directory": str(directory),
        "filesystem": ceil.filesystem_of(directory),
        "results": [r.to_json() for r in out],
    }
    return peer, pool


def _run_on_local_cluster(
    ctx: RunContext,
    todo: list[Workload],
    opts: BenchOptions,
    base: Path,
    results: dict[str, list[Result]],
    log: Log,
) -> None:
    want_mount = opts.fuse and any("fuse" in w.needs for w in todo)
    t0 = time.monotonic()
    try:
        with suite_cluster(
            base,
            want_mount,
            log,
            storage_nodes=opts.storage_nodes,
            targets_per_node=opts.targets_per_node,
            replicas=PROFILE_REPLICAS[ctx.profile],
            kv=opts.kv,
            start_timeout_s=ctx.sizes.cluster_start_timeout_s,
        ) as (cluster, mnt, fuse_reason):
            log(
                f"cluster {ctx.profile} up in {time.monotonic() - t0:.1f}s at {cluster.address}"
                + (f", mounted on {mnt}" if mnt else "")
            )
            ctx.cluster, ctx.address, ctx.mountpoint = cluster, cluster.address, mnt
            ctx.fuse_reason = fuse_reason
            try:
                for w in todo:
                    results[w.name] = _run_workload(w, ctx, log)
            finally:
                _release_clients(ctx)
    except Exception as e:  # the cluster did not start or stop: every figure says why
        text = str(e).strip() or type(e).__name__
        log(f"cluster {ctx.profile}: FAILED: {text}")
        for w in todo:
            results.setdefault(w.name, _outcome(w, f"failed: cluster: {text}", ctx.ceilings))


def _run_on_address(
    ctx: RunContext,
    todo: list[Workload],
    opts: BenchOptions,
    results: dict[str, list[Result]],
    warnings: list[str],
    log: Log,
) -> None:
    if ctx.profile != "r3":
        for w in todo:
            results[w.name] = _outcome(
                w, "not run: --address: a 1-replica cluster needs a LocalCluster", ctx.ceilings
            )
        return
    ctx.mountpoint = opts.mountpoint
    ctx.fuse_reason = "not run: --address without --mountpoint"
    try:
        for w in todo:
            results[w.name] = _run_workload(w, ctx, log)
    finally:
        cleanup: list[tuple[str, str, list[dict[str, Any]]]] = [
            (f"remove {ctx.root}", "rmtree", [{"backend": ctx.backend, "path": ctx.root}]),
            ("close the client connections", "close_backends", [{}] * ctx.pool.size),
        ]
        for what, task, params in cleanup:
            if what.startswith("remove") and not ctx.made_dirs:
                continue
            try:
                ctx.run(task, params)
            except WorkloadFailed as e:
                warnings.append(f"could not {what} on {ctx.address}: {e}")
                log(f"warning: could not {what}: {e}")
