"""Progress bars of long-running commands (`up --sample-data`, `dump`, `load`)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def byte_progress(transient: bool = False) -> Progress:
    """A bar of bytes done with rate and ETA, on stderr (stdout stays for results).

    Off a terminal rich draws it once, when it stops: a log gets the final line.
    """
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=transient,
    )
