"""`chainfs up`: a whole cluster on this machine, in the foreground, until Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from chainfs.common.errors import ChainfsError

# The sample data set `--sample-data` writes: (path, size in bytes). Sizes hit
# the edge cases of chunking (empty, one byte, several chunks plus a tail).
SAMPLE_FILES: tuple[tuple[str, int], ...] = (
    ("/sample/empty.bin", 0),
    ("/sample/one-byte.bin", 1),
    ("/sample/small.bin", 100_000),
    ("/sample/nested/dir/medium.bin", 5 * 1024 * 1024 + 17),
    ("/sample/large.bin", 32 * 1024 * 1024 + 1),
)
SAMPLE_TEXT = ("/sample/README.txt", "chainfs sample data: written and verified by `chainfs up`.\n")


def _sample_bytes(path: str, size: int) -> bytes:
    """Deterministic pseudo-random content, different per file."""
    seed = hashlib.sha256(path.encode()).digest()
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


def write_sample_data(address: str, echo: bool = True) -> None:
    """Write the sample set through the client, read it back and compare."""
    import chainfs

    with chainfs.connect(address) as fs:
        t0 = time.monotonic()
        total = 0
        for path, size in SAMPLE_FILES:
            fs.mkdir(os.path.dirname(path), parents=True, exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(_sample_bytes(path, size))
            total += size
        with fs.open(SAMPLE_TEXT[0], "w") as tf:
            tf.write(SAMPLE_TEXT[1])
        for path, size in SAMPLE_FILES:
            with fs.open(path, "rb") as f:
                got = f.read()
            if got != _sample_bytes(path, size):
                raise ChainfsError(5, f"sample data read back differs: {path}")
            if fs.stat(path).st_size != size:
                raise ChainfsError(5, f"sample file has the wrong size: {path}")
        with fs.open(SAMPLE_TEXT[0], "r") as tf:
            if tf.read() != SAMPLE_TEXT[1]:
                raise ChainfsError(5, f"sample data read back differs: {SAMPLE_TEXT[0]}")
        dt = time.monotonic() - t0
        if echo:
            click.echo(
                f"sample data: wrote and verified {len(SAMPLE_FILES) + 1} files "
                f"({total / 1e6:.1f} MB) under /sample in {dt:.1f}s"
            )
            for path, size in [*SAMPLE_FILES, (SAMPLE_TEXT[0], len(SAMPLE_TEXT[1]))]:
                click.echo(f"  {path}  {size} bytes")


def _print_status(address: str) -> None:
    """Show `chainfs admin status` (run as the user would run it)."""
    env = dict(os.environ, CHAINFS_ADDRESS=address)
    cmd = [sys.executable, "-m", "chainfs", "admin", "status"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    click.echo(out.stdout.rstrip())
    if out.returncode != 0:
        click.echo(out.stderr.rstrip(), err=True)


@click.command()
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default="/tmp/chainfs-up",
    show_default=True,
    help="Directory for configs, logs, KV store and chunk data (kept between runs).",
)
@click.option("--storage-nodes", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--targets-per-node", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--replicas", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--kv",
    type=click.Choice(["rocksdb", "etcd"]),
    default="rocksdb",
    show_default=True,
    help="Metadata store: embedded RocksDB, or a local etcd process.",
)
@click.option("--mount", "mount", type=click.Path(file_okay=False), default=None)
@click.option(
    "--sample-data", is_flag=True, help="Write a small data set and read it back verified."
)
def up(
    data_dir: str,
    storage_nodes: int,
    targets_per_node: int,
    replicas: int,
    kv: str,
    mount: str | None,
    sample_data: bool,
) -> None:
    """Start mgmtd, meta and storage nodes as separate processes; serve until Ctrl-C."""
    from chainfs.local import LocalCluster

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # SIGTERM/SIGINT while starting or serving: stop cleanly (the `finally` below).
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster: LocalCluster | None = None
    try:
        click.echo(
            f"chainfs up: {storage_nodes} storage nodes x {targets_per_node} targets, "
            f"{replicas} replicas, kv={kv}, data in {data_dir}"
        )
        try:
            cluster = LocalCluster(
                Path(data_dir),
                storage_nodes=storage_nodes,
                targets_per_node=targets_per_node,
                replicas=replicas,
                kv=kv,
                mount=mount,
            )
        except ChainfsError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"address: {cluster.address}")
        click.echo(f"  export CHAINFS_ADDRESS={cluster.address}")
        if cluster.mountpoint is not None:
            click.echo(f"mounted at {cluster.mountpoint}")
        if cluster.status_url:
            click.echo(f"status page: {cluster.status_url}")
        for name, metrics_address in cluster.metrics_addresses().items():
            click.echo(f"  metrics {name}: http://{metrics_address}/metrics")
        _print_status(cluster.address)
        if sample_data and not stop.is_set():
            try:
                write_sample_data(cluster.address)
            except OSError as e:
                raise click.ClickException(f"sample data failed: {e}") from None
        click.echo(f"serving; logs in {data_dir}/*/*.log; Ctrl-C stops the cluster")
        while not stop.is_set():
            stop.wait(0.5)
            dead = cluster.dead_processes()
            if dead:
                raise click.ClickException(f"process(es) exited unexpectedly: {', '.join(dead)}")
        click.echo("stopping...")
    finally:
        if cluster is not None:
            cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)
    click.echo("stopped")
