"""Small operations on a directory: the mount workloads, their local-disk ceilings
and ``--compare DIR``, all measured by the same code.

The suite is the one the MooseFS peer script runs (``TARGET_DIR=<dir>`` there):
4 processes create, stat and unlink empty files, one lists a directory of
``readdir_entries`` entries again and again, fio does 4 KiB O_DIRECT random
reads and overwrites at iodepth 16; and a developer's small-file task: untar a
generated source tree, ``git init && git add -A && git commit``, ``rsync -a``
it to another directory. Each part takes (client processes, a directory on the
file system measured, sizes) and returns its figures by key, each with details.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chainfs.bench.context import CLIENT_PROCS, Sizes, WorkloadFailed
from chainfs.bench.fio import fio_engine, fio_exe, fio_job
from chainfs.bench.workers import WorkerPool, aggregate

Measured = dict[str, tuple[float, dict[str, Any]]]  # key -> (value, details)
PartFn = Callable[[WorkerPool, Path, Sizes], Measured]
POSIX = {"kind": "posix"}
FIO_IODEPTH = 16
_TOOL_TIMEOUT_S = 300.0  # one git or rsync step of a few hundred files


@dataclass(frozen=True)
class SmallFigure:
    figure: str  # the figure through the chainfs mount (and of the peer with --compare)
    ceiling: str  # the same measurement on a local directory, this run
    unit: str


# key -> its figure; the unit "s" is a duration (shorter is better).
SMALL_FIGURES: dict[str, SmallFigure] = {
    "create": SmallFigure("fuse_create", "local_create_per_s", "files/s"),
    "stat": SmallFigure("fuse_stat", "local_stat_per_s", "files/s"),
    "unlink": SmallFigure("fuse_unlink", "local_unlink_per_s", "files/s"),
    "readdir": SmallFigure("fuse_readdir", "local_readdir_entries_per_s", "entries/s"),
    "rand_read_4k": SmallFigure("fuse_rand_read_4k", "local_rand_read_4k_iops", "IOPS"),
    "rand_write_4k": SmallFigure("fuse_rand_write_4k", "local_rand_write_4k_iops", "IOPS"),
    "smallfiles": SmallFigure("fuse_smallfiles", "local_smallfiles_s", "s"),
}


# -- the parts --------------------------------------------------------------------------
def part_meta(pool: WorkerPool, d: Path, sizes: Sizes) -> Measured:
    """4 processes, each in its own directory: create empty files, stat, unlink them."""
    params = {
        "backend": POSIX,
        "root": str(d),
        "files": sizes.small_meta_files_per_proc,
        "max_seconds": sizes.meta_max_seconds,
        "phases": ["create", "stat", "unlink"],
    }
    outs = pool.run("meta", [params] * CLIENT_PROCS, sizes.task_timeout_s)
    out: Measured = {}
    for key in ("create", "stat", "unlink"):
        _, ops, secs = aggregate(outs, key)
        out[key] = (
            ops / secs,
            {"processes": CLIENT_PROCS, "files": int(ops), "ops": int(ops), "seconds": secs},
        )
    return out


def part_readdir(pool: WorkerPool, d: Path, sizes: Sizes) -> Measured:
    """One process lists a directory of `readdir_entries` files, >= 3 times and >= 3 s.

    The files are made (and removed) by 4 processes, untimed; the time floor is
    ``readdir_min_seconds``."""
    n = sizes.readdir_entries
    base = {"backend": POSIX, "dir": str(d), "count": n}
    pool.run("populate", [base] * CLIENT_PROCS, sizes.task_timeout_s)
    loop = {**base, "min_reps": 3, "min_seconds": sizes.readdir_min_seconds}
    [out] = pool.run("listdir_loop", [loop], sizes.task_timeout_s)
    pool.run("populate", [{**base, "remove": True}] * CLIENT_PROCS, sizes.task_timeout_s)
    _, entries, secs = aggregate([out], "readdir")
    return {"readdir": (entries / secs, {"entries": n, "listings": out["reps"], "seconds": secs})}


def accepts_o_direct(directory: Path) -> bool:
    """Whether files in ``directory`` open and read with O_DIRECT (tmpfs does not)."""
    probe = directory / "o_direct.probe"
    probe.write_bytes(os.urandom(4096))
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.preadv(fd, [buf], 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _fio_rand(rw: str, d: Path, sizes: Sizes) -> tuple[float, dict[str, Any]]:
    exe = fio_exe()
    direct = accepts_o_direct(d)
    runtime = max(1, round(sizes.small_fio_runtime_s))
    args = [f"--name={rw}_4k", f"--filename={d / 'fio-4k.dat'}",
            f"--size={sizes.small_fio_file_bytes}", f"--rw={rw}", "--bs=4k",
            f"--direct={int(direct)}", f"--ioengine={fio_engine(exe)}",
            f"--iodepth={FIO_IODEPTH}", "--time_based", f"--runtime={runtime}",
            "--norandommap", "--randrepeat=0"]  # fmt: skip
    job, cmd = fio_job(exe, args, runtime * 4 + _TOOL_TIMEOUT_S)
    iops = fio_iops(job, "write" if rw == "randwrite" else "read")
    return iops, {"command": cmd, "o_direct": direct, "file_bytes": sizes.small_fio_file_bytes}


def fio_iops(job: dict[str, Any], side: str) -> float:
    """IOPS of one side of a fio job; a job that did no I/O is a failure, not a zero."""
    got = job[side]
    if not got.get("total_ios", got.get("io_bytes", 0)):
        raise WorkloadFailed(f"fio {job.get('jobname')}: no {side} completed")
    return float(got["iops"])


def part_rand_read(pool: WorkerPool, d: Path, sizes: Sizes) -> Measured:
    """fio: 4 KiB random reads, O_DIRECT where the file system takes it, iodepth 16."""
    return {"rand_read_4k": _fio_rand("randread", d, sizes)}


def part_rand_write(pool: WorkerPool, d: Path, sizes: Sizes) -> Measured:
    """fio: 4 KiB random overwrites of a laid-out file, O_DIRECT, iodepth 16."""
    return {"rand_write_4k": _fio_rand("randwrite", d, sizes)}


# -- the small-file task ------------------------------------------------------------------
def source_tree_tar(files: int, seed: int = 1) -> tuple[bytes, dict[str, bytes]]:
    """A tar of ``files`` text files in nested directories (like a source checkout),
    and its members by relative path: the same bytes on every run."""
    rng = random.Random(seed)
    members: dict[str, bytes] = {}
    words = [f"name{i}" for i in range(64)]
    for i in range(files):
        path = f"tree/pkg{i % 12}/sub{i % 5}/mod{i:04d}.py"
        lines = [" ".join(rng.choices(words, k=8)) for _ in range(rng.randint(4, 160))]
        members[path] = ("\n".join(lines) + "\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), members


def tool(name: str) -> str | None:
    """Path of ``name``; None (the step is skipped) unless CHAINFS_REQUIRE_ALL=1 asks for it."""
    path = shutil.which(name)
    if path is None and os.environ.get("CHAINFS_REQUIRE_ALL") == "1":
        raise WorkloadFailed(f"{name} not on PATH (CHAINFS_REQUIRE_ALL=1; bootstrap installs it)")
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    if out.returncode != 0:
        raise WorkloadFailed(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr[-500:]}")


# Commits independent of the user's git configuration (identity, signing, hooks).
_GIT = ["-c", "user.name=chainfs bench", "-c", "user.email=bench@chainfs", "-c",
        "commit.gpgsign=false", "-c", "init.defaultBranch=main", "-c", "safe.directory=*",
        "-c", "core.hooksPath=/dev/null"]  # fmt: skip


def check_tree(root: Path, members: dict[str, bytes]) -> None:
    """Every member under ``root`` with its exact bytes."""
    for rel, data in members.items():
        got = (root / rel).read_bytes()
        if got != data:
            raise WorkloadFailed(f"{root / rel}: {len(got)} bytes differ from the {len(data)} put")


def part_smallfiles(pool: WorkerPool, d: Path, sizes: Sizes) -> Measured:
    """Seconds to untar a source tree, git init/add/commit it, rsync -a it to a sibling.

    Timed from the first byte untarred to the last byte copied; every byte is
    checked afterwards, untimed."""
    tar_bytes, members = source_tree_tar(sizes.smallfiles_count)
    git, rsync = tool("git"), tool("rsync")
    src, copy = d / "src", d / "copy"
    steps: dict[str, float] = {}
    t0 = time.monotonic()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        tar.extractall(src, filter="data")
    steps["untar_s"] = time.monotonic() - t0
    if git is not None:
        t = time.monotonic()
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "bench tree"]):
            _run([git, *_GIT, *args], src)
        steps["git_s"] = time.monotonic() - t
    if rsync is not None:
        t = time.monotonic()
        _run([rsync, "-a", f"{src}/", f"{copy}/"], d)
        steps["rsync_s"] = time.monotonic() - t
    seconds = time.monotonic() - t0
    check_tree(src, members)
    if rsync is not None:
        check_tree(copy, members)
    if git is not None:
        _run([git, *_GIT, "diff", "--quiet", "HEAD"], src)  # the commit holds every file
    shutil.rmtree(src)
    shutil.rmtree(copy, ignore_errors=rsync is None)
    details: dict[str, Any] = {
        "files": len(members),
        "bytes": sum(map(len, members.values())),
        **{k: round(v, 3) for k, v in steps.items()},
        "skipped": [n for n, p in (("git", git), ("rsync", rsync)) if p is None],
    }
    return {"smallfiles": (seconds, details)}


# part name (= workload name) -> (its keys, the function)
PARTS: dict[str, tuple[tuple[str, ...], PartFn]] = {
    "fuse_meta": (("create", "stat", "unlink"), part_meta),
    "fuse_readdir": (("readdir",), part_readdir),
    "fuse_rand_read_4k": (("rand_read_4k",), part_rand_read),
    "fuse_rand_write_4k": (("rand_write_4k",), part_rand_write),
    "fuse_smallfiles": (("smallfiles",), part_smallfiles),
}


def needs_fio(part: str) -> bool:
    return PARTS[part][1] in (part_rand_read, part_rand_write)


def run_part(part: str, pool: WorkerPool, directory: Path, sizes: Sizes) -> Measured:
    """One part in a fresh directory ``directory/part``, removed afterwards."""
    d = directory / part
    d.mkdir(parents=True)
    try:
        return PARTS[part][1](pool, d, sizes)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(d)


def scratch_dir(parent: Path, label: str) -> Path:
    """A new directory for one run of the suite under ``parent`` (a mount or a local dir)."""
    return Path(tempfile.mkdtemp(prefix=f"chainfs-bench-{label}-", dir=parent))
