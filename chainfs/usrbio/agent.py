"""The per-host I/O agent (`chainfs agent`): starts and watches the worker processes.

The agent listens on its socket only to tell users where its workers listen
(``PATH.0``, ``PATH.1``, ...); users then talk to every worker directly, so
a batch spread over N workers is read by N processes, N event loops and N
GILs. A worker that dies is restarted (users see their connection to it
reset and reconnect on their next call); a worker whose agent dies notices
its pipe close and exits, so nothing is left serving stale sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from chainfs.client.usrbio import wire
from chainfs.client.usrbio.config import AgentConfig
from chainfs.usrbio.worker import worker_main

log = logging.getLogger(__name__)

_SUPERVISE_INTERVAL_S = 0.5  # how often dead workers are looked for
_STOP_TIMEOUT_S = 10.0  # bound on a worker's orderly exit before it is killed
_MAX_SUN_PATH = 107  # bytes of a unix socket path (sun_path less its NUL)


@dataclass
class _Slot:
    index: int
    path: str
    proc: BaseProcess | None = None
    pipe: Connection | None = None


class AgentError(RuntimeError):
    """The agent could not start (socket in use, workers could not reach the cluster)."""


def worker_socket(path: str, index: int) -> str:
    return f"{path}.{index}"


def check_socket_path(path: str, workers: int) -> None:
    """ValueError when the longest worker socket path does not fit a unix socket address."""
    longest = worker_socket(path, workers - 1)
    if len(os.fsencode(longest)) > _MAX_SUN_PATH:
        raise ValueError(f"agent socket path too long for a unix socket: {longest!r}")


def _claim(path: str) -> None:
    """Remove a stale socket file; AgentError when a live agent answers there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return
    except ConnectionRefusedError:
        os.unlink(path)  # left by an agent that died
        return
    finally:
        probe.close()
    raise AgentError(f"another chainfs agent is serving {path}")


class Agent:
    """Owns the workers and the socket that names them."""

    def __init__(self, address: str, path: str, config: AgentConfig) -> None:
        config.validate()
        check_socket_path(path, config.workers)
        self.address = address
        self.path = path
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i, worker_socket(path, i)) for i in range(config.workers)]
        self._server: asyncio.AbstractServer | None = None

    def worker_pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.pid is not None]

    async def start(self) -> None:
        _claim(self.path)
        results = await asyncio.gather(
            *(self._start_worker(s) for s in self._slots), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            raise AgentError(str(failed[0]))
        self._server = await asyncio.start_unix_server(self._hello, path=self.path)

    async def _start_worker(self, slot: _Slot) -> None:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=worker_main,
            args=(slot.index, self.address, slot.path, self.config, theirs),
            name=f"chainfs-agent-worker-{slot.index}",
            daemon=False,
        )
        proc.start()
        theirs.close()
        slot.proc, slot.pipe = proc, ours
        timeout_s = self.config.worker_start_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, ours.poll, timeout_s):
            raise AgentError(f"worker {slot.index} not ready within {timeout_s:g}s")
        try:
            kind, detail = ours.recv()
        except EOFError:
            raise AgentError(f"worker {slot.index} exited while starting") from None
        if kind != "ready":
            raise AgentError(str(detail))
        log.info("worker %d (pid %s) serves %s", slot.index, detail, slot.path)

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer HELLO frames with where the workers listen."""
        try:
            while True:
                n, ftype, tag = wire.HEADER.unpack(await reader.readexactly(wire.HEADER.size))
                if n > self.config.max_frame_bytes or ftype != wire.HELLO:
                    return
                await reader.readexactly(n)
                info = {"workers": [s.path for s in self._slots], "pid": os.getpid()}
                writer.write(wire.frame(wire.HELLO, tag, wire.json_payload(info)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart dead workers until ``stop``; AgentError after too many failed restarts."""
        failures = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _SUPERVISE_INTERVAL_S)
            for slot in self._slots:
                if stop.is_set() or (slot.proc is not None and slot.proc.is_alive()):
                    continue
                code = slot.proc.exitcode if slot.proc is not None else None
                log.warning("worker %d exited (code %s): restarting", slot.index, code)
                self._reap(slot)
                try:
                    await self._start_worker(slot)
                    failures = 0
                except AgentError as e:
                    failures += 1
                    log.error(
                        "restarting worker %d failed (%d in a row): %s", slot.index, failures, e
                    )
                    if failures >= self.config.max_worker_restarts:
                        raise

    def _reap(self, slot: _Slot) -> None:
        if slot.pipe is not None:
            slot.pipe.close()  # the worker sees EOF and stops
            slot.pipe = None
        if slot.proc is not None:
            slot.proc.join(_STOP_TIMEOUT_S)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(_STOP_TIMEOUT_S)
            slot.proc = None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, self._reap, s) for s in self._slots))


async def run_agent(
    address: str,
    path: str,
    config: AgentConfig,
    stop: asyncio.Event,
    on_ready: Callable[[Agent], None] | None = None,
) -> None:
    """Run an agent until ``stop`` is set (the body of `chainfs agent`)."""
    agent = Agent(address, path, config)
    await agent.start()
    try:
        if on_ready is not None:
            on_ready(agent)
        await agent.supervise(stop)
    finally:
        await agent.stop()
