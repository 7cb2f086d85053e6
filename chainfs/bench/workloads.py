"""The chainfs workloads: one registered function per workload.

A workload takes the run context and returns its figures (``Result``). It is
written against the public API only (``chainfs.connect`` in the client
processes, the FUSE mount as plain files, ``LocalCluster`` for process ids),
and lets every error fail it loudly ("failed: <reason>"), ENOSYS and
ImportError included: nothing in chainfs is "not built yet". Only what this
run cannot offer (no FUSE on the machine, servers not ours with --address)
is "not run: <reason>", decided from the workload's ``needs`` before it runs.

Each workload declares the figures it produces (so the report lists them
even when it does not run), the cluster profile it needs ("r3": 3 replicas,
"r1": 1 replica) and what else it needs ("fuse", "local_cluster").
Registration order is run order: writers first, so readers reuse their files.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chainfs.bench.context import (
    CLIENT_PROCS,
    MB,
    STEADY_SUFFIX,
    TARGETS,
    MiB,
    Result,
    Sizes,
    WorkloadFailed,
    ratio_to_ceiling,
)
from chainfs.bench.smallops import PARTS, SMALL_FIGURES, needs_fio, run_part
from chainfs.bench.workers import WorkerPool, aggregate, in_fresh_process, peak_rss_bytes
from chainfs.common.auth.tokens import resolve_token
from chainfs.common.units import KiB

_NET = "iperf3_loopback_MBps"
_IOPS = "fio_rand_read_4k_iops"

# Every figure the suite can report: name -> (unit, ceiling it is divided by).
FIGURES: dict[str, tuple[str, str | None]] = {
    "client_seq_write_r3": ("MB/s", _NET),
    "client_seq_write_r3_4p": ("MB/s", _NET),
    "client_seq_read": ("MB/s", _NET),
    "client_seq_read_4p": ("MB/s", _NET),
    "client_rand_read_4k": ("ops/s", _IOPS),
    "client_rand_read_1m": ("MB/s", _NET),
    "read_ranges_256k": ("MB/s", _NET),
    "read_ranges_64k_1m": ("MB/s", _NET),
    "usrbio_batch_64x1m": ("MB/s", _NET),
    "dataloader_fork_8w_256k": ("MB/s", _NET),
    "fuse_seq_write": ("MB/s", _NET),
    "fuse_seq_write_4p": ("MB/s", _NET),
    "fuse_seq_read": ("MB/s", _NET),
    "fuse_seq_read_4p": ("MB/s", _NET),
    "meta_create": ("ops/s", "local_meta_create_per_s"),
    "meta_stat": ("ops/s", "local_meta_stat_per_s"),
    "meta_readdir": ("entries/s", "local_meta_readdir_entries_per_s"),
    "meta_rename": ("ops/s", "local_meta_rename_per_s"),
    "meta_unlink": ("ops/s", "local_meta_unlink_per_s"),
    "kvcache_put_1m": ("MB/s", _NET),
    "kvcache_batch_get_1m": ("MB/s", _NET),
    "kvcache_batch_get_4k": ("ops/s", _IOPS),
    "kvcache_get_4k": ("ops/s", _IOPS),
    "kvcache_get_4k_first": ("ops/s", _IOPS),
    **{f.figure: (f.unit, f.ceiling) for f in SMALL_FIGURES.values()},
    "kvcache_put_1m_4p": ("MB/s", _NET),
    "kvcache_batch_get_4k_4p": ("ops/s", _IOPS),
    "kvcache_get_4k_4p": ("ops/s", _IOPS),
    **{f"meta_{p}_steady": ("ops/s", f"local_meta_{p}_per_s") for p in ("create", "stat")},
    "meta_readdir_steady": ("entries/s", "local_meta_readdir_entries_per_s"),
    **{f"meta_{p}_steady": ("ops/s", f"local_meta_{p}_per_s") for p in ("rename", "unlink")},
    "rss_peak_mgmtd": ("MiB", None),
    "rss_peak_meta": ("MiB", None),
    "rss_peak_storage_max": ("MiB", None),
    "rss_peak_fuse": ("MiB", None),
    "rss_client": ("MiB", None),
    "client_seq_write_r1": ("MB/s", _NET),
    "client_seq_read_r1": ("MB/s", _NET),
}


@dataclass
class RunContext:
    """What a workload gets: the cluster it runs against and the client processes."""

    pool: WorkerPool
    sizes: Sizes
    address: str
    profile: str  # "r3" | "r1" | "end" (after every cluster is stopped)
    root: str  # this run's directory inside chainfs
    ceilings: dict[str, float | None]
    mountpoint: Path | None = None
    fuse_reason: str = "not run: no FUSE mount"  # why mountpoint is None
    cluster: Any = None  # the LocalCluster, None with --address
    seed: int = 1
    datasets: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    made_dirs: bool = False  # this run created directories in the cluster
    profiler: Any = None  # a profile.Profiler with --profile
    profiles: dict[str, Any] = field(default_factory=dict)  # workload -> process -> summary
    cpu: dict[str, Any] = field(default_factory=dict)  # workload -> cpu.CpuWindow.stop()

    @property
    def backend(self) -> dict[str, Any]:
        # The token the run has now (the started cluster's admin, or the user's):
        # the workers were spawned before the cluster and its token existed.
        return {"kind": "chainfs", "address": self.address, "token": resolve_token() or ""}

    def run(
        self, task: str, params: list[dict[str, Any]], timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        if self.pool.broken:  # an earlier failure killed it: start a fresh one
            self.pool = WorkerPool(self.pool.size)
        return self.pool.run(task, params, timeout_s or self.sizes.task_timeout_s)

    def mkdirs(self, *paths: str) -> None:
        self.made_dirs = True
        self.run("mkdirs", [{"backend": self.backend, "paths": list(paths)}])

    def result(self, name: str, value: float, **details: Any) -> Result:
        """Figure ``name`` (unit and ceiling from FIGURES) with its ratio to the ceiling."""
        return figure(name, value, self.ceilings, details=details)


def figure(
    name: str,
    value: float | None,
    ceilings: dict[str, float | None],
    status: str = "ok",
    details: dict[str, Any] | None = None,
) -> Result:
    unit, ceiling_name = FIGURES[name]
    ceiling = ceilings.get(ceiling_name) if ceiling_name else None
    ratio = ratio_to_ceiling(value, ceiling, unit)
    return Result(
        name=name,
        value=value,
        unit=unit,
        ceiling_name=ceiling_name,
        ceiling=ceiling,
        ratio=ratio,
        target=TARGETS.get(name),
        status=status,
        details=details or {},
    )


@dataclass(frozen=True)
class Workload:
    name: str
    results: tuple[str, ...]
    profile: str
    needs: tuple[str, ...]
    fn: Callable[[RunContext], list[Result]]
    doc: str


REGISTRY: dict[str, Workload] = {}

WorkloadFn = Callable[[RunContext], list[Result]]


def workload(
    name: str,
    results: tuple[str, ...] | None = None,
    profile: str = "r3",
    needs: tuple[str, ...] = (),
) -> Callable[[WorkloadFn], WorkloadFn]:
    """Register a workload under ``name`` (its figures default to ``(name,)``)."""

    def deco(fn: WorkloadFn) -> WorkloadFn:
        assert name not in REGISTRY, f"workload {name} registered twice"
        REGISTRY[name] = Workload(
            name, results or (name,), profile, needs, fn, (fn.__doc__ or "").strip()
        )
        return fn

    return deco


def missing_need(need: str, ctx: RunContext) -> str | None:
    """Why ``need`` is not met in this run, or None."""
    if need == "fuse":
        return None if ctx.mountpoint is not None else ctx.fuse_reason.split(": ", 1)[-1]
    if need == "fio":
        return None if shutil.which("fio") else "fio not on PATH (deploy/bootstrap.sh installs it)"
    if need == "torch":
        found = importlib.util.find_spec("torch") is not None
        return None if found else "torch not installed (the chainfs[torch] extra)"
    if need == "local_cluster":
        return None if ctx.cluster is not None else "--address: servers are not ours to measure"
    raise AssertionError(f"unknown need {need}")


# -- sequential I/O through the client API -------------------------------------------
def _per_proc_bytes(ctx: RunContext, procs: int) -> int:
    return max(MiB, ctx.sizes.seq_total_bytes // procs // MiB * MiB)


def _write_dataset(ctx: RunContext, procs: int, dataset: str) -> list[dict[str, Any]]:
    """``procs`` processes each write one file of ``dataset``; their task outputs."""
    d = f"{ctx.root}/seq"
    ctx.mkdirs(d)
    paths = [f"{d}/{dataset}-{i}.bin" for i in range(procs)]
    params = {
        "backend": ctx.backend,
        "paths": paths,
        "size_bytes": _per_proc_bytes(ctx, procs),
        "block_bytes": ctx.sizes.io_block_bytes,
        "max_seconds": ctx.sizes.seq_max_seconds,
    }
    outs = ctx.run("seq_write", [params] * procs)
    ctx.datasets[dataset] = [(o["path"], int(o["size"])) for o in outs]
    return outs


def _throughput(
    ctx: RunContext, name: str, outs: list[dict[str, Any]], phase: str, **details: Any
) -> Result:
    """Figure ``name`` in MB/s: the bytes of ``phase`` over all processes' wall time."""
    nbytes, _, secs = aggregate(outs, phase)
    return ctx.result(
        name,
        nbytes / MB / secs,
        processes=len(outs),
        bytes=int(nbytes),
        seconds=round(secs, 3),
        **details,
    )


