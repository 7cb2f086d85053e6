"""Ceilings: what this machine does without chainfs, measured in the same run.

- loopback TCP: ``iperf3`` server and client on 127.0.0.1 (one stream);
- disk: ``fio`` with direct I/O on a file in the bench's data directory (the
  disk the cluster's targets use): sequential read and write with 1 MiB
  blocks, random 4 KiB reads, and 4 KiB writes each followed by fdatasync
  (what a durable KV commit costs);
- metadata: the same create/stat/readdir/rename/unlink task the chainfs
  workload runs, in as many processes, on a local directory;
- small operations: the mount workloads (``chainfs.bench.smallops``) run on a
  local directory of the data disk.

Each ceiling is a number (or None) plus a detail entry with the command and
a status: "ok", "not run: <reason>" (tool missing) or "failed: <reason>".
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from chainfs.bench.context import CLIENT_PROCS, MB, NotRun, Sizes, WorkloadFailed
from chainfs.bench.fio import fio_engine, fio_exe, fio_job, json_out
from chainfs.bench.report import fmt
from chainfs.bench.workers import WorkerPool, aggregate

# The ceilings every report carries (the JSON shape is stable: None if not measured).
CEILING_NAMES = (
    "iperf3_loopback_MBps",
    "fio_seq_read_MBps",
    "fio_seq_write_MBps",
    "fio_rand_read_4k_iops",
    "fio_fdatasync_4k_iops",
    "local_meta_create_per_s",
    "local_meta_stat_per_s",
    "local_meta_readdir_entries_per_s",
    "local_meta_rename_per_s",
    "local_meta_unlink_per_s",
    "local_create_per_s",
    "local_stat_per_s",
    "local_unlink_per_s",
    "local_readdir_entries_per_s",
    "local_rand_read_4k_iops",
    "local_rand_write_4k_iops",
    "local_smallfiles_s",
)

_IPERF3_CONNECT_TIMEOUT_S = 10.0  # the server has this long to start listening
_PROC_STOP_TIMEOUT_S = 5.0
_DIRECT_FILES_KEPT = 64  # per writer: the disk sees new files, the directory stays small

Log = Callable[[str], None]


# -- the machine -----------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def filesystem_of(path: Path) -> dict[str, Any]:
    path = path.resolve()
    best: Any = None
    for part in psutil.disk_partitions(all=True):
        mp = Path(part.mountpoint)
        if (path == mp or mp in path.parents) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    if best is None:
        return {}
    usage = shutil.disk_usage(path)
    return {
        "mountpoint": best.mountpoint,
        "device": best.device,
        "fstype": best.fstype,
        "free_bytes": usage.free,
    }


def machine_info(data_dir: Path) -> dict[str, Any]:
    mem = psutil.virtual_memory().total
    return {
        "cores": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_bytes": mem,
        "memory_GiB": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "data_dir_filesystem": filesystem_of(data_dir),
        # Other load on the machine makes every figure noisy: say how much there was.
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }


# -- helpers ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_PROC_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- iperf3 ------------------------------------------------------------------------
def measure_iperf3(seconds: int) -> tuple[dict[str, float | None], dict[str, Any]]:
    """One TCP stream over loopback for ``seconds``; MB/s received."""
    exe = shutil.which("iperf3")
    if exe is None:
        raise NotRun("iperf3 not on PATH (deploy/bootstrap.sh installs it)")
    last_error = ""
    for _attempt in range(3):  # another process may take the free port first
        port = _free_port()
        server_cmd = [exe, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)]
        client_cmd = [exe, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
        server = subprocess.Popen(
            server_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            deadline = time.monotonic() + _IPERF3_CONNECT_TIMEOUT_S
            while True:
                client = subprocess.run(
                    client_cmd, capture_output=True, text=True, timeout=seconds + 30
                )
                doc = json_out(client.stdout) if "{" in client.stdout else {}
                error = str(doc.get("error", "")) or client.stderr.strip()
                if client.returncode == 0 and not doc.get("error"):
                    break
                last_error = error or f"exit code {client.returncode}"
                if server.poll() is not None:
                    break  # the server could not bind: try another port
                if "refused" in last_error and time.monotonic() < deadline:
                    time.sleep(0.05)  # the server is not listening yet
                    continue
                raise WorkloadFailed(f"iperf3 client: {last_error}")
            if client.returncode != 0 or doc.get("error"):
                continue
        finally:
            _stop(server)
        mbps = float(doc["end"]["sum_received"]["bits_per_second"]) / 8 / MB
        cpu = doc["end"].get("cpu_utilization_percent", {})
        detail: dict[str, Any] = {
            "status": "ok",
            "command": " ".join(server_cmd) + " & " + " ".join(client_cmd),
            "seconds": seconds,
            "cpu_host_percent": cpu.get("host_total"),
            "cpu_remote_percent": cpu.get("remote_total"),
        }
        # CPU seconds (user + system) per GB moved by each end: efficiency, robust to load.
        for side, key in (("sender", "host_total"), ("receiver", "remote_total")):
            if cpu.get(key) is not None and mbps > 0:
                detail[f"{side}_cpu_s_per_GB"] = cpu[key] / 100 / (mbps / 1000)
        return {"iperf3_loopback_MBps": mbps}, {"iperf3_loopback_MBps": detail}
    raise WorkloadFailed(f"iperf3 did not run: {last_error}")


def iperf3_loopback(seconds: float) -> tuple[float, dict[str, Any]]:
    """MB/s of one loopback TCP stream and how it was measured (the studies' ceiling)."""
    values, detail = measure_iperf3(max(1, round(seconds)))
    mbps = values["iperf3_loopback_MBps"]
    assert mbps is not None
    return mbps, detail["iperf3_loopback_MBps"]


# -- fio ---------------------------------------------------------------------------
def measure_fio(
    data_dir: Path, file_bytes: int, runtime_s: float
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Direct I/O on a file in ``data_dir``: the disk under the cluster's targets."""
    exe = fio_exe()
    engine = fio_engine(exe)
    path = data_dir / "fio-ceiling.dat"
    runtime = f"--runtime={max(1, round(runtime_s))}"
    timeout_s = runtime_s * 4 + 120
    file = [f"--filename={path}", f"--size={file_bytes}"]
    direct = [*file, "--direct=1", f"--ioengine={engine}"]
    # (ceiling, fio job, side of fio's result, metric); the sequential write
    # comes first: it also lays out the file the reads use.
    jobs = [
        ("fio_seq_write_MBps", ["--name=seq_write", *direct, "--rw=write", "--bs=1M",
                                "--iodepth=16", "--end_fsync=1"], "write", "bw"),
        ("fio_seq_read_MBps", ["--name=seq_read", *direct, "--rw=read", "--bs=1M",
                               "--iodepth=16"], "read", "bw"),
        ("fio_rand_read_4k_iops", ["--name=rand_read_4k", *direct, "--rw=randread", "--bs=4k",
                                   "--iodepth=32", "--time_based"], "read", "iops"),
        # Buffered 4 KiB writes, each made durable: the cost of one synced commit.
        ("fio_fdatasync_4k_iops", ["--name=fdatasync_4k", *file, "--ioengine=sync",
                                   "--rw=write", "--bs=4k", "--fdatasync=1", "--time_based"],
         "write", "iops"),
    ]  # fmt: skip
    values: dict[str, float | None] = {}
    detail: dict[str, Any] = {}
    try:
        for name, args, side, metric in jobs:
            job, cmd = fio_job(exe, [*args, runtime], timeout_s)
            got = job[side]
            values[name] = got["bw_bytes"] / MB if metric == "bw" else float(got["iops"])
            detail[name] = {"status": "ok", "command": cmd}
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return values, detail


def measure_direct_chunk_writes(
    data_dir: Path, chunk_bytes: int, seconds: float, writers: int = 3
) -> float:
    """MB/s of ``writers`` threads each writing new chunk-sized files with O_DIRECT, as
    storage nodes write chunks (one writer per replica): the replicated-write disk ceiling."""
    buf = mmap.mmap(-1, chunk_bytes)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(chunk_bytes))
    total = [0] * writers
    stop_at = time.monotonic() + seconds

    def writer(w: int) -> None:
        k = 0
        while time.monotonic() < stop_at:
            fd = os.open(
                data_dir / f"direct-{w}-{k}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644
            )
            try:
                total[w] += os.pwrite(fd, buf, 0)
            finally:
                os.close(fd)
            if k >= _DIRECT_FILES_KEPT:
                (data_dir / f"direct-{w}-{k - _DIRECT_FILES_KEPT}").unlink()
            k += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(total) / (time.perf_counter() - t0) / MB


# -- local directory metadata -------------------------------------------------------
LOCAL_META_PHASES = {
    "create": "local_meta_create_per_s",
    "stat": "local_meta_stat_per_s",
    "readdir": "local_meta_readdir_entries_per_s",
    "rename": "local_meta_rename_per_s",
    "unlink": "local_meta_unlink_per_s",
}


def meta_params(
    backend: dict[str, Any], root: str, sizes: Sizes, procs: int = CLIENT_PROCS
) -> list[dict[str, Any]]:
    """The params of the metadata task; chainfs and local directory run the same."""
    return [
        {
            "backend": backend,
            "root": root,
            "files": sizes.meta_files_per_proc,
            "max_seconds": sizes.meta_max_seconds,
            "readdir_rounds": sizes.meta_readdir_rounds,
        }
    ] * procs


def measure_local_meta(
    pool: WorkerPool, data_dir: Path, sizes: Sizes
) -> tuple[dict[str, float | None], dict[str, Any]]:
    root = data_dir / "local-meta"
    root.mkdir()
    try:
        params = meta_params({"kind": "posix"}, str(root), sizes, pool.size)
        outs = pool.run("meta", params, sizes.task_timeout_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    values: dict[str, float | None] = {}
    detail: dict[str, Any] = {}
    for phase, name in LOCAL_META_PHASES.items():
        _, ops, secs = aggregate(outs, phase)
        values[name] = ops / secs
        detail[name] = {
            "status": "ok",
            "command": f"{pool.size} processes, {phase} of up to {sizes.meta_files_per_proc} "
            f"empty files each in its own directory under {data_dir}",
            "ops": ops,
            "seconds": secs,
        }
    return values, detail


# -- the mount workloads on a local directory ----------------------------------------
def measure_local_small(
    part: str, pool: WorkerPool, *, data_dir: Path, sizes: Sizes
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """One part of the small-operation suite on a directory of the data disk."""
    from chainfs.bench import smallops

    got = smallops.run_part(part, pool, data_dir / "local-small", sizes)
    doc = (smallops.PARTS[part][1].__doc__ or part).splitlines()[0]
    values: dict[str, float | None] = {}
    detail: dict[str, Any] = {}
    for key, (value, how) in got.items():
        name = smallops.SMALL_FIGURES[key].ceiling
        values[name] = value
        detail[name] = {"status": "ok", "command": f"{doc} (in {data_dir})", **how}
    return values, detail


Measurement = Callable[[WorkerPool], tuple[dict[str, Any], dict[str, Any]]]
Group = tuple[str, tuple[str, ...], Measurement]


def _groups(data_dir: Path, sizes: Sizes) -> list[Group]:
    """(label, ceilings, how to measure them with the client processes)."""
    from chainfs.bench.smallops import PARTS, SMALL_FIGURES

    groups: list[Group] = [
        ("iperf3", ("iperf3_loopback_MBps",), lambda _: measure_iperf3(sizes.iperf3_seconds)),
        (
            "fio",
            (
                "fio_seq_write_MBps",
                "fio_seq_read_MBps",
                "fio_rand_read_4k_iops",
                "fio_fdatasync_4k_iops",
            ),
            lambda _: measure_fio(data_dir, sizes.fio_file_bytes, sizes.fio_runtime_s),
        ),
        (
            "local metadata",
            tuple(LOCAL_META_PHASES.values()),
            lambda pool: measure_local_meta(pool, data_dir, sizes),
        ),
    ]
    for part, (keys, _) in PARTS.items():
        names = tuple(SMALL_FIGURES[k].ceiling for k in keys)
        groups.append(
            (
                f"local {part}",
                names,
                partial(measure_local_small, part, data_dir=data_dir, sizes=sizes),
            )
        )
    return groups


# -- all of them -------------------------------------------------------------------
def measure_all(
    pool: WorkerPool,
    data_dir: Path,
    sizes: Sizes,
    log: Log,
    needed: set[str] | None = None,
) -> tuple[dict[str, float | None], dict[str, Any], WorkerPool]:
    """Every ceiling in ``needed`` (None: all); a missing tool gives None and "not
    run", never an invented value. Returns the pool too: a failure inside it
    replaces it with a fresh one.
    """
    values: dict[str, float | None] = dict.fromkeys(CEILING_NAMES)
    detail: dict[str, Any] = {}
    for label, names, fn in _groups(data_dir, sizes):
        if needed is not None and not set(names) & needed:
            for n in names:
                detail[n] = {"status": "not run: no selected figure is divided by it"}
            continue
        t0 = time.monotonic()
        try:
            got, det = fn(pool)
            values.update(got)
            detail.update(det)
            shown = ", ".join(f"{k}={fmt(v)}" for k, v in got.items() if v is not None)
            log(f"ceiling {label}: {shown} ({time.monotonic() - t0:.1f}s)")
        except NotRun as e:
            for n in names:
                detail[n] = {"status": f"not run: {e}"}
            log(f"ceiling {label}: not run: {e}")
        except (WorkloadFailed, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
            for n in names:
                detail[n] = {"status": f"failed: {e}"}
            log(f"ceiling {label}: FAILED: {e}")
            if pool.broken:
                pool = WorkerPool(pool.size)
    return values, detail, pool
