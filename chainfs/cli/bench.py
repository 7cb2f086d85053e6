"""`chainfs bench`: chainfs figures next to this machine's ceilings, as a report.

chainfs bench [OPTIONS]              the suite (same as `chainfs bench run`)
chainfs bench compare OLD NEW        every figure of two reports, before and after
chainfs bench <study> [OPTIONS]      one part measured closer (see `--help`)
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from chainfs.bench.studies import STUDIES, Opt, Study
from chainfs.cli.options import token_options

_DIR = click.Path(file_okay=False, path_type=Path)

# The suite's options, on `chainfs bench` itself and on `chainfs bench run`.
_SUITE_OPTIONS = (
    click.option("--address", default=None,
                 help="mgmtd address of a running cluster to measure (default: start a "
                 "LocalCluster)."),
    click.option("--quick", is_flag=True, help="Tiny sizes: the whole run in under 2 minutes."),
    click.option("--out", "out_dir", type=_DIR, default=None,
                 help="Directory for <date>-<time>.json, .md and -*.png "
                 "[default: ./chainfs-bench-<date>-<time>]."),
    click.option("--only", "--workloads", "only", default=None,
                 help="Comma-separated workload or figure names (see --list); the rest is "
                 "'not run'."),
    click.option("--data-dir", type=_DIR, default=None,
                 help="Where the cluster's data and the fio file go (default: the system temp "
                 "dir); this is the disk the fio ceilings measure."),
    click.option("--keep-data", is_flag=True, help="Keep the scratch directory after the run."),
    click.option("--mountpoint", type=_DIR, default=None,
                 help="With --address: a FUSE mount of that cluster, for the fuse_* figures."),
    click.option("--no-fuse", is_flag=True, help="Do not mount FUSE on the LocalCluster."),
    click.option("--compare", "compare_dir", type=click.Path(exists=True, file_okay=False,
                 path_type=Path), default=None,
                 help="Also run the mount workloads (fuse_meta, fuse_readdir, fuse_rand_*, "
                 "fuse_smallfiles) in this directory, e.g. a MooseFS mount, and report them "
                 "side by side with chainfs's."),
    click.option("--mount-only", is_flag=True,
                 help="Only the mount workloads and their local-directory ceilings."),
    click.option("--steady-churn-ops", type=int, default=None,
                 help="Creates + unlinks before the meta_*_steady figures [default: 100,000; "
                 "--quick: 400]."),
    click.option("--profile", is_flag=True,
                 help="Sample every process with py-spy during each workload; the report lists "
                 "where the time goes (profiled figures are lower: do not compare them)."),
    click.option("--list", "list_only", is_flag=True, help="List the workloads and exit."),
)  # fmt: skip


def _suite_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_SUITE_OPTIONS):
        fn = option(fn)
    return fn


def _list_workloads() -> None:
    from chainfs.bench.workloads import REGISTRY

    for w in REGISTRY.values():
        figures = "" if w.results == (w.name,) else f"  -> {', '.join(w.results)}"
        click.echo(f"{w.name:24} [{w.profile}] {w.doc.splitlines()[0]}{figures}")


def _run_suite(only: str | None, no_fuse: bool, list_only: bool, **kwargs: Any) -> None:
    """Measure chainfs and the ceilings of this machine in one run; write a report."""
    from chainfs.bench import runner
    from chainfs.bench.context import NotRun

    if list_only:
        _list_workloads()
        return
    opts = runner.BenchOptions(
        only=[n.strip() for n in only.split(",") if n.strip()] if only else None,
        fuse=not no_fuse,
        command=" ".join(["chainfs", shlex.join(sys.argv[1:])]),
        **kwargs,
    )
    t0 = time.monotonic()

    def log(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f}s] {msg}", err=True)

    try:
        result = runner.run(opts, log)
    except (ValueError, NotRun) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"report written to {result.out_dir}")
    for kind, path in result.paths.items():
        click.echo(f"{kind}: {path}")
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.failures:
        raise click.ClickException(f"failed: {', '.join(result.failures)} (see the report)")


@click.group(invoke_without_command=True)
@token_options
@_suite_options
@click.pass_context
def bench(ctx: click.Context, **kwargs: Any) -> None:
    """Measure chainfs and the ceilings of this machine in one run; write a report.

    Exit status 1 if any figure or ceiling failed (the report is written anyway);
    "not run" is only for what this machine or run cannot offer (a tool or
    /dev/fuse missing, a figure not selected), never for a part of chainfs.
    """
    if ctx.invoked_subcommand is None:
        _run_suite(**kwargs)


@bench.command("run")
@_suite_options
def run_cmd(**kwargs: Any) -> None:
    """The suite: the same as `chainfs bench` with these options."""
    _run_suite(**kwargs)


@bench.command("compare")
@click.argument("old", type=click.Path(exists=True, path_type=Path))
@click.argument("new", type=click.Path(exists=True, path_type=Path))
def compare_cmd(old: Path, new: Path) -> None:
    """Every ceiling and figure of two suite reports, before (OLD) and after (NEW).

    OLD and NEW are report JSON files or the directories `chainfs bench --out`
    wrote them to. Exit status 1 if a figure that ran in OLD did not run in NEW.
    """
    from chainfs.bench import compare

    try:
        a, b = compare.load(old), compare.load(new)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    text, dropped = compare.compare(a, b)
    click.echo(text)
    if dropped:
        raise click.ClickException(f"figures that ran before and not now: {', '.join(dropped)}")


def _study_option(opt: Opt) -> click.Option:
    flag = f"--{opt.name}"
    if isinstance(opt.default, bool):
        return click.Option([flag], is_flag=True, help=opt.help)
    kind: Any = click.Choice(opt.choices) if opt.choices else type(opt.default)
    return click.Option([flag], type=kind, default=opt.default, show_default=True, help=opt.help)


def _study_command(study: Study) -> click.Command:
    def callback(json_path: Path | None, **opts: Any) -> None:
        report: dict[str, Any] = {
            "study": study.name,
            "command": shlex.join(["chainfs", *sys.argv[1:]]),
        }
        from chainfs.bench.context import NotRun

        try:
            report |= study.run(opts, click.echo)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        except NotRun as e:  # a tool the study measures against is missing here
            raise click.ClickException(str(e)) from None
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            click.echo(f"figures written to {json_path}")

    params: list[click.Parameter] = [_study_option(opt) for opt in study.options]
    params += [
        click.Option(["--json", "json_path"], type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write the figures here as JSON."),
        click.Option(["--data-dir"], type=_DIR, default=None,
                     help="Where the servers' data go (default: the system temp dir)."),
    ]  # fmt: skip
    return click.Command(study.name, callback=callback, params=params, help=study.help)


for _study in STUDIES:
    bench.add_command(_study_command(_study))
