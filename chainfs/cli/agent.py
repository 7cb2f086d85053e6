"""`chainfs agent --address A [--socket PATH] [--workers N]`: shared-memory I/O agent."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import click

from chainfs.cli.options import token_options
from chainfs.client.config import ADDRESS_ENV
from chainfs.client.usrbio.config import AgentConfig, default_socket_path
from chainfs.common.process import run_service, write_ready_file


@click.command()
@token_options
@click.option(
    "--address", envvar=ADDRESS_ENV, required=True, help="mgmtd address (host:port[,...])"
)
@click.option(
    "--socket",
    "socket_path",
    default=None,
    help="unix socket to serve (default: $CHAINFS_AGENT_SOCKET or a per-user runtime path)",
)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="worker processes")
@click.option("--ready-file", default=None, help="write {pid, socket, workers} here once serving")
def agent(
    address: str, socket_path: str | None, workers: int | None, ready_file: str | None
) -> None:
    """Serve this host's processes: they register shared memory and submit batches
    of reads, the agent's workers read from storage straight into that memory."""
    from chainfs.usrbio.agent import Agent, AgentError, run_agent

    logging.basicConfig(level=logging.INFO, format="agent: %(message)s")
    config = AgentConfig()
    if workers is not None:
        config = dataclasses.replace(config, workers=workers)
    path = socket_path or default_socket_path()

    def ready(a: Agent) -> None:
        write_ready_file(ready_file, {"socket": path, "workers": a.worker_pids()})
        click.echo(f"chainfs agent serving {path} with {config.workers} workers", err=True)

    async def main(stop: asyncio.Event) -> None:
        await run_agent(address, path, config, stop, ready)

    try:
        run_service(main)
    except (AgentError, ValueError) as e:
        raise click.ClickException(str(e)) from None
