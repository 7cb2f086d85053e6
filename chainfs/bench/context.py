"""What every part of the benchmark shares: sizes, targets, results, outcomes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from chainfs.common.units import MiB

MB = 1_000_000  # throughput is reported in decimal MB/s, like iperf3 and fio

# Concurrent client processes of the "4 clients" workloads.
CLIENT_PROCS = 4

# The project's targets: a figure's ratio to its ceiling, read off the report and
# never asserted in a test.
TARGETS: dict[str, float] = {
    "client_seq_read": 0.6,
    "client_seq_write_r3": 0.2,
    "fuse_seq_read": 0.25,
    "read_ranges_256k": 0.4,
    "usrbio_batch_64x1m": 0.6,
    "dataloader_fork_8w_256k": 0.5,
}


@dataclass(frozen=True)
class Sizes:
    """How much each measurement does; ``QUICK`` and ``FULL`` below."""

    iperf3_seconds: int  # iperf3 -t takes whole seconds
    fio_file_bytes: int  # the fio test file, in the bench's data directory
    fio_runtime_s: float  # cap of each fio job
    seq_total_bytes: int  # bytes of one sequential test, split over its processes
    seq_max_seconds: float  # cap of one sequential phase (a slow build stays in budget)
    io_block_bytes: int  # request size of sequential I/O (multiple of 1 MiB)
    rand_seconds: float  # duration of each random-read test
    warmup_seconds: float  # untimed lead-in of each timed random-access test (connections, caches)
    read_ranges_batch: int  # samples per read_ranges call
    meta_files_per_proc: int  # files each metadata process creates
    meta_max_seconds: float  # cap of one metadata phase
    meta_readdir_rounds: int  # full listings of its directory per process
    kv_1m_values: int  # 1 MiB values put into the KV cache
    kv_4k_values: int  # 4 KiB values put into the KV cache
    kv_batch_1m: int  # keys per batch_get of 1 MiB values
    kv_batch_4k: int  # keys per batch_get of 4 KiB values
    kv_seconds: float  # duration of each KV cache get test
    kv_put_max_seconds: float  # cap of each put phase (the gets use the keys put by then)
    small_meta_files_per_proc: int  # files each process creates through the mount
    readdir_entries: int  # entries of the directory the mount's readdir test lists
    readdir_min_seconds: float  # that directory is listed at least this long (and 3 times)
    small_fio_file_bytes: int  # the file of the 4 KiB random read/overwrite tests
    small_fio_runtime_s: float  # each of those fio jobs (whole seconds)
    smallfiles_count: int  # files of the source tree untarred, committed and rsynced
    steady_churn_ops: int  # creates + unlinks done before the steady-state metadata figures
    steady_churn_timeout_s: float  # bound of that churn (failed if not done by then)
    dataloader_batch: int  # samples per DataLoader batch (dataloader_fork_8w_256k)
    dataloader_max_samples: int  # bound of that dataset's length (the run stops at its time)
    agent_start_timeout_s: float  # a `chainfs agent` not ready by then fails its workload
    task_timeout_s: float  # a worker task not done by then fails the workload
    cluster_start_timeout_s: float  # LocalCluster start-up bound


# Each size as (--quick, full run). Quick: the whole run < 2 minutes on 2 cores,
# every phase well under a second. Full: < 10 minutes, every phase capped in time.
_SIZES: dict[str, tuple[Any, Any]] = {
    "iperf3_seconds": (1, 5),
    "fio_file_bytes": (64 * MiB, 1024 * MiB),
    "fio_runtime_s": (1.0, 8.0),
    "seq_total_bytes": (32 * MiB, 1024 * MiB),
    "seq_max_seconds": (3.0, 20.0),
    "io_block_bytes": (4 * MiB, 8 * MiB),
    "rand_seconds": (0.5, 6.0),
    "warmup_seconds": (0.2, 1.0),
    "read_ranges_batch": (32, 64),
    "meta_files_per_proc": (25, 2000),
    "meta_max_seconds": (1.5, 10.0),
    "meta_readdir_rounds": (2, 5),
    "kv_1m_values": (8, 128),
    "kv_4k_values": (32, 2000),
    "kv_batch_1m": (8, 16),
    "kv_batch_4k": (32, 64),
    "kv_seconds": (0.5, 6.0),
    "kv_put_max_seconds": (3.0, 12.0),
    "small_meta_files_per_proc": (25, 2000),
    "readdir_entries": (200, 10_000),
    "readdir_min_seconds": (0.2, 3.0),
    "small_fio_file_bytes": (8 * MiB, 256 * MiB),
    "small_fio_runtime_s": (1.0, 10.0),
    "smallfiles_count": (40, 300),
    "steady_churn_ops": (400, 100_000),
    "steady_churn_timeout_s": (60.0, 1800.0),
    "dataloader_batch": (8, 16),
    "dataloader_max_samples": (4000, 400_000),
    "agent_start_timeout_s": (60.0, 60.0),
    "task_timeout_s": (60.0, 180.0),
    "cluster_start_timeout_s": (60.0, 90.0),
}
QUICK = Sizes(**{name: quick for name, (quick, _) in _SIZES.items()})
FULL = Sizes(**{name: full for name, (_, full) in _SIZES.items()})


def sizes_dict(s: Sizes) -> dict[str, Any]:
    return asdict(s)


# The steady-state figures: a metadata figure's name with this suffix.
STEADY_SUFFIX = "_steady"

# Units of durations: a shorter one is better, so their ratio is ceiling / value
# (every ratio reads "fraction of the ceiling's speed").
DURATION_UNITS = frozenset({"s"})


def ratio_to_ceiling(value: float | None, ceiling: float | None, unit: str) -> float | None:
    if value is None or not ceiling:
        return None
    if unit in DURATION_UNITS:
        return ceiling / value if value > 0 else None
    return value / ceiling


@dataclass
class Result:
    """One figure of the report. ``value`` is None unless ``status == "ok"``."""

    name: str
    value: float | None
    unit: str
    ceiling_name: str | None = None
    ceiling: float | None = None
    ratio: float | None = None
    target: float | None = None
    status: str = "ok"  # "ok" | "not run: <reason>" | "failed: <reason>"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def below_target(self) -> bool:
        return self.ratio is not None and self.target is not None and self.ratio < self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "ceiling": self.ceiling,
            "ratio": self.ratio,
            "ceiling_name": self.ceiling_name,
            "target": self.target,
            "status": self.status,
            "details": self.details,
        }


class NotRun(Exception):
    """What a measurement needs is missing on this machine (a tool such as iperf3 or fio)."""


class WorkloadFailed(Exception):
    """The workload ran and broke (error, wrong bytes, timeout): reported as failed."""