def _seq_write(ctx: RunContext, name: str, procs: int, dataset: str) -> Result:
    outs = _write_dataset(ctx, procs, dataset)
    return _throughput(
        ctx, name, outs, "write", block_bytes=ctx.sizes.io_block_bytes, replicas=ctx.profile
    )


def _dataset(ctx: RunContext, dataset: str, procs: int) -> list[tuple[str, int]]:
    """Files of ``dataset`` (written by the matching write workload, or now, untimed)."""
    if dataset not in ctx.datasets:
        _write_dataset(ctx, procs, dataset)
    files = ctx.datasets[dataset]
    if any(size == 0 for _, size in files):
        raise WorkloadFailed(f"dataset {dataset} has an empty file: {files}")
    return files


def _seq_read(
    ctx: RunContext, name: str, files: list[tuple[str, int]], prefix: str, backend: dict[str, Any]
) -> Result:
    params = {
        "backend": backend,
        "paths": [prefix + p for p, _ in files],
        "sizes": [s for _, s in files],
        "block_bytes": ctx.sizes.io_block_bytes,
        "max_seconds": ctx.sizes.seq_max_seconds,
    }
    outs = ctx.run("seq_read", [params] * len(files))
    return _throughput(
        ctx, name, outs, "read", block_bytes=ctx.sizes.io_block_bytes, replicas=ctx.profile
    )


