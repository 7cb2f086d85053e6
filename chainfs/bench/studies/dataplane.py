"""``chainfs bench dataplane``: the data-plane transport against iperf3, case by case.

One server process (a DataServer) and ONE client process (this one, a
DataClient on uvloop), over 127.0.0.1 TCP (and, with ``unix``, a unix socket
too):

* read_mem:  the server answers each request with a block from memory;
* read_file: the server answers with ``os.sendfile`` from a file (page cache);
* write:     the client sends a block, the server receives it into a pooled
             buffer and acknowledges;
* small:     4 KiB reads, 64 in flight (requests per second, no ratio);

for block sizes 1, 4 and 64 MiB, 1 and 4 requests in flight. Reads land in
preallocated caller buffers (``payload_sink``, as a storage client reading
into the user's buffer does); ``read_fresh`` lets the transport allocate.

The ceiling is iperf3 (one TCP stream on 127.0.0.1). The machine's speed
drifts within seconds, so iperf3 runs right before every case and each ratio
divides by that neighbouring figure. CPU seconds per GB (user + system, the
kernel's copies included) of each side are reported beside iperf3's own:
those compare efficiency independently of the load.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import struct
import tempfile
from multiprocessing.connection import Connection
from typing import Any

import psutil
import uvloop

from chainfs.bench.ceilings import iperf3_loopback
from chainfs.bench.context import MiB
from chainfs.bench.studies import Echo
from chainfs.common import dataplane as dp

READ_MEM, READ_FILE, WRITE = 1, 2, 3
_LEN = struct.Struct("<Q")
MAX_BLOCK = 64 * MiB
_SERVER_START_TIMEOUT_S = 60.0
_SERVER_STOP_TIMEOUT_S = 10.0
_WARMUP_S = 0.3  # connections, pooled buffers, page cache

# (mode, block bytes, requests in flight) per transport.
_TCP_CASES = [
    *(("read_mem", b, d) for b, d in ((1 * MiB, 4), (4 * MiB, 1), (4 * MiB, 4), (64 * MiB, 1))),
    *(("read_file", b, d) for b, d in ((4 * MiB, 1), (4 * MiB, 4), (64 * MiB, 1))),
    *(("write", b, d) for b, d in ((1 * MiB, 4), (4 * MiB, 1), (4 * MiB, 4), (64 * MiB, 1))),
    *(("read_fresh", b, d) for b, d in ((4 * MiB, 4), (64 * MiB, 1))),
    ("small", 4096, 64),
]
_QUICK_CASES = [("read_mem", 4 * MiB, 4), ("read_file", 4 * MiB, 4), ("write", 4 * MiB, 4)]
_UNIX_CASES = _QUICK_CASES


def _config(sockbuf: int) -> dp.DataPlaneConfig:
    return dp.DataPlaneConfig(
        buffer_pool_bytes=512 * MiB,
        buffer_pool_cached_bytes=512 * MiB,
        socket_send_buffer_bytes=sockbuf,
        socket_recv_buffer_bytes=sockbuf,
    )


# -- server process ------------------------------------------------------------------
async def _serve(unix_path: str | None, data_file: str, sockbuf: int, conn: Connection) -> None:
    block = memoryview(os.urandom(MAX_BLOCK))
    fd = os.open(data_file, os.O_RDONLY)

    async def handle(req: dp.Request) -> dp.Response:
        if req.msg_type == WRITE:
            return dp.Response(WRITE, _LEN.pack(len(req.payload)))
        (length,) = _LEN.unpack(req.header)
        if req.msg_type == READ_MEM:
            return dp.Response(READ_MEM, b"", payload=[block[:length]])
        return dp.Response(READ_FILE, b"", file_regions=[dp.FileRegion(fd, 0, length)])

    server = dp.DataServer(handle, unix_path=unix_path, config=_config(sockbuf))
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    conn.send({"address": server.address, "unix": server.unix_address})
    await stop.wait()
    await server.stop()
    os.close(fd)


def _server_main(unix_path: str | None, data_file: str, sockbuf: int, conn: Connection) -> None:
    uvloop.run(_serve(unix_path, data_file, sockbuf, conn))


# -- client side ------------------------------------------------------------------------
def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        t = os.times()
        return t.user + t.system
    c = proc.cpu_times()
    return c.user + c.system


async def _run_case(
    client: dp.DataClient,
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
    done_requests = 0
    loop = asyncio.get_running_loop()

    async def worker(i: int) -> None:
        nonlocal done_bytes, done_requests
        dest = dests[i]
        while loop.time() < end:
            if mode == "write":
                await client.request(address, WRITE, b"", [wbuf])
            elif mode == "read_fresh":
                r = await client.request(address, READ_MEM, _LEN.pack(block))
                assert r.payload_len == block
            else:
                msg = READ_FILE if mode == "read_file" else READ_MEM
                r = await client.request(
                    address, msg, _LEN.pack(block), payload_sink=lambda t, h: [dest]
                )
                assert r.payload_len == block
            done_bytes += block
            done_requests += 1

    # Warm up (connections, pooled buffers, page cache), then measure.
    end = loop.time() + 0.3
    await asyncio.gather(*(worker(i) for i in range(depth)))
    done_bytes = done_requests = 0
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
        "block_bytes": block,
        "depth": depth,
        "MBps": done_bytes / elapsed / 1e6,
        "requests_per_s": done_requests / elapsed,
        # CPU seconds (user + system, the kernel's copies included) per GB moved:
        # robust to other load on the machine, unlike MB/s.
        "client_cpu_s_per_GB": cpu / gb if gb else None,
        "server_cpu_s_per_GB": scpu / gb if gb and scpu is not None else None,
        "client_cpu_us_per_request": cpu / done_requests * 1e6 if done_requests else None,
        "server_cpu_us_per_request": (
            scpu / done_requests * 1e6 if done_requests and scpu is not None else None
        ),
    }


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


Case = tuple[str, str, str, int, int]  # transport, address, mode, block bytes, in flight


async def _one_case(
    client: dp.DataClient, server: psutil.Process, case: Case, seconds: float
) -> dict[str, Any]:
    """One case, with iperf3 measured right before it: the machine's speed drifts."""
    transport, address, mode, block, depth = case
    mbps, iperf = await asyncio.to_thread(iperf3_loopback, max(1.0, seconds / 2))
    row = await _run_case(
        client, address, "read_mem" if mode == "small" else mode, block, depth, seconds, server
    )
    row.update(mode=mode, transport=transport, iperf3_MBps=mbps, iperf3=iperf)
    row["ratio_to_iperf3"] = row["MBps"] / mbps
    # CPU efficiency against iperf3's (both ends, kernel included): roughly the
    # ratio a machine with idle cores would show.
    ours = (row["client_cpu_s_per_GB"] or 0) + (row["server_cpu_s_per_GB"] or 0)
    theirs = iperf.get("sender_cpu_s_per_GB", 0) + iperf.get("receiver_cpu_s_per_GB", 0)
    row["cpu_efficiency_vs_iperf3"] = theirs / ours if ours else None
    return row


