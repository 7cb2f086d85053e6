"""`chainfs up`: a whole cluster on this machine, in the foreground, until Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from chainfs.cli.options import require_extra
from chainfs.common import tls as tls_mod
from chainfs.common.errors import ChainfsError
from chainfs.local.private import make_private_dir, write_private_text

if TYPE_CHECKING:
    from chainfs.client.sync import FileSystem
    from chainfs.local import LocalCluster

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


_SAMPLE_PIECE_BYTES = 1 << 20  # written and read in pieces so the progress line moves


def write_sample_data(address: str, echo: bool = True, token: str | None = None) -> None:
    """Write the sample set through the client, read it back and compare."""
    import chainfs
    from chainfs.cli.progress import byte_progress

    total = sum(size for _, size in SAMPLE_FILES)
    with chainfs.connect(address, token=token) as fs, byte_progress(transient=not echo) as progress:
        t0 = time.monotonic()
        task = progress.add_task("sample data", total=2 * total, detail="writing")
        for path, size in SAMPLE_FILES:
            fs.mkdir(os.path.dirname(path), parents=True, exist_ok=True)
            data = memoryview(_sample_bytes(path, size))
            with fs.open(path, "wb") as f:
                for at in range(0, size, _SAMPLE_PIECE_BYTES):
                    piece = data[at : at + _SAMPLE_PIECE_BYTES]
                    f.write(piece)
                    progress.advance(task, len(piece))
        with fs.open(SAMPLE_TEXT[0], "w") as tf:
            tf.write(SAMPLE_TEXT[1])
        progress.update(task, detail="verifying")
        for path, size in SAMPLE_FILES:
            _verify_sample(fs, path, size, lambda n: progress.advance(task, n))
        with fs.open(SAMPLE_TEXT[0], "r") as tf:
            if tf.read() != SAMPLE_TEXT[1]:
                raise ChainfsError(5, f"sample data read back differs: {SAMPLE_TEXT[0]}")
        progress.update(task, detail="verified")
    dt = time.monotonic() - t0
    if echo:
        click.echo(
            f"sample data: wrote and verified {len(SAMPLE_FILES) + 1} files "
            f"({total / 1e6:.1f} MB) under /sample in {dt:.1f}s"
        )
        for path, size in [*SAMPLE_FILES, (SAMPLE_TEXT[0], len(SAMPLE_TEXT[1]))]:
            click.echo(f"  {path}  {size} bytes")


def _verify_sample(fs: FileSystem, path: str, size: int, advance: Callable[[int], None]) -> None:
    """Read ``path`` back piece by piece and compare with what was written."""
    want = memoryview(_sample_bytes(path, size))
    if fs.stat(path).st_size != size:
        raise ChainfsError(5, f"sample file has the wrong size: {path}")
    with fs.open(path, "rb") as f:
        for at in range(0, size, _SAMPLE_PIECE_BYTES):
            piece = f.read(_SAMPLE_PIECE_BYTES)
            if piece != want[at : at + _SAMPLE_PIECE_BYTES]:
                raise ChainfsError(5, f"sample data read back differs: {path} at {at}")
            advance(len(piece))
        if f.read(1):
            raise ChainfsError(5, f"sample file longer than written: {path}")


def _print_status(address: str, tls_env: dict[str, str], token_file: Path) -> None:
    """Show `chainfs admin status` (run as the user would run it)."""
    env = dict(os.environ, CHAINFS_ADDRESS=address, CHAINFS_TOKEN_FILE=str(token_file), **tls_env)
    env.pop("CHAINFS_TOKEN", None)
    cmd = [sys.executable, "-m", "chainfs", "admin", "status"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    click.echo(out.stdout.rstrip())
    if out.returncode != 0:
        click.echo(out.stderr.rstrip(), err=True)


PORTS_FILE = "ports.json"  # in --data: the ports a cluster had, reused by the next `up`


def saved_ports(data_dir: Path) -> dict[str, int]:
    """The ports the last `chainfs up` on ``data_dir`` bound ({} for a new directory)."""
    path = data_dir / PORTS_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise click.ClickException(f"{path}: not JSON ({e}); remove it to pick new ports") from None
    if not isinstance(saved, dict) or not all(isinstance(v, int) for v in saved.values()):
        raise click.ClickException(f"{path}: expected {{name: port}}; remove it to pick new ports")
    return saved


def save_ports(data_dir: Path, address: str) -> None:
    """Remember the mgmtd port (the cluster address) for the next start on ``data_dir``."""
    port = int(address.rsplit(":", 1)[1])
    tmp = data_dir / f"{PORTS_FILE}.tmp"
    write_private_text(tmp, json.dumps({"mgmtd": port}) + "\n")
    tmp.replace(data_dir / PORTS_FILE)


def _mgmtd_port(data_dir: Path, port: int | None) -> int:
    """--port, else the port this data directory had, else 0 (a free one, then saved)."""
    saved = saved_ports(data_dir).get("mgmtd")
    if port is not None and saved and port != saved:
        click.echo(f"note: the cluster address moves from port {saved} to {port} (--port)")
    return port if port is not None else saved or 0


def _mount_options(options: tuple[str, ...]) -> list[str]:
    """`-o a,b -o c` -> ["a", "b", "c"]."""
    return [o.strip() for group in options for o in group.split(",") if o.strip()]


@click.command()
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default="/tmp/chainfs-up",
    show_default=True,
    help="Directory for configs, logs, KV store and chunk data (kept between runs).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="mgmtd port, the cluster address (default: the one this --data had, else a free one).",
)
@click.option("--storage-nodes", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--targets-per-node", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--replicas", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--kv",
    type=click.Choice(["rocksdb", "etcd", "postgresql"]),
    default="rocksdb",
    show_default=True,
    help="Metadata store: embedded RocksDB, a local etcd, or a local PostgreSQL server.",
)
@click.option(
    "--metas",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Meta server processes. More than one needs a store they can share "
    "(--kv etcd or postgresql); clients spread over them and fail over between them.",
)
@click.option("--mount", "mount", type=click.Path(file_okay=False), default=None)
@click.option(
    "-o",
    "mount_options",
    multiple=True,
    metavar="OPT[,OPT]",
    help="Options of the --mount (as `chainfs mount -o`), e.g. allow_other.",
)
@click.option(
    "--sample-data", is_flag=True, help="Write a small data set and read it back verified."
)
@click.option(
    "--tls",
    is_flag=True,
    help="TLS on every TCP connection: a CA and per-process certificates in DATA/tls.",
)
def up(
    data_dir: str,
    port: int | None,
    storage_nodes: int,
    targets_per_node: int,
    replicas: int,
    kv: str,
    metas: int,
    mount: str | None,
    mount_options: tuple[str, ...],
    sample_data: bool,
    tls: bool,
) -> None:
    """Start mgmtd, meta and storage nodes as separate processes; serve until Ctrl-C.

    The cluster address stays the same across restarts on the same --data."""
    if mount_options and mount is None:
        raise click.UsageError("-o gives options of the mount: use it with --mount")
    if metas > 1 and kv == "rocksdb":
        # Checked before anything is created: an embedded RocksDB is one process's.
        raise click.UsageError(
            f"--metas {metas}: meta servers share the store, and RocksDB is embedded in "
            "one process; use --kv etcd or --kv postgresql"
        )
    require_extra("server", "chainfs up")
    if mount is not None:
        require_extra("fuse", "chainfs up --mount")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # SIGTERM/SIGINT while starting or serving: stop cleanly (the `finally` below).
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster: LocalCluster | None = None
    try:
        click.echo(
            f"chainfs up: {storage_nodes} storage nodes x {targets_per_node} targets, "
            f"{replicas} replicas, kv={kv}, {metas} meta server{'s' if metas > 1 else ''}, "
            f"data in {data_dir}"
        )
        cluster = _start(
            Path(data_dir),
            _mgmtd_port(Path(data_dir), port),
            storage_nodes=storage_nodes,
            targets_per_node=targets_per_node,
            replicas=replicas,
            kv=kv,
            metas=metas,
            mount=mount,
            mount_options=_mount_options(mount_options),
            tls=tls,
        )
        _serve(cluster, data_dir, sample_data, stop)
    finally:
        if cluster is not None:
            cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)
    click.echo("stopped")


def _start(data_dir: Path, port: int, **options: Any) -> LocalCluster:
    from chainfs.local import LocalCluster

    make_private_dir(data_dir)
    try:
        cluster = LocalCluster(data_dir, mgmtd_ports=[port], **options)
    except ChainfsError as e:
        raise click.ClickException(str(e)) from None
    save_ports(data_dir, cluster.address)
    return cluster


def _serve(cluster: LocalCluster, data_dir: str, sample_data: bool, stop: threading.Event) -> None:
    """Print where the cluster is, write the sample data, then watch until ``stop``."""
    click.echo(f"address: {cluster.address}")
    click.echo(f"  export CHAINFS_ADDRESS={cluster.address}")
    if cluster.tls is not None:
        # This process writes the sample data as a user of its cluster would.
        tls_mod.configure_process(tls_mod.TlsConfig(ca_file=cluster.tls.ca_file))
        click.echo(f"  export {tls_mod.CA_FILE_ENV}={cluster.tls.ca_file}")
        click.echo("  # admin tools (gRPC wants a certificate) also:")
        click.echo(f"  export {tls_mod.CERT_FILE_ENV}={cluster.tls.cert_file}")
        click.echo(f"  export {tls_mod.KEY_FILE_ENV}={cluster.tls.key_file}")
    click.echo(f"admin token (user admin, uid 0): {cluster.admin_token_file}")
    click.echo(f"  export CHAINFS_TOKEN_FILE={cluster.admin_token_file}")
    if cluster.mountpoint is not None:
        click.echo(f"mounted at {cluster.mountpoint}")
    if cluster.status_url:
        click.echo(f"status page: {cluster.status_url}")
    for name, metrics_address in cluster.metrics_addresses().items():
        click.echo(f"  metrics {name}: http://{metrics_address}/metrics")
    _print_status(cluster.address, cluster.tls_env(admin=True), cluster.admin_token_file)
    if sample_data and not stop.is_set():
        try:
            write_sample_data(cluster.address, token=cluster.admin_token)
        except OSError as e:
            raise click.ClickException(f"sample data failed: {e}") from None
    click.echo(f"serving; logs in {data_dir}/*/*.log; Ctrl-C stops the cluster")
    while not stop.is_set():
        stop.wait(0.5)
        dead = cluster.dead_processes()
        if dead:
            raise click.ClickException(f"process(es) exited unexpectedly: {', '.join(dead)}")
    click.echo("stopping...")
