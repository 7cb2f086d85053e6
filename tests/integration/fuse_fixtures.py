"""A LocalCluster mounted with FUSE, for the test_fuse_* modules.

The mount always goes away at the end, also when a test fails: the cluster's
stop() sends SIGTERM to the mount process (it pushes buffered writes and
unmounts); if our mount point is still mounted after that, `fusermount3 -u`,
then a lazy `fusermount3 -u -z` as the last resort. Only our own mount point
is ever touched.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from chainfs.local import LocalCluster
from chainfs.local.process import MountProcess
from tests.conftest import require

T = TypeVar("T")


def require_fuse() -> None:
    require(
        "fuse",
        os.path.exists("/dev/fuse")
        and importlib.util.find_spec("pyfuse3") is not None
        and shutil.which("fusermount3") is not None,
        "needs /dev/fuse, pyfuse3 and fusermount3 (deploy/bootstrap.sh installs them)",
    )


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f if len(line.split()) > 4)


def force_unmount(path: Path) -> None:
    """Last resort for OUR mount point only: fusermount3 -u, then lazy."""
    for args in (["-u"], ["-u", "-z"]):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", *args, str(path)], capture_output=True, timeout=30)


def mounted_cluster(
    base: Path, options: Sequence[str] = (), **kwargs: object
) -> Iterator[LocalCluster]:
    """Body of a module-scoped fixture: cluster + mount; always unmounted after."""
    require_fuse()
    mnt = base / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        with LocalCluster(
            base / "cluster",
            mount=mnt,
            mount_options=options,
            **kwargs,  # type: ignore[arg-type]
        ) as cluster:
            assert cluster.mountpoint is not None and is_mounted(mnt)
            yield cluster
            os.statvfs(mnt)  # the mount process still answers (a dead one: ENOTCONN)
            dead = cluster.dead_processes()
            assert not dead, f"processes died during the tests: {dead}"
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt), f"{mnt} still mounted after the cluster stopped"


_COUNTS = re.compile(r"fuse requests: (.*?); meta rpcs: (.*?); local answers: (.*)$")


@dataclass
class MountCounts:
    """A mount's request counts since it started (its SIGUSR2 summary)."""

    fuse: collections.Counter[str]
    meta: collections.Counter[str]
    local: collections.Counter[str]

    def __sub__(self, earlier: MountCounts) -> MountCounts:
        return MountCounts(
            self.fuse - earlier.fuse, self.meta - earlier.meta, self.local - earlier.local
        )


def _parse_counts(items: str) -> collections.Counter[str]:
    return collections.Counter({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", items)})


def mount_counts(proc: MountProcess, timeout_s: float = 10.0) -> MountCounts:
    """Ask a mount for its counts (SIGUSR2) and read them from its log."""
    assert proc.pid is not None
    seen = proc.log_path.read_text(errors="replace").count("meta rpcs:")
    os.kill(proc.pid, signal.SIGUSR2)

    def logged() -> str:
        text = proc.log_path.read_text(errors="replace")
        return text if text.count("meta rpcs:") > seen else ""

    text = poll(logged, timeout_s, "the mount's counts in its log", interval_s=0.02)
    line = [ln for ln in text.splitlines() if "meta rpcs:" in ln][-1]
    m = _COUNTS.search(line)
    assert m is not None, line
    return MountCounts(*(_parse_counts(m.group(i)) for i in (1, 2, 3)))


def run(cmd: Sequence[str], cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a command; on failure, fail with its output."""
    out = subprocess.run(
        list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, (
        f"{' '.join(cmd)} exited {out.returncode}\nstdout:\n{out.stdout[-3000:]}\n"
        f"stderr:\n{out.stderr[-3000:]}"
    )
    return out.stdout


def poll(fn: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Call fn until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def tree_digest(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """relative path -> (kind, mode bits, content or link target) of a tree."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, b"")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, p.read_bytes())
    return out