async def _client_main(opts: dict[str, Any], info: dict[str, Any], echo: Echo) -> list[Any]:
    client = dp.DataClient(_config(opts["sockbuf"]))
    server = psutil.Process(info["pid"])
    cases = _QUICK_CASES if opts["quick"] else _TCP_CASES
    plan: list[Case] = [("tcp", info["address"], *c) for c in cases]
    if info.get("unix"):
        plan += [("unix", info["unix"], *c) for c in _UNIX_CASES]
    rows: list[dict[str, Any]] = []
    try:
        for case in plan:
            row = await _one_case(client, server, case, opts["seconds"])
            rows.append(row)
            echo(
                f"  {row['transport']:4} {row['mode']:10} {_size(row['block_bytes']):>7} "
                f"x{row['depth']:<2}: {row['MBps']:7.0f} MB/s {row['requests_per_s']:8.0f} "
                f"req/s | iperf3 {row['iperf3_MBps']:6.0f} MB/s | "
                f"ratio {row['ratio_to_iperf3']:.2f}"
            )
    finally:
        await client.close()
    return rows


def _measure(opts: dict[str, Any], tmp: str, echo: Echo) -> list[dict[str, Any]]:
    data_file = os.path.join(tmp, "blob")
    with open(data_file, "wb") as f:
        f.write(os.urandom(MAX_BLOCK))
    unix_path = os.path.join(tmp, "dp.sock") if opts["unix"] else None
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    server = ctx.Process(
        target=_server_main, args=(unix_path, data_file, opts["sockbuf"], child_end), daemon=True
    )
    server.start()
    child_end.close()
    try:
        if not parent_end.poll(_SERVER_START_TIMEOUT_S):
            raise RuntimeError(f"data plane server not up after {_SERVER_START_TIMEOUT_S}s")
        info = {**parent_end.recv(), "pid": server.pid}
        echo(f"data plane server pid {server.pid} at {info['address']}")
        return uvloop.run(_client_main(opts, info, echo))
    finally:
        server.terminate()  # our own child, by its handle
        server.join(_SERVER_STOP_TIMEOUT_S)
        if server.is_alive():
            server.kill()
            server.join()


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| transport | mode | block | in flight | MB/s | req/s | iperf3 MB/s (just before) "
        "| ratio | client CPU s/GB | server CPU s/GB | CPU efficiency vs iperf3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['transport']} | {r['mode']} | {_size(r['block_bytes'])} | {r['depth']} | "
            f"{r['MBps']:.0f} | {r['requests_per_s']:.0f} | {r['iperf3_MBps']:.0f} | "
            f"{r['ratio_to_iperf3']:.2f} | {_fmt(r['client_cpu_s_per_GB'], '.2f')} | "
            f"{_fmt(r['server_cpu_s_per_GB'], '.2f')} | "
            f"{_fmt(r['cpu_efficiency_vs_iperf3'], '.2f')} |"
        )
    big = [r for r in rows if r["mode"] != "small"]
    if big:
        best = max(big, key=lambda r: r["ratio_to_iperf3"])
        med = sorted(r["ratio_to_iperf3"] for r in big)[len(big) // 2]
        effs = sorted(r["cpu_efficiency_vs_iperf3"] or 0.0 for r in big)
        out.append(
            f"throughput ratio to iperf3: median {med:.2f}, best {best['ratio_to_iperf3']:.2f} "
            f"({best['transport']} {best['mode']} {_size(best['block_bytes'])} "
            f"x{best['depth']}); CPU efficiency vs iperf3: median {effs[len(effs) // 2]:.2f}"
        )
    return out


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dpbench-", dir=opts["data_dir"]) as tmp:
        rows = _measure(opts, tmp, echo)
    load1 = os.getloadavg()
    echo(f"load average (1 min) before/after: {load0[0]:.1f} / {load1[0]:.1f}")
    for line in _summary(rows):
        echo(line)
    return {"loadavg_before_after": [load0, load1], "results": rows}
