"""`chainfs serve {mgmtd,meta,storage}`: run one service process."""

from __future__ import annotations

import importlib

import click

from chainfs.cli.options import file_option, require_extra
from chainfs.common.errors import ChainfsError

# service name -> module with `main(config_path, ready_file) -> int`
_SERVICES = {
    "mgmtd": "chainfs.mgmt_service.server",
    "meta": "chainfs.meta_service.server",
    "storage": "chainfs.storage_service.server",
}


@click.group()
def serve() -> None:
    """Run a chainfs service in the foreground."""


def _make(name: str, module: str) -> click.Command:
    @click.command(name=name, help=f"Run the {name} service.")
    @file_option("--config", "config_path", "TOML config file (defaults apply where absent).")
    @file_option(
        "--ready-file", "ready_file", "Write JSON with pid and bound addresses here once serving."
    )
    def cmd(config_path: str | None, ready_file: str | None) -> None:
        require_extra("server", f"chainfs serve {name}")
        mod = importlib.import_module(module)
        try:
            code = mod.main(config_path, ready_file)
        except ChainfsError as e:
            raise click.ClickException(str(e)) from None
        raise SystemExit(code)

    return cmd


for _name, _module in _SERVICES.items():
    serve.add_command(_make(_name, _module))
