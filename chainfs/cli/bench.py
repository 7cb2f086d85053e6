"""`chainfs bench`: chainfs figures next to this machine's ceilings, as a report."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click


@click.command()
@click.option(
    "--address",
    default=None,
    help="mgmtd address of a running cluster to measure (default: start a LocalCluster).",
)
@click.option("--quick", is_flag=True, help="Tiny sizes: the whole run in under 2 minutes.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="Directory for <date>-<time>.json, .md and -*.png.",
)
@click.option(
    "--only",
    default=None,
    help="Comma-separated workload or figure names (see --list); the rest is 'not run'.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the cluster's data and the fio file go (default: the system temp dir); "
    "this is the disk the fio ceilings measure.",
)
@click.option("--keep-data", is_flag=True, help="Keep the scratch directory after the run.")
@click.option(
    "--mountpoint",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --address: a FUSE mount of that cluster, for the fuse_* figures.",
)
@click.option("--no-fuse", is_flag=True, help="Do not mount FUSE on the LocalCluster.")
@click.option(
    "--profile",
    is_flag=True,
    help="Sample every process with py-spy during each workload; the report lists where "
    "the time goes (profiled figures are lower: do not compare them).",
)
@click.option("--list", "list_only", is_flag=True, help="List the workloads and exit.")
def bench(
    address: str | None,
    quick: bool,
    out_dir: Path,
    only: str | None,
    data_dir: Path | None,
    keep_data: bool,
    mountpoint: Path | None,
    no_fuse: bool,
    profile: bool,
    list_only: bool,
) -> None:
    """Measure chainfs and the ceilings of this machine in one run; write a report.

    Exit status 1 if any figure or ceiling failed (the report is written anyway);
    "not run" (a component not built, a tool missing) is not a failure.
    """
    from chainfs.bench import runner
    from chainfs.bench.workloads import REGISTRY

    if list_only:
        for w in REGISTRY.values():
            figures = "" if w.results == (w.name,) else f"  -> {', '.join(w.results)}"
            click.echo(f"{w.name:24} [{w.profile}] {w.doc.splitlines()[0]}{figures}")
        return
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    opts = runner.BenchOptions(
        address=address,
        quick=quick,
        out_dir=out_dir,
        only=names,
        data_dir=data_dir,
        keep_data=keep_data,
        mountpoint=mountpoint,
        fuse=not no_fuse,
        profile=profile,
        command=" ".join(["chainfs bench", shlex.join(sys.argv[2:])]).strip(),
    )
    t0 = time.monotonic()

    def log(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f}s] {msg}", err=True)

    from chainfs.bench.context import NotRun

    try:
        result = runner.run(opts, log)
    except (ValueError, NotRun) as e:
        raise click.UsageError(str(e)) from None
    for kind, path in result.paths.items():
        click.echo(f"{kind}: {path}")
    if result.failures:
        raise click.ClickException(f"failed: {', '.join(result.failures)} (see the report)")
