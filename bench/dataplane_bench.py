"""Data-plane throughput against iperf3 on loopback, measured in the same run.

    .venv/bin/python bench/dataplane_bench.py [--seconds 3] [--json OUT] [--unix]

One server process (a DataServer) and ONE client process (this one, a
DataClient on uvloop), over 127.0.0.1 TCP (and, with ``--unix``, a unix
socket too):

* read_mem:  the server answers each request with a block from memory;
* read_file: the server answers with ``os.sendfile`` from a file (page cache);
* write:     the client sends a block, the server receives it into a pooled
             buffer and acknowledges;

for block sizes 1, 4 and 64 MiB, 1 and 4 requests in flight. Reads land in
preallocated caller buffers (``payload_sink``, as a storage client reading
into the user's buffer does); ``read_mem_fresh`` lets the transport allocate.
The ceiling: iperf3, one TCP stream on 127.0.0.1 (server started with
``-s -1 -B 127.0.0.1 -p PORT`` and stopped by its pid). Not a test: nothing
is asserted; a Markdown table and the ratios are printed, JSON optionally
written. DESIGN.md: a good framed protocol reaches 3.4-4.4 GB/s here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import uvloop  # noqa: E402

from chainfs.common.dataplane import (  # noqa: E402
    DataClient,
    DataPlaneConfig,
    DataServer,
    FileRegion,
    Request,
    Response,
)

MiB = 1024 * 1024
READ_MEM, READ_FILE, WRITE = 1, 2, 3
_LEN = struct.Struct("<Q")
MAX_BLOCK = 64 * MiB


def _config() -> DataPlaneConfig:
    # DPBENCH_SOCKBUF=<bytes> tries explicit SO_SNDBUF/SO_RCVBUF (tuning experiments).
    sockbuf = int(os.environ.get("DPBENCH_SOCKBUF", "0"))
    return DataPlaneConfig(
        buffer_pool_bytes=512 * MiB,
        buffer_pool_cached_bytes=512 * MiB,
        socket_send_buffer_bytes=sockbuf,
        socket_recv_buffer_bytes=sockbuf,
    )


# -- server process ------------------------------------------------------------------
async def _serve(unix_path: str | None, data_file: str) -> None:
    block = memoryview(os.urandom(MAX_BLOCK))
    fd = os.open(data_file, os.O_RDONLY)

    async def handle(req: Request) -> Response:
        if req.msg_type == WRITE:
            return Response(WRITE, _LEN.pack(len(req.payload)))
        (length,) = _LEN.unpack(req.header)
        if req.msg_type == READ_MEM:
            return Response(READ_MEM, b"", payload=[block[:length]])
        return Response(READ_FILE, b"", file_regions=[FileRegion(fd, 0, length)])

    server = DataServer(handle, unix_path=unix_path, config=_config())
    await server.start()
    print(json.dumps({"address": server.address, "unix": server.unix_address}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()
    os.close(fd)


# -- client side ------------------------------------------------------------------------
def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        t = os.times()
        return t.user + t.system
    c = proc.cpu_times()
    return c.user + c.system


async def _run_case(
    client: DataClient,
    address: str,
    mode: str,
    block: int,
    depth: int,
    seconds: float,
    server: psutil.Process | None = None,
) -> dict[str, Any]:
    dests = [bytearray(block) for _ in range(depth)]
    wbuf = memoryview(os.urandom(block))
    done_bytes = 0
    loop = asyncio.get_running_loop()

    async def worker(i: int) -> None:
        nonlocal done_bytes
        dest = dests[i]
        while loop.time() < end:
            if mode == "write":
                await client.request(address, WRITE, b"", [wbuf])
            elif mode == "read_mem_fresh":
                r = await client.request(address, READ_MEM, _LEN.pack(block))
                assert r.payload_len == block
            else:
                msg = READ_MEM if mode == "read_mem" else READ_FILE
                r = await client.request(
                    address, msg, _LEN.pack(block), payload_sink=lambda t, h: [dest]
                )
                assert r.payload_len == block
            done_bytes += block

    # Warm up (connections, pooled buffers, page cache), then measure.
    end = loop.time() + 0.3
    await asyncio.gather(*(worker(i) for i in range(depth)))
    done_bytes = 0
    cpu0 = _cpu_s(None)
    scpu0 = _cpu_s(server) if server is not None else 0.0
    t0 = loop.time()
    end = t0 + seconds
    await asyncio.gather(*(worker(i) for i in range(depth)))
    elapsed = loop.time() - t0
    cpu = _cpu_s(None) - cpu0
    scpu = _cpu_s(server) - scpu0 if server is not None else None
    gb = done_bytes / 1e9
    return {
        "mode": mode,
        "block_MiB": block // MiB,
        "depth": depth,
        "MBps": done_bytes / elapsed / 1e6,
        "client_cpu": cpu / elapsed,
        # CPU seconds (user + system, the kernel's copies included) per GB moved:
        # robust to other load on the machine, unlike MB/s.
        "client_cpu_s_per_GB": cpu / gb if gb else None,
        "server_cpu_s_per_GB": scpu / gb if gb and scpu is not None else None,
    }


def _iperf3(seconds: float) -> tuple[float | None, str]:
    exe = shutil.which("iperf3")
    if exe is None:
        return None, "iperf3 not on PATH"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [exe, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cmd = [exe, "-c", "127.0.0.1", "-p", str(port), "-t", str(int(max(seconds, 1))), "-J"]
    try:
        deadline = time.monotonic() + 10
        while True:  # the server may not listen yet: retry the client briefly
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
            if out.returncode == 0:
                bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
                return bps / 8 / 1e6, " ".join(cmd)
            if server.poll() is not None or time.monotonic() > deadline:
                return None, f"iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}"
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.terminate()  # our own child, by pid
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


async def _client_main(args: argparse.Namespace, info: dict[str, Any]) -> list[dict[str, Any]]:
    client = DataClient(_config())
    rows: list[dict[str, Any]] = []
    targets = [("tcp", info["address"])]
    if info.get("unix"):
        targets.append(("unix", info["unix"]))
    try:
        for transport, address in targets:
            for mode in ("read_mem", "read_file", "write", "read_mem_fresh"):
                for block_mib, depth in ((1, 4), (4, 1), (4, 4), (64, 1)):
                    if mode == "read_mem_fresh" and (block_mib, depth) != (4, 4):
                        continue
                    row = await _run_case(
                        client, address, mode, block_mib * MiB, depth, args.seconds
                    )
                    row["transport"] = transport
                    rows.append(row)
                    print(
                        f"  {transport:4} {mode:15} {block_mib:3} MiB x{depth}: "
                        f"{row['MBps']:8.0f} MB/s (client CPU {row['client_cpu']:.0%})",
                        flush=True,
                    )
    finally:
        await client.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per case")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--unix", action="store_true", help="also measure a unix socket")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unix-path", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        uvloop.run(_serve(args.unix_path, args.data_file))
        return 0

    with tempfile.TemporaryDirectory(prefix="dpbench-") as tmp:
        data_file = os.path.join(tmp, "blob")
        with open(data_file, "wb") as f:
            f.write(os.urandom(MAX_BLOCK))
        cmd = [sys.executable, __file__, "--serve", "--data-file", data_file]
        if args.unix:
            cmd += ["--unix-path", os.path.join(tmp, "dp.sock")]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            info = json.loads(server.stdout.readline())
            print(f"data plane server pid {server.pid} at {info['address']}", flush=True)
            rows = uvloop.run(_client_main(args, info))
        finally:
            server.send_signal(signal.SIGTERM)  # our own child, by pid
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    iperf_MBps, iperf_cmd = _iperf3(args.seconds)
    print(
        f"\niperf3 (one stream, 127.0.0.1): {iperf_MBps and round(iperf_MBps)} MB/s  [{iperf_cmd}]"
    )
    print("\n| transport | mode | block | in flight | MB/s | x iperf3 | client CPU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['MBps'] / iperf_MBps:.2f}" if iperf_MBps else "n/a"
        r["ratio_to_iperf3"] = r["MBps"] / iperf_MBps if iperf_MBps else None
        print(
            f"| {r['transport']} | {r['mode']} | {r['block_MiB']} MiB | {r['depth']} | "
            f"{r['MBps']:.0f} | {ratio} | {r['client_cpu']:.0%} |"
        )
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "iperf3_MBps": iperf_MBps,
                    "iperf3_command": iperf_cmd,
                    "results": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