@workload("client_seq_write_r3")
def client_seq_write_r3(ctx: RunContext) -> list[Result]:
    """One process writes one file sequentially (3 replicas), then closes it."""
    return [_seq_write(ctx, "client_seq_write_r3", 1, "seq1")]


@workload("client_seq_write_r3_4p")
def client_seq_write_r3_4p(ctx: RunContext) -> list[Result]:
    """Four processes each write their own file (3 replicas); aggregate MB/s."""
    return [_seq_write(ctx, "client_seq_write_r3_4p", CLIENT_PROCS, "seq4")]


@workload("client_seq_read")
def client_seq_read(ctx: RunContext) -> list[Result]:
    """One process reads a 3-replica file start to end."""
    return [_seq_read(ctx, "client_seq_read", _dataset(ctx, "seq1", 1), "", ctx.backend)]


@workload("client_seq_read_4p")
def client_seq_read_4p(ctx: RunContext) -> list[Result]:
    """Four processes each read their own 3-replica file; aggregate MB/s."""
    files = _dataset(ctx, "seq4", CLIENT_PROCS)
    return [_seq_read(ctx, "client_seq_read_4p", files, "", ctx.backend)]


# -- random reads ----------------------------------------------------------------
def _rand_read(ctx: RunContext, name: str, io: int) -> Result:
    path, size = _dataset(ctx, "seq1", 1)[0]
    params = {
        "backend": ctx.backend,
        "path": path,
        "size_bytes": size,
        "io_bytes": io,
        "seconds": ctx.sizes.rand_seconds,
        "warmup_seconds": ctx.sizes.warmup_seconds,
        "seed": ctx.seed,
    }
    outs = ctx.run("rand_read", [params] * CLIENT_PROCS)
    nbytes, ops, secs = aggregate(outs, "read")
    common = {"processes": CLIENT_PROCS, "io_bytes": io, "file_bytes": size, "reads": int(ops)}
    if io <= 64 * KiB:
        return ctx.result(name, ops / secs, **common)
    return ctx.result(name, nbytes / MB / secs, reads_per_s=ops / secs, **common)


