"""Fuzz: random, mutated and truncated frames thrown at a data-plane server process.

The server runs in its own process (tests/unit/dataplane/echo_server.py). A
seeded generator (repeatable: the seed is in the test id) mixes garbage,
bit-flipped valid frames, truncations and abrupt closes; after every batch a
well-behaved client must still get byte-identical echoes, and at the end the
server must exit cleanly with no pooled buffer held.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.common.dataplane import DataClient, DataPlaneConfig
from chainfs.common.dataplane.frame import FIXED_HEADER_SIZE, encode_fixed

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_factories=["uvloop"])]

SERVER_MAX_PAYLOAD = 1 << 20  # echo_server.py's bound
SERVER_MAX_HEADER = 64 * 1024


@pytest.fixture
def echo_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    script = Path(__file__).with_name("echo_server.py")
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "echo server did not start"
        yield proc, json.loads(line)["address"]
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by pid
            proc.wait(timeout=10)


def _valid_frame(rng: random.Random) -> bytes:
    header = rng.randbytes(rng.choice([0, 1, 17, 300]))
    payload = rng.randbytes(rng.choice([0, 1, 1000, 70_000]))
    return encode_fixed(0, 1, rng.getrandbits(64), len(header), 0, len(payload)) + header + payload


def _attack(rng: random.Random) -> bytes:
    """Bytes for one hostile connection."""
    kind = rng.randrange(8)
    if kind == 0:  # pure garbage
        return rng.randbytes(rng.randrange(1, 20_000))
    if kind == 1:  # a valid frame with random bytes flipped
        flipped = bytearray(_valid_frame(rng))
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(min(len(flipped), FIXED_HEADER_SIZE + 8))] ^= 1 << rng.randrange(
                8
            )
        return bytes(flipped)
    if kind == 2:  # a valid frame cut short
        frame = _valid_frame(rng)
        return frame[: rng.randrange(len(frame))]
    if kind == 3:  # lengths at and over the bounds, body short
        hl = rng.choice([0, SERVER_MAX_HEADER, SERVER_MAX_HEADER + 1, 2**32 - 1])
        pl = rng.choice([0, SERVER_MAX_PAYLOAD, SERVER_MAX_PAYLOAD + 1, 2**64 - 1])
        return encode_fixed(0, 1, 1, hl, 0, pl) + rng.randbytes(rng.randrange(0, 5000))
    if kind == 4:  # good frames, then garbage in the middle of the stream
        return _valid_frame(rng) + _valid_frame(rng) + rng.randbytes(100) + _valid_frame(rng)
    if kind == 5:  # a response or error frame sent to a server
        return encode_fixed(rng.choice([1, 3]), 1, 1, 0, rng.getrandbits(32), 0)
    if kind == 6:  # a complete request whose sender never reads the reply
        return b"".join(_valid_frame(rng) for _ in range(rng.randrange(1, 20)))
    return b""  # connect and close at once


def _run_attacks(address: str, seed: int, count: int) -> None:
    rng = random.Random(seed)
    host, port = address.rsplit(":", 1)
    for _ in range(count):
        data = _attack(rng)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            pos = 0
            while pos < len(data):  # random splits exercise partial-header parsing
                step = rng.randrange(1, 9000)
                try:
                    sock.sendall(data[pos : pos + step])
                except OSError:
                    break  # the server already closed on us: fine
                pos += step
            if rng.random() < 0.5:  # half-close and drain whatever the server answers
                try:
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass  # the server already closed on us: fine


@pytest.mark.parametrize("seed", [1, 2])
async def test_fuzzed_frames_never_stop_good_clients(
    echo_process: tuple[subprocess.Popen[str], str], seed: int
) -> None:
    import asyncio

    proc, address = echo_process
    client = DataClient(
        DataPlaneConfig(max_payload_bytes=SERVER_MAX_PAYLOAD, buffer_pool_bytes=4 << 20)
    )
    rng = random.Random(seed * 1000)
    try:
        for batch in range(8):
            await asyncio.to_thread(_run_attacks, address, seed * 100 + batch, 150)
            assert proc.poll() is None, "fuzzed server died"
            data = rng.randbytes(rng.randrange(0, SERVER_MAX_PAYLOAD))
            reply = await client.request(address, 1, b"good-%d" % batch, [data], timeout_s=10)
            assert reply.header == b"good-%d" % batch
            assert reply.payload == data
    finally:
        await client.close()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    final = json.loads(proc.stdout.readline())
    assert proc.wait(timeout=20) == 0
    assert final["pool_in_use"] == 0, json.dumps(final)
    assert final["stats"]["bad_frames"] > 0
