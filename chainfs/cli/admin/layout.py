"""`chainfs admin set-layout` / `get-layout`: the file layout of a directory or file.

A directory's layout is the default of files created in it later (and of new
subdirectories); a file's layout is fixed when it is created.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import click

from chainfs.cli.admin.common import admin, admin_options, async_command, emit_object
from chainfs.common.rpc.meta_client import MetaClient, UserInfo
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.proto import meta_pb2 as pb

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """'4M', '64KiB', '1048576' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if m is None:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 4M, 64K, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@asynccontextmanager
async def meta_client(address: str) -> AsyncIterator[MetaClient]:
    """A MetaClient finding meta servers through the routing info of ``address`` (mgmtd)."""
    async with MgmtClient(address) as mgmt:
        m = MetaClient(RoutingCache(mgmt), user=UserInfo.current())
        try:
            yield m
        finally:
            await m.aclose()


def layout_object(path: str, inode: pb.Inode) -> dict[str, Any]:
    lay = inode.layout
    return {
        "path": path,
        "type": pb.InodeType.Name(inode.type).lower(),
        "chunk_size": lay.chunk_size,
        "stripe": lay.stripe,
        "chains": list(lay.chains),
    }


@admin.command("get-layout")
@click.argument("path")
@admin_options
@async_command
async def get_layout(path: str, address: str, as_json: bool) -> None:
    """Show the layout of PATH (a directory: the default for new files)."""
    async with meta_client(address) as m:
        inode = await m.stat(path)
    emit_object(layout_object(path, inode), as_json, title=f"layout of {path}")


@admin.command("set-layout")
@click.argument("path")
@click.option(
    "--chunk-size", default=None, help="Chunk size, a power of two in 64K..64M (e.g. 4M)."
)
@click.option("--stripe", type=int, default=None, help="Chains each new file spreads over.")
@click.option(
    "--chains",
    default=None,
    help="Comma-separated chain ids new files pick from (default: every chain).",
)
@admin_options
@async_command
async def set_layout(
    path: str,
    chunk_size: str | None,
    stripe: int | None,
    chains: str | None,
    address: str,
    as_json: bool,
) -> None:
    """Set the default layout of new files under the directory PATH."""
    if chunk_size is None and stripe is None and chains is None:
        raise click.UsageError("give at least one of --chunk-size, --stripe, --chains")
    if stripe is not None and stripe < 1:
        raise click.BadParameter("--stripe must be >= 1")
    chain_ids: list[int] = []
    if chains:
        try:
            chain_ids = [int(c) for c in chains.split(",") if c.strip()]
        except ValueError:
            raise click.BadParameter(f"--chains: not a list of chain ids: {chains!r}") from None
    async with meta_client(address) as m:
        inode = await m.set_layout(
            path,
            chunk_size=parse_size(chunk_size) if chunk_size is not None else 0,
            stripe=stripe or 0,
            chains=chain_ids,
        )
    emit_object(layout_object(path, inode), as_json, title=f"layout of {path}")