@workload("client_rand_read_4k")
def client_rand_read_4k(ctx: RunContext) -> list[Result]:
    """Four processes, each one 4 KiB read at a time at random offsets of one file."""
    return [_rand_read(ctx, "client_rand_read_4k", 4 * KiB)]


@workload("client_rand_read_1m")
def client_rand_read_1m(ctx: RunContext) -> list[Result]:
    """Four processes, each one 1 MiB read at a time at random aligned offsets."""
    return [_rand_read(ctx, "client_rand_read_1m", MiB)]


# -- read_ranges: the dataloader pattern -------------------------------------------
def _read_ranges(ctx: RunContext, name: str, lo: int, hi: int) -> Result:
    files = _dataset(ctx, "seq1", 1) + _dataset(ctx, "seq4", CLIENT_PROCS)
    params = {
        "backend": ctx.backend,
        "files": files,
        "sample_min": lo,
        "sample_max": hi,
        "batch": ctx.sizes.read_ranges_batch,
        "seconds": ctx.sizes.rand_seconds,
        "warmup_seconds": ctx.sizes.warmup_seconds,
        "seed": ctx.seed,
    }
    outs = ctx.run("read_ranges", [params])
    nbytes, samples, secs = aggregate(outs, "read")
    return ctx.result(
        name,
        nbytes / MB / secs,
        processes=1,
        batch=ctx.sizes.read_ranges_batch,
        sample_bytes=f"{lo}-{hi}" if lo != hi else lo,
        samples_per_s=samples / secs,
        files=len(files),
    )


@workload("read_ranges_256k")
def read_ranges_256k(ctx: RunContext) -> list[Result]:
    """One process: read_ranges batches of 256 KiB samples at random offsets of 5 files."""
    return [_read_ranges(ctx, "read_ranges_256k", 256 * KiB, 256 * KiB)]


@workload("read_ranges_64k_1m")
def read_ranges_64k_1m(ctx: RunContext) -> list[Result]:
    """One process: read_ranges batches of samples of 64 KiB-1 MiB (uniform)."""
    return [_read_ranges(ctx, "read_ranges_64k_1m", 64 * KiB, MiB)]


# -- shared-memory reads through the I/O agent, and the PyTorch DataLoader ------------
AGENT_WORKERS = 2  # one per core of the 2-core machines the suite is sized for
USRBIO_RANGES = 64
DATALOADER_WORKERS = 8


@workload("usrbio_batch_64x1m")
def usrbio_batch_64x1m(ctx: RunContext) -> list[Result]:
    """One process: batches of 64 random 1 MiB ranges of 4 files read into a registered
    shared buffer through a `chainfs agent` (2 workers) started for this workload."""
    from chainfs.bench.agent import running_agent

    files = _dataset(ctx, "seq4", CLIENT_PROCS)
    with running_agent(ctx.address, AGENT_WORKERS, ctx.sizes.agent_start_timeout_s) as sock:
        params = {
            "socket": sock,
            "files": files,
            "ranges": USRBIO_RANGES,
            "range_bytes": MiB,
            "seconds": ctx.sizes.rand_seconds,
            "warmup_seconds": ctx.sizes.warmup_seconds,
            "seed": ctx.seed,
        }
        outs = ctx.run("usrbio_batch", [params])
    nbytes, batches, secs = aggregate(outs, "read")
    note = f"the agent runs {AGENT_WORKERS} workers (this suite is sized for a 2-core machine)"
    return [
        ctx.result(
            "usrbio_batch_64x1m",
            nbytes / MB / secs,
            processes=1,
            agent_workers=AGENT_WORKERS,
            batch=USRBIO_RANGES,
            range_bytes=MiB,
            batches_per_s=batches / secs,
            files=len(files),
            note=note,
        )
    ]


