"""``chainfs bench tls``: sequential client writes and reads with TLS off, then on.

Two LocalClusters in turn, the same shape, one plain and one with
``tls=True``. Storage nodes serve no unix socket here, so every hop (client
to storage, chain forwarding) is TCP in both and TLS is the only difference.
In each: write a file of ``file_mib`` with ``block_mib`` writes, then read it
``passes`` times with ``readinto`` of ``block_mib``, checking the bytes read
against the bytes written. Reported: MB/s of each, the client process's CPU
seconds per GB moved (steadier than MB/s on a busy machine), and TLS/plain ratios.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chainfs.bench.cluster import LocalCluster
from chainfs.bench.context import MB, MiB
from chainfs.bench.studies import Echo
from chainfs.client.config import ClientConfig
from chainfs.client.sync import FileSystem

PATH = "/bench/tls.bin"


def _no_unix_socket(i: int, conf: Any) -> None:
    conf.unix_socket = ""  # every data-plane hop over TCP, so TLS applies to it


def _write(fs: FileSystem, file_mib: int, block: bytes) -> int:
    fs.makedirs("/bench", exist_ok=True)
    with fs.open(PATH, "wb") as f:
        for _ in range(file_mib * MiB // len(block)):
            f.write(block)
    return file_mib * MiB


def _read(fs: FileSystem, passes: int, block: bytes) -> int:
    buf = bytearray(len(block))
    total = 0
    for _ in range(passes):
        with fs.open(PATH, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if (buf if n == len(buf) else buf[:n]) != block[:n]:  # no copy when whole
                    raise AssertionError(f"bytes read differ from bytes written near {total}")
                total += n
    return total


def _timed(name: str, fn: Callable[[], int]) -> dict[str, float]:
    """``fn()`` moves bytes (returns how many): MB/s and client CPU-s per GB."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    moved = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {f"{name}_MBps": moved / wall / MB, f"{name}_client_cpu_s_per_GB": cpu / moved * 1e9}


def _measure(o: dict[str, Any], tls: bool) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="cfsb-tls-", dir=o["data_dir"]) as tmp,
        LocalCluster(
            Path(tmp),
            storage_nodes=o["storage_nodes"],
            targets_per_node=1,
            replicas=o["replicas"],
            configure_storage=_no_unix_socket,
            tls=tls,
        ) as cluster,
    ):
        fs = cluster.client(config=ClientConfig())
        block = bytes(range(256)) * (o["block_mib"] * MiB // 256)
        figures = _timed("write", lambda: _write(fs, o["file_mib"], block))
        figures |= _timed("read", lambda: _read(fs, o["passes"], block))
        fs.close()
    return figures


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    if opts["file_mib"] % opts["block_mib"]:
        raise ValueError("--file-mib must be a multiple of --block-mib")
    plain = _measure(opts, tls=False)
    echo(f"plain: write {plain['write_MBps']:.0f} MB/s, read {plain['read_MBps']:.0f} MB/s")
    tls = _measure(opts, tls=True)
    echo(f"tls:   write {tls['write_MBps']:.0f} MB/s, read {tls['read_MBps']:.0f} MB/s")
    ratios = {k: tls[k] / plain[k] for k in plain}
    echo("| figure | plain | TLS | TLS / plain |")
    echo("|---|---|---|---|")
    for k in plain:
        echo(f"| {k} | {plain[k]:.2f} | {tls[k]:.2f} | {ratios[k]:.2f} |")
    keys = ("file_mib", "block_mib", "passes", "storage_nodes", "replicas")
    return {
        "plain": plain,
        "tls": tls,
        "ratio": ratios,
        "config": {k: opts[k] for k in keys},
    }
