"""Run one FUSE mount in this process until unmounted or signalled.

pyfuse3 3.5 runs on asyncio when ``pyfuse3.asyncio.enable()`` is called
before anything else touches it (trio is its default); we run it on uvloop,
the same loop the client's data plane is built for, so FUSE requests and
chunk I/O share one event loop without thread hops. Its wait for the FUSE
device is replaced by one that keeps the device registered (device_wait).

The mount ends cleanly on SIGTERM/SIGINT (buffered writes are pushed, meta
sessions closed, then the kernel mount is removed) and on `fusermount3 -u`
(the kernel closes the FUSE device; the loop sees it and we clean up).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pyfuse3

from chainfs.client.aio_fs import AsyncFileSystem
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.metrics import NodeMetrics
from chainfs.common.process import write_ready_file
from chainfs.fuse_mount import device_wait, kernel_bridge
from chainfs.fuse_mount.config import MountConfig
from chainfs.fuse_mount.ops import ChainfsOperations

log = logging.getLogger(__name__)

device_wait.enable()

METRICS_HOST = "127.0.0.1"  # the mount's /metrics: this host only (no login yet)
# Bound on pushing buffered writes and closing sessions while unmounting.
SHUTDOWN_TIMEOUT_S = 30.0


def mount_device(mountpoint: str) -> str | None:
    """ "major:minor" of the mount at ``mountpoint`` (from /proc/self/mountinfo).

    Read from mountinfo, never stat(): the FUSE daemon calling stat on its
    own mount before it serves requests would wait on itself. For the same
    reason the path is not resolved (realpath would lstat the mount point):
    give the path as it was mounted.
    """
    target = os.path.normpath(os.path.abspath(mountpoint))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and _unescape(parts[4]) == target:
                found = parts[2]  # the last one listed is the one on top
    return found


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(mountpoint: str | Path) -> bool:
    return mount_device(str(mountpoint)) is not None


def lazy_unmount(mountpoint: str) -> None:
    """Detach a mount whose daemon is gone or cut off (fusermount3 -u -z)."""
    try:
        subprocess.run(
            ["fusermount3", "-u", "-z", mountpoint], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("fusermount3 -u -z %s: %s", mountpoint, e)


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Widen the kernel read-ahead of this mount (its bdi); root only, best effort."""
    dev = mount_device(mountpoint)
    if dev is None or kib <= 0:
        return
    path = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    try:
        path.write_text(str(kib))
    except OSError as e:
        log.info("read-ahead stays at the kernel default (%s: %s)", path, e)
        return
    log.info("read-ahead of %s set to %d KiB", mountpoint, kib)


def dump_tasks() -> None:
    """SIGUSR1: log where every pending request is waiting (diagnosing a stuck mount)."""
    tasks = asyncio.all_tasks()
    lines = [f"{len(tasks)} tasks:"]
    for t in tasks:
        frames = t.get_stack(limit=12)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        lines.append(f"  {t.get_name()}: {where}")
    log.warning("\n".join(lines))


async def serve(mountpoint: str, config: MountConfig, ready_file: str | None = None) -> int:
    """Connect, mount, serve until unmounted or signalled; returns an exit status.

    ``mountpoint`` must be absolute and resolved (see :func:`run`).
    """
    fs = await AsyncFileSystem.connect(config.address, config=config.effective_client_config())
    ops = ChainfsOperations(fs.io, config)
    ops.on_init = lambda: set_read_ahead(mountpoint, config.read_ahead_kb)
    node_metrics = None
    try:
        node_metrics = await NodeMetrics.start(METRICS_HOST, config.metrics_port)
        pyfuse3.init(ops, mountpoint, config.fuse_options())
    except BaseException:
        if node_metrics is not None:
            await node_metrics.stop()
        await fs.close()
        raise
    # Locks and fallocate through the cluster (kept referenced while mounted).
    bridge = kernel_bridge.install(
        ops, max_inflight=config.max_requests, max_background=config.max_background
    )
    loop = asyncio.get_running_loop()
    stopping = False

    def stop(signum: int) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("signal %d: unmounting %s", signum, mountpoint)
        pyfuse3.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    loop.add_signal_handler(signal.SIGUSR2, lambda: log.warning("%s", ops.counters.summary()))
    unmount = True
    # Start-up objects (modules, protobuf descriptors, gRPC) live forever: keep
    # the cyclic GC from rescanning them on every collection.
    gc.freeze()
    try:
        info = {"mountpoint": mountpoint, "address": config.address, **node_metrics.ready_info()}
        write_ready_file(ready_file, info)
        log.info("chainfs %s mounted at %s", config.address, mountpoint)
        await pyfuse3.main(min_tasks=4, max_tasks=config.max_requests)
        # main() also returns when `fusermount3 -u` took the mount away.
        unmount = is_mounted(mountpoint)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        loop.remove_signal_handler(signal.SIGUSR1)
        loop.remove_signal_handler(signal.SIGUSR2)
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await ops.shutdown()
        except Exception:
            log.exception("pushing buffered writes at unmount failed")
        device_wait.close_all()  # off the loop before pyfuse3 closes the device
        pyfuse3.close(unmount=unmount)
        del bridge  # libfuse no longer calls its callbacks
        if unmount and is_mounted(mountpoint):
            # libfuse skips the unmount when the kernel connection was aborted.
            lazy_unmount(mountpoint)
        try:
            await fs.close()
        except Exception:  # unmounting goes on; the failure (e.g. a file not flushed) is logged
            log.exception("closing the cluster connection at unmount failed")
        await node_metrics.stop()
    log.info("unmounted %s", mountpoint)
    return 0


def run(mountpoint: str, config: MountConfig, ready_file: str | None = None) -> int:
    """Blocking entry point of the mount process (uvloop)."""
    import uvloop

    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise ChainfsError(Code.ENOTDIR, "mount point is not a directory", mountpoint)
    if is_mounted(mountpoint):
        raise ChainfsError(Code.EBUSY, "something is mounted there already", mountpoint)
    result: Any = uvloop.run(serve(mountpoint, config, ready_file))
    return int(result)