@workload("dataloader_fork_8w_256k", needs=("torch",))
def dataloader_fork_8w_256k(ctx: RunContext) -> list[Result]:
    """A PyTorch DataLoader (default fork start, 8 workers) over a map-style dataset of
    random 256 KiB samples of 4 files; aggregate MB/s received by the loading process."""
    from chainfs.bench.torchload import run_dataloader

    files = _dataset(ctx, "seq4", CLIENT_PROCS)
    s = ctx.sizes
    params = {
        "sample_bytes": 256 * KiB,
        "batch": s.dataloader_batch,
        "workers": DATALOADER_WORKERS,
        "max_samples": s.dataloader_max_samples,
        "seconds": s.rand_seconds,
        "warmup_seconds": s.warmup_seconds,
        "seed": ctx.seed,
    }
    out = in_fresh_process(
        run_dataloader, ctx.address, files, params, timeout_s=s.task_timeout_s, daemon=False
    )
    nbytes, samples, secs = aggregate([out], "read")
    return [
        ctx.result(
            "dataloader_fork_8w_256k",
            nbytes / MB / secs,
            workers=DATALOADER_WORKERS,
            start_method=out["start_method"],
            batch=s.dataloader_batch,
            sample_bytes=256 * KiB,
            samples_per_s=samples / secs,
            files=len(files),
            note="each DataLoader worker reads through its own chainfs connection (no agent)",
        )
    ]


# -- through the FUSE mount ---------------------------------------------------------
def _fuse_path(ctx: RunContext, path: str) -> str:
    assert ctx.mountpoint is not None
    return str(ctx.mountpoint) + path


def _fuse_write(ctx: RunContext, name: str, procs: int) -> Result:
    d = f"{ctx.root}/fuse"
    ctx.mkdirs(d)
    params = {
        "backend": {"kind": "posix"},
        "paths": [_fuse_path(ctx, f"{d}/w{procs}-{i}.bin") for i in range(procs)],
        "size_bytes": _per_proc_bytes(ctx, procs),
        "block_bytes": ctx.sizes.io_block_bytes,
        "max_seconds": ctx.sizes.seq_max_seconds,
    }
    outs = ctx.run("seq_write", [params] * procs)
    how = f"write() of {ctx.sizes.io_block_bytes} bytes, then fsync (dd conv=fsync)"
    return _throughput(ctx, name, outs, "write", how=how)


@workload("fuse_seq_write", needs=("fuse",))
def fuse_seq_write(ctx: RunContext) -> list[Result]:
    """One process writes a file through the mount, then fsyncs it."""
    return [_fuse_write(ctx, "fuse_seq_write", 1)]


@workload("fuse_seq_write_4p", needs=("fuse",))
def fuse_seq_write_4p(ctx: RunContext) -> list[Result]:
    """Four processes each write a file through the mount, then fsync."""
    return [_fuse_write(ctx, "fuse_seq_write_4p", CLIENT_PROCS)]


@workload("fuse_seq_read", needs=("fuse",))
def fuse_seq_read(ctx: RunContext) -> list[Result]:
    """One process reads, through the mount, a file written with the client API."""
    files = _dataset(ctx, "seq1", 1)
    assert ctx.mountpoint is not None
    return [_seq_read(ctx, "fuse_seq_read", files, str(ctx.mountpoint), {"kind": "posix"})]


