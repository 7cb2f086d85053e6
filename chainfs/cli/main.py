"""The `chainfs` command."""

from __future__ import annotations

import click

from chainfs import __version__
from chainfs.cli.admin import admin
from chainfs.cli.agent import agent
from chainfs.cli.bench import bench
from chainfs.cli.dump import dump, load
from chainfs.cli.fsck import fsck
from chainfs.cli.mount import mount
from chainfs.cli.serve import serve
from chainfs.cli.tls_init import tls_init
from chainfs.cli.umount import umount
from chainfs.cli.up import up


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chainfs")
def cli() -> None:
    """chainfs: a distributed file system for AI workloads."""


cli.add_command(serve)
cli.add_command(admin)
cli.add_command(bench)
cli.add_command(fsck)
cli.add_command(up)
cli.add_command(mount)
cli.add_command(umount)
cli.add_command(dump)
cli.add_command(load)
cli.add_command(agent)
cli.add_command(tls_init)


def main() -> int:
    return int(cli.main(standalone_mode=True) or 0)
