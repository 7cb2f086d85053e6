"""Click options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def file_option(
    flag: str, dest: str, help: str, exists: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An optional file path option (``None`` when not given)."""
    return click.option(
        flag, dest, type=click.Path(dir_okay=False, exists=exists), default=None, help=help
    )