@workload("fuse_seq_read_4p", needs=("fuse",))
def fuse_seq_read_4p(ctx: RunContext) -> list[Result]:
    """Four processes each read, through the mount, a file written with the client API."""
    files = _dataset(ctx, "seq4", CLIENT_PROCS)
    assert ctx.mountpoint is not None
    return [_seq_read(ctx, "fuse_seq_read_4p", files, str(ctx.mountpoint), {"kind": "posix"})]


# -- small operations through the mount (the same code measures their ceilings) ----------
def _small_workload(part: str) -> WorkloadFn:
    def fn(ctx: RunContext) -> list[Result]:
        assert ctx.mountpoint is not None
        ctx.mkdirs(ctx.root)
        got = run_part(part, ctx.pool, Path(_fuse_path(ctx, f"{ctx.root}/small")), ctx.sizes)
        return [ctx.result(SMALL_FIGURES[k].figure, v, **how) for k, (v, how) in got.items()]

    fn.__doc__ = PARTS[part][1].__doc__
    return fn


for _part, (_keys, _) in PARTS.items():
    workload(
        _part,
        results=tuple(SMALL_FIGURES[k].figure for k in _keys),
        needs=("fuse", "fio") if needs_fio(_part) else ("fuse",),
    )(_small_workload(_part))


# -- metadata -----------------------------------------------------------------------
META_PHASES = {p: f"meta_{p}" for p in ("create", "stat", "readdir", "rename", "unlink")}


def _meta_figures(ctx: RunContext, d: str, suffix: str = "", **details: Any) -> list[Result]:
    from chainfs.bench.ceilings import meta_params

    ctx.mkdirs(d)
    outs = ctx.run("meta", meta_params(ctx.backend, d, ctx.sizes))
    results = []
    for phase, name in META_PHASES.items():
        _, ops, secs = aggregate(outs, phase)
        results.append(
            ctx.result(
                name + suffix,
                ops / secs,
                processes=CLIENT_PROCS,
                ops=int(ops),
                seconds=secs,
                **details,
            )
        )
    return results


@workload("meta", results=tuple(META_PHASES.values()))
def meta(ctx: RunContext) -> list[Result]:
    """Four processes, each in its own directory: create empty files, stat them, list
    the directory, rename each, unlink each. Same task as the local-directory ceiling."""
    return _meta_figures(ctx, f"{ctx.root}/meta")


# -- KV cache -----------------------------------------------------------------------
KV_RESULTS = (
    "kvcache_put_1m",
    "kvcache_batch_get_1m",
    "kvcache_batch_get_4k",
    "kvcache_get_4k",
    "kvcache_get_4k_first",
)


def _kv_params(ctx: RunContext, d: str, prefix: str, count: int, size: int) -> dict[str, Any]:
    return {
        "backend": ctx.backend,
        "dir": d,
        "seed": ctx.seed,
        "max_seconds": ctx.sizes.kv_put_max_seconds,
        "prefix": prefix,
        "count": count,
        "value_bytes": size,
    }


def _kv_put(ctx: RunContext, params: dict[str, Any], procs: int) -> tuple[float, float, float]:
    """Put ``count`` values from ``procs`` processes; records the keys put in ``params``."""
    outs = ctx.run("kv_put", [params] * procs)
    params["indices"] = [i for o in outs for i in o["indices"]]
    return aggregate(outs, "put")


def _kv_get(
    ctx: RunContext, params: dict[str, Any], batch: int, procs: int
) -> tuple[float, float, float]:
    get = {"seconds": ctx.sizes.kv_seconds, "warmup_seconds": ctx.sizes.warmup_seconds}
    return aggregate(ctx.run("kv_get", [{**params, **get, "batch": batch}] * procs), "get")


