"""Shared pieces of admin commands: the group, --address/--json, output."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from chainfs.cli.options import token_options
from chainfs.common.auth.tokens import TOKEN_FILE_ENV
from chainfs.common.errors import ChainfsError, Code

T = TypeVar("T")
DEFAULT_ADDRESS_ENV = "CHAINFS_ADDRESS"


@click.group()
def admin() -> None:
    """Cluster administration (every command takes --address and --json)."""


DEFAULT_TIMEOUT_S = 5.0  # admin calls give up (exit 1) after this


def admin_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --address (default $CHAINFS_ADDRESS), --token/--token-file and --json to a command."""
    fn = token_options(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
    fn = click.option(
        "--address",
        envvar=DEFAULT_ADDRESS_ENV,
        required=True,
        help=f"mgmtd address host:port (default ${DEFAULT_ADDRESS_ENV}).",
    )(fn)
    return fn


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an admin coroutine; chainfs errors become a one-line message, exit 1."""
    try:
        return asyncio.run(coro)
    except ChainfsError as e:
        hint = ""
        if e.code == Code.UNAUTHENTICATED:
            hint = (
                f"\n(give a token: --token-file F or ${TOKEN_FILE_ENV}; a new cluster's admin "
                "token is in mgmtd's admin_token_file, <mgmtd data_dir>/admin.token by default)"
            )
        raise click.ClickException(str(e) + hint) from None


def async_command(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(fn(*args, **kwargs))

    return wrapper


_BYTE_SUFFIXES = ("_bytes", "_bytes_per_s")
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int) -> str:
    """1 KiB = 1024 B; ``20342374`` -> ``19.4 MiB`` (bytes below 1 KiB stay exact)."""
    value = float(n)
    for unit in _SIZE_UNITS:
        if abs(value) < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the last unit returns")


def cell(column: str, value: Any) -> str:
    """One table cell: byte counts (``*_bytes``, ``*_bytes_per_s``) in binary units."""
    if value is None:
        return ""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and column.endswith("_bytes"):
        return human_bytes(value)
    if is_int and column.endswith("_bytes_per_s"):
        return f"{human_bytes(value)}/s"
    return str(value)


def emit(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool, title: str | None = None
) -> None:
    """Print ``rows`` as a rich table (sizes readable), or as a JSON list (raw) with --json."""
    if as_json:
        json.dump(list(rows), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c.endswith(_BYTE_SUFFIXES) else "left")
    for r in rows:
        table.add_row(*(cell(c, r.get(c)) for c in columns))
    Console(width=int(os.environ.get("COLUMNS", "160"))).print(table)


def emit_object(obj: dict[str, Any], as_json: bool, title: str | None = None) -> None:
    """Print one object as a two-column table, or as JSON."""
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for k, v in obj.items():
        table.add_row(k, cell(k, v))
    Console(width=int(os.environ.get("COLUMNS", "160"))).print(table)


def timeout_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--timeout",
        "timeout_s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        show_default=True,
        help="Seconds to wait for mgmtd before failing.",
    )(fn)


def mgmt_command(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """An async admin command with --address, --json and --timeout (innermost decorator)."""
    return admin_options(timeout_option(async_command(fn)))
