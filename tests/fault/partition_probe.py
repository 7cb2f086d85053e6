"""A client holding stale routing that keeps reading one chunk from one storage node.

Run inside the partitioned node's network namespace by test_partition.py
(``ip netns exec NS python -m tests.fault.partition_probe ...``): it is the
client on the node's side of the partition, which can still reach the node
after the node lost mgmtd and its peers. Every answer is appended to ``--out``
as one JSON line: ``t0``/``t1`` (CLOCK_MONOTONIC, shared with the test across
network namespaces) and either ``sha256`` of the bytes returned or ``code``
(chainfs error code) or ``error`` (anything else). Stops when ``--stop-file``
exists or after ``--max-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from chainfs.common.auth.secret import load_secret, node_credential
from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError
from chainfs.proto import storage_pb2 as sp


async def read_once(dc: DataClient, args: argparse.Namespace) -> dict[str, Any]:
    req = sp.BatchReadReq(
        ios=[
            sp.ReadIO(
                chain_id=args.chain,
                target_id=args.target,
                chunk=sp.ChunkId(inode=args.inode, index=0),
                offset=0,
                length=args.length,
            )
        ]
    )
    got: list[memoryview] = []

    def sink(_t: int, header: bytes) -> list[memoryview]:
        # Called only when the reply carries payload (an io that returned bytes).
        got.append(memoryview(bytearray(sp.BatchReadRsp.FromString(header).results[0].length)))
        return got

    try:
        reply = await dc.request(
            args.address,
            sp.BATCH_READ,
            req.SerializeToString(),
            payload_sink=sink,
            timeout_s=args.timeout_s,
        )
    except ChainfsError as e:
        return {"code": int(e.code)}
    except Exception as e:
        return {"error": repr(e)}
    rsp = sp.BatchReadRsp.FromString(reply.header)
    code = rsp.status.code or rsp.results[0].status.code
    if code:
        return {"code": code}
    return {"sha256": hashlib.sha256(got[0] if got else b"").hexdigest()}


async def main(args: argparse.Namespace) -> None:
    stop = Path(args.stop_file)
    deadline = time.monotonic() + args.max_s
    # Reads straight from a target are a node's (StorageControl-style) access.
    dc = DataClient(credential=node_credential(load_secret(args.secret_file), args.node_id))
    try:
        # Blocking file calls in this one-task loop are a few bytes each: harmless.
        with open(args.out, "a") as out:  # noqa: ASYNC230
            while not stop.exists() and time.monotonic() < deadline:  # noqa: ASYNC240
                t0 = time.monotonic()
                answer = await read_once(dc, args)
                answer.update(t0=t0, t1=time.monotonic())
                out.write(json.dumps(answer) + "\n")
                out.flush()
                await asyncio.sleep(args.interval_s)
    finally:
        await dc.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", required=True, help="the node's data-plane host:port")
    p.add_argument("--chain", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--inode", type=int, required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--secret-file", required=True, help="the cluster secret (LocalCluster's)")
    p.add_argument("--node-id", type=int, required=True, help="read with this node's credential")
    p.add_argument("--out", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--interval-s", type=float, default=0.02)
    p.add_argument("--timeout-s", type=float, default=2.0)
    p.add_argument("--max-s", type=float, default=150.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