@workload("kvcache", results=KV_RESULTS)
def kvcache(ctx: RunContext) -> list[Result]:
    """One process: put 1 MiB and 4 KiB values, then random batch_get and get of
    keys whose locations the handle knows (each read once first, untimed), then
    the first get of each 4 KiB key by a new handle."""
    s = ctx.sizes
    d = f"{ctx.root}/kv"
    ctx.mkdirs(d)
    big = _kv_params(ctx, d, "m", s.kv_1m_values, MiB)
    small = _kv_params(ctx, d, "k", s.kv_4k_values, 4 * KiB)
    out: list[Result] = []
    nbytes, ops, secs = _kv_put(ctx, big, 1)
    out.append(ctx.result("kvcache_put_1m", nbytes / MB / secs, values=int(ops)))
    _, ops, secs = _kv_put(ctx, small, 1)
    put_4k = {"values_put": int(ops), "puts_per_s": ops / secs}

    nbytes, ops, secs = _kv_get(ctx, big, s.kv_batch_1m, 1)
    out.append(
        ctx.result(
            "kvcache_batch_get_1m",
            nbytes / MB / secs,
            batch=s.kv_batch_1m,
            gets_per_s=ops / secs,
            values=len(big["indices"]),
        )
    )
    _, ops, secs = _kv_get(ctx, small, s.kv_batch_4k, 1)
    out.append(ctx.result("kvcache_batch_get_4k", ops / secs, batch=s.kv_batch_4k, **put_4k))
    _, ops, secs = _kv_get(ctx, small, 1, 1)
    out.append(ctx.result("kvcache_get_4k", ops / secs, batch=1, **put_4k))
    first = {"seconds": s.kv_seconds}
    _, ops, secs = aggregate(ctx.run("kv_get_first", [{**small, **first}]), "get")
    out.append(ctx.result("kvcache_get_4k_first", ops / secs, gets=int(ops), **put_4k))
    return out


@workload(
    "kvcache_4p", results=("kvcache_put_1m_4p", "kvcache_batch_get_4k_4p", "kvcache_get_4k_4p")
)
def kvcache_4p(ctx: RunContext) -> list[Result]:
    """Four processes: put 1 MiB values, then batch_get and get random 4 KiB values.

    Each process puts its share of the values; the gets run in all four at once."""
    s, procs = ctx.sizes, CLIENT_PROCS
    d = f"{ctx.root}/kv4p"
    ctx.mkdirs(d)
    big = _kv_params(ctx, d, "m", s.kv_1m_values, MiB)
    small = _kv_params(ctx, d, "k", s.kv_4k_values, 4 * KiB)
    common = {"processes": procs}
    nbytes, ops, secs = _kv_put(ctx, big, procs)
    out = [ctx.result("kvcache_put_1m_4p", nbytes / MB / secs, values=int(ops), **common)]
    _, put_ops, _ = _kv_put(ctx, small, procs)
    _, ops, secs = _kv_get(ctx, small, s.kv_batch_4k, procs)
    out.append(ctx.result("kvcache_batch_get_4k_4p", ops / secs, batch=s.kv_batch_4k, **common))
    _, ops, secs = _kv_get(ctx, small, 1, procs)
    out.append(ctx.result("kvcache_get_4k_4p", ops / secs, batch=1, values=int(put_ops), **common))
    return out


# -- metadata in steady state ------------------------------------------------------------
CHURN_BATCH = 50  # files created, then unlinked, per round of the churn


@workload("meta_steady", results=tuple(n + STEADY_SUFFIX for n in META_PHASES.values()))
def meta_steady(ctx: RunContext) -> list[Result]:
    """The meta figures again, after `steady_churn_ops` creates and unlinks.

    100,000 in a full run, on the same cluster: a namespace that has lived, not
    a fresh one."""
    d = f"{ctx.root}/churn"
    ctx.mkdirs(d)
    params = {
        "backend": ctx.backend,
        "root": d,
        "ops": ctx.sizes.steady_churn_ops,
        "batch": CHURN_BATCH,
    }
    outs = ctx.run("churn", [params] * CLIENT_PROCS, ctx.sizes.steady_churn_timeout_s)
    _, ops, secs = aggregate(outs, "churn")
    churn = {"churn_ops": int(ops), "churn_ops_per_s": round(ops / secs, 1)}
    return _meta_figures(ctx, f"{ctx.root}/meta-steady", STEADY_SUFFIX, **churn)


# -- memory ---------------------------------------------------------------------------
RSS_SERVER_RESULTS = (
    "rss_peak_mgmtd",
    "rss_peak_meta",
    "rss_peak_storage_max",
    "rss_peak_fuse",
)


