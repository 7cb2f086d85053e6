"""Click options shared by several commands."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import click

from chainfs.common.auth.tokens import TOKEN_ENV, TOKEN_FILE_ENV, read_token_file


def file_option(
    flag: str, dest: str, help: str, exists: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An optional file path option (``None`` when not given)."""
    return click.option(
        flag, dest, type=click.Path(dir_okay=False, exists=exists), default=None, help=help
    )


def seconds_option(
    flag: str, dest: str, default: float, help: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A bound in seconds (>= 0) with its default shown."""
    return click.option(
        flag, dest, type=click.FloatRange(min=0), default=default, show_default=True, help=help
    )


# What each extra of the package brings, by the modules a command imports.
EXTRAS = {
    "server": ("rocksdict", "aetcd"),
    "fuse": ("pyfuse3", "trio"),
}


def require_extra(extra: str, what: str) -> None:
    """Fail with the pip command to run when ``extra`` is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'chainfs[{extra}]'"
        )


def _use_token(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--token/--token-file: the token every client of this command presents
    (as $CHAINFS_TOKEN, which chainfs clients read when given none)."""
    if not value:
        return
    token = value if param.name == "token" else read_token_file(value)
    os.environ[TOKEN_ENV] = token


def token_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --token / --token-file (default $CHAINFS_TOKEN / $CHAINFS_TOKEN_FILE)."""
    for flag, help in (
        ("--token-file", f"File holding the token (default ${TOKEN_FILE_ENV})."),
        ("--token", f"The user's token (default ${TOKEN_ENV}; prefer a file: argv is visible)."),
    ):
        fn = click.option(flag, callback=_use_token, expose_value=False, is_eager=True, help=help)(
            fn
        )
    return fn
