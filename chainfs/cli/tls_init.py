"""`chainfs tls-init DIR`: a CA and certificates for a cluster's processes.

Offline (it talks to no cluster), hence not under `chainfs admin`, whose
commands all reach a cluster at --address."""

from __future__ import annotations

import click

from chainfs.cli.admin.common import emit_object
from chainfs.common.errors import ChainfsError


@click.command("tls-init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="NAME",
    help="A node process (server + client certificate NAME.crt/NAME.key). Repeatable.",
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="NAME",
    help="A client-only certificate (admin tools, users that present one). Repeatable.",
)
@click.option(
    "--san",
    "sans",
    multiple=True,
    metavar="HOST|IP",
    help="One more name or address in node certificates (besides this host's). Repeatable.",
)
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tls_init(
    directory: str,
    nodes: tuple[str, ...],
    clients: tuple[str, ...],
    sans: tuple[str, ...],
    days: int,
    as_json: bool,
) -> None:
    """Write DIR/ca.crt + ca.key (kept if present) and a certificate per --node and
    --client; keys are 0600. Put [tls] ca_file/cert_file/key_file in each service's
    config; users set CHAINFS_TLS_CA (and CERT/KEY if they hold a certificate)."""
    try:
        from chainfs.local.tls_material import init_tls_dir
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    if not nodes and not clients:
        raise click.UsageError("name at least one --node or --client")
    try:
        made = init_tls_dir(directory, nodes, clients, sans, days)
    except ChainfsError as e:
        raise click.ClickException(str(e)) from None
    files = {"ca_file": next(iter(made.values())).ca_file}
    for name, c in made.items():
        files |= {f"{name}.cert_file": c.cert_file, f"{name}.key_file": c.key_file}
    emit_object(files, as_json, title="TLS material")