def process_pids(ctx: RunContext) -> dict[str, int]:
    """name -> pid of every process a workload makes busy: servers we started, clients."""
    pids = _server_pids(ctx.cluster) if ctx.cluster is not None else {}
    pids.update({f"client{i}": pid for i, pid in enumerate(ctx.pool.pids)})
    return pids


def _server_pids(cluster: Any) -> dict[str, int]:
    """name -> pid of the cluster's processes: LocalCluster.pids(), and among our
    children the `chainfs serve` processes it does not list and the FUSE mount."""
    import psutil

    pids = getattr(cluster, "pids", None)
    found: dict[str, int] = dict(pids()) if callable(pids) else {}
    known = set(found.values())
    for child in psutil.Process().children(recursive=True):
        if child.pid in known:
            continue
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "chainfs" not in " ".join(cmd):
            continue
        if "serve" in cmd and cmd.index("serve") + 1 < len(cmd):
            kind = cmd[cmd.index("serve") + 1]
            found[f"{kind}{sum(k.startswith(kind) for k in found)}"] = child.pid
        elif "mount" in cmd:
            found["fuse" if "fuse" not in found else f"fuse{child.pid}"] = child.pid
    return found


@workload("rss_servers", results=RSS_SERVER_RESULTS, needs=("local_cluster",))
def rss_servers(ctx: RunContext) -> list[Result]:
    """Peak RSS (VmHWM) of each server process over the whole 3-replica run; runs last."""
    pids = _server_pids(ctx.cluster)
    peaks = {name: peak_rss_bytes(pid) / MiB for name, pid in pids.items()}
    out: list[Result] = []

    def one(result: str, names: list[str]) -> None:
        if not names:
            why = "not run: no such process in this cluster"
            out.append(figure(result, None, ctx.ceilings, status=why))
            return
        worst = max(names, key=lambda n: peaks[n])
        out.append(
            ctx.result(
                result, peaks[worst], process=worst, each={n: round(peaks[n], 1) for n in names}
            )
        )

    one("rss_peak_mgmtd", [n for n in peaks if n.startswith("mgmtd")])
    one("rss_peak_meta", [n for n in peaks if n.startswith("meta")])
    one("rss_peak_storage_max", [n for n in peaks if n.startswith("storage")])
    one("rss_peak_fuse", [n for n in peaks if "fuse" in n or "mount" in n])
    return out


@workload("rss_client", profile="end", needs=())
def rss_client(ctx: RunContext) -> list[Result]:
    """Peak RSS (VmHWM) of the benchmark's client processes (the largest), at the end."""
    peaks = [peak_rss_bytes(pid) / MiB for pid in ctx.pool.pids]
    if not peaks:
        raise WorkloadFailed("no live client process")
    return [ctx.result("rss_client", max(peaks), each=[round(p, 1) for p in peaks])]


# -- one replica ------------------------------------------------------------------------
@workload("client_seq_write_r1", profile="r1", needs=("local_cluster",))
def client_seq_write_r1(ctx: RunContext) -> list[Result]:
    """As client_seq_write_r3 on a cluster with 1 replica per chain."""
    return [_seq_write(ctx, "client_seq_write_r1", 1, "seq1")]


@workload("client_seq_read_r1", profile="r1", needs=("local_cluster",))
def client_seq_read_r1(ctx: RunContext) -> list[Result]:
    """As client_seq_read on a cluster with 1 replica per chain."""
    return [_seq_read(ctx, "client_seq_read_r1", _dataset(ctx, "seq1", 1), "", ctx.backend)]


def all_result_names() -> list[str]:
    return [r for w in REGISTRY.values() for r in w.results]


def select(only: list[str] | None) -> list[Workload]:
    """Workloads named in ``only`` (by workload or figure name), in run order."""
    if not only:
        return list(REGISTRY.values())
    known = set(REGISTRY) | set(all_result_names())
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(
            f"unknown workload {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return [w for w in REGISTRY.values() if w.name in only or set(w.results) & set(only)]
