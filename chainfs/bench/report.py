"""The report of one run: ``<stamp>.json``, ``<stamp>.md``, ``<stamp>-*.png``.

The JSON shape is stable (scripts compare runs): top-level ``machine``,
``config``, ``ceilings`` (name -> number or null) and ``results``, a list of
``{"name", "value", "unit", "ceiling", "ratio", ...}``. The Markdown says in
words what the charts show, and says plainly which figure is below target.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chainfs.bench.context import STEADY_SUFFIX
from chainfs.bench.cpu import cpu_lines

# Chart colours by family of figure.
_FAMILY_COLOURS = {
    "client": "#4C72B0",
    "read_ranges": "#55A868",
    "fuse": "#8172B2",
    "meta": "#C44E52",
    "kvcache": "#CCB974",
    "rss": "#64B5CD",
}
_BELOW = "#C0392B"
_MET = "#1E8449"
_GREY = "#9E9E9E"

CEILING_LABELS = {
    "iperf3_loopback_MBps": "iperf3 loopback",
    "fio_seq_read_MBps": "fio seq read",
    "fio_seq_write_MBps": "fio seq write",
    "fio_rand_read_4k_iops": "fio 4K rand read",
    "fio_fdatasync_4k_iops": "fio 4K write+fdatasync",
    "local_meta_create_per_s": "local dir create",
    "local_meta_stat_per_s": "local dir stat",
    "local_meta_readdir_entries_per_s": "local dir readdir",
    "local_meta_rename_per_s": "local dir rename",
    "local_meta_unlink_per_s": "local dir unlink",
    "local_create_per_s": "local dir create",
    "local_stat_per_s": "local dir stat",
    "local_unlink_per_s": "local dir unlink",
    "local_readdir_entries_per_s": "local dir readdir",
    "local_rand_read_4k_iops": "local fio 4K rand read",
    "local_rand_write_4k_iops": "local fio 4K rand write",
    "local_smallfiles_s": "local untar+git+rsync",
}
CEILING_UNITS = {
    "iperf3_loopback_MBps": "MB/s",
    "fio_seq_read_MBps": "MB/s",
    "fio_seq_write_MBps": "MB/s",
    "fio_rand_read_4k_iops": "IOPS",
    "fio_fdatasync_4k_iops": "IOPS",
    "local_meta_readdir_entries_per_s": "entries/s",
    "local_create_per_s": "files/s",
    "local_stat_per_s": "files/s",
    "local_unlink_per_s": "files/s",
    "local_readdir_entries_per_s": "entries/s",
    "local_rand_read_4k_iops": "IOPS",
    "local_rand_write_4k_iops": "IOPS",
    "local_smallfiles_s": "s",
}
RATE_UNITS = ("ops/s", "entries/s", "files/s", "IOPS")


def family(name: str) -> str:
    for f in _FAMILY_COLOURS:
        if name.startswith(f):
            return f
    return "client"


def fmt(v: float | None) -> str:
    """A figure for people: thousands separators, three significant digits below 100."""
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if r >= 0.1 else f"{r:.3f}"


CHARTS_EXTRA = "bench"  # pip install 'chainfs[bench]' brings matplotlib, which draws the charts


def _free_base(out_dir: Path, stamp: str) -> str:
    """``stamp``, or ``stamp-N`` if a report of that name is there (two runs in one second)."""
    base, n = stamp, 1
    while (out_dir / f"{base}.json").exists():
        n += 1
        base = f"{stamp}-{n}"
    return base


def write_reports(
    report: dict[str, Any], out_dir: Path, stamp: str
) -> tuple[dict[str, Path], list[str]]:
    """Write JSON, Markdown and (with matplotlib) charts; their paths by kind, and notes.

    Without matplotlib the JSON and Markdown are complete and a note says which
    extra draws the charts: the figures never depend on the charts.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _free_base(out_dir, stamp)
    paths = {"json": out_dir / f"{base}.json", "markdown": out_dir / f"{base}.md"}
    notes: list[str] = []
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        notes.append(
            f"no charts: matplotlib is not installed (pip install 'chainfs[{CHARTS_EXTRA}]')"
        )
    else:
        paths["ratios_png"] = out_dir / f"{base}-ratios.png"
        paths["absolute_png"] = out_dir / f"{base}-absolute.png"
        plot_ratios(report, paths["ratios_png"])
        plot_absolute(report, paths["absolute_png"])
    paths["markdown"].write_text(markdown(report, paths, notes))
    return paths, notes


# -- Markdown --------------------------------------------------------------------------
def _machine_line(m: dict[str, Any]) -> str:
    fs = m.get("data_dir_filesystem") or {}
    disk = f", data on {fs.get('fstype')} ({fs.get('device')})" if fs else ""
    load = ""
    if m.get("load_average_1m_start") is not None:
        load = (
            f"; 1-minute load average {m.get('load_average_1m_start')} at the start, "
            f"{m.get('load_average_1m_end')} at the end (other work on the machine makes "
            f"every figure noisier)"
        )
    return (
        f"{m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_GiB')} GiB memory, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}{disk}{load}"
    )


def _config_line(c: dict[str, Any]) -> str:
    cl = c.get("cluster", {})
    git = c.get("git") or {}
    commit = (
        f"commit {git['commit'][:10]}{' (uncommitted changes)' if git.get('dirty') else ''}"
        if git.get("commit")
        else "commit unknown"
    )
    if cl.get("started_by_bench"):
        where = (
            f"LocalCluster of {cl.get('storage_nodes')} storage nodes x "
            f"{cl.get('targets_per_node')} targets, {cl.get('kv')} KV store, "
            f"3-replica chains (and 1-replica for *_r1)"
        )
    else:
        where = f"the cluster at {c.get('address')}"
    return (
        f"{c.get('mode')} run on {where}; {c.get('client_processes')} client processes for "
        f"concurrent figures; chainfs {c.get('chainfs_version')}, {commit}. "
        f"Command: `{c.get('command')}`"
    )


def _verdict(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return str(r["status"]).replace("|", "/").replace("\n", " ")
    if r.get("target") is None or r.get("ratio") is None:
        return ""
    return "**below target**" if r["ratio"] < r["target"] else "meets target"


def _chart_lines(paths: dict[str, Path], notes: list[str]) -> list[str]:
    if "ratios_png" not in paths:
        return [f"_{note}._" for note in notes] + [""]
    return [
        f"![ratio of each figure to its ceiling]({paths['ratios_png'].name})",
        "",
        f"![absolute figures]({paths['absolute_png'].name})",
        "",
    ]


def markdown(report: dict[str, Any], paths: dict[str, Path], notes: Sequence[str] = ()) -> str:
    m, c = report["machine"], report["config"]
    ceilings, detail = report["ceilings"], report.get("ceilings_detail", {})
    results = report["results"]
    lines = [
        f"# chainfs bench, {report['created_utc'][:16].replace('T', ' ')} UTC",
        "",
        f"- Machine: {_machine_line(m)}.",
        f"- Configuration: {_config_line(c)}.",
        f"- The run took {report.get('duration_s')} s. MB = 10^6 bytes, MiB = 2^20 bytes.",
        "",
        *_chart_lines(paths, list(notes)),
        "## Against the targets",
        "",
    ]
    for r in results:
        if r.get("target") is None:
            continue
        label = CEILING_LABELS.get(r.get("ceiling_name") or "", r.get("ceiling_name"))
        if r["status"] != "ok":
            lines.append(f"- {r['name']}: {r['status']} (target {r['target']} of {label}).")
        elif r["ratio"] is None:
            lines.append(f"- {r['name']}: {fmt(r['value'])} {r['unit']}; no ceiling measured.")
        elif r["ratio"] < r["target"]:
            lines.append(
                f"- **{r['name']} is below target**: {fmt(r['value'])} {r['unit']} is "
                f"{fmt_ratio(r['ratio'])} of {label}, the target is {r['target']}."
            )
        else:
            lines.append(
                f"- {r['name']} meets its target: {fmt(r['value'])} {r['unit']} is "
                f"{fmt_ratio(r['ratio'])} of {label} (target {r['target']})."
            )
    lines += [
        "",
        "## Ceilings (this machine, this run)",
        "",
        "| ceiling | value | unit | how |",
        "|---|---:|---|---|",
    ]
    for name, v in ceilings.items():
        d = detail.get(name, {})
        how = d.get("command", "") if d.get("status", "ok") == "ok" else d.get("status", "")
        unit = CEILING_UNITS.get(name, "ops/s")
        lines.append(f"| {name} | {fmt(v)} | {unit} | {str(how).replace('|', '/')} |")
    lines += [
        "",
        "## Figures",
        "",
        "| figure | value | unit | ceiling | ratio | target | verdict |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for r in results:
        ceiling = (
            f"{fmt(r['ceiling'])} ({CEILING_LABELS.get(r['ceiling_name'], r['ceiling_name'])})"
            if r.get("ceiling_name")
            else "-"
        )
        target = "-" if r.get("target") is None else f"{r['target']}"
        lines.append(
            f"| {r['name']} | {fmt(r['value'])} | {r['unit']} | {ceiling} | "
            f"{fmt_ratio(r['ratio'])} | {target} | {_verdict(r)} |"
        )
    lines += steady_lines(results)
    if report.get("peer"):
        lines += peer_lines(results, report["peer"])
    if report.get("cpu"):
        lines += cpu_lines(report["cpu"], report["machine"].get("cores"))
    if report.get("profiles"):
        lines += _profile_lines(report["profiles"], paths)
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += [
        "",
        "How to read these numbers: `chainfs/bench/README.md`; compare two runs with "
        "`chainfs bench compare OLD.json NEW.json`.",
        "",
    ]
    return "\n".join(lines)


def steady_lines(results: list[dict[str, Any]]) -> list[str]:
    """Each metadata figure fresh and after the churn, side by side."""
    by_name = {r["name"]: r for r in results}
    pairs = [
        (by_name[r["name"][: -len(STEADY_SUFFIX)]], r)
        for r in results
        if r["name"].endswith(STEADY_SUFFIX) and r["name"][: -len(STEADY_SUFFIX)] in by_name
    ]
    pairs = [(f, s) for f, s in pairs if f["status"] == "ok" or s["status"] == "ok"]
    if not pairs:
        return []
    churn = next((s["details"].get("churn_ops") for _, s in pairs if s["details"]), None)
    lines = [
        "",
        "## Metadata, fresh and in steady state",
        "",
        f"Steady: the same task after {fmt(churn)} creates and unlinks on the same cluster.",
        "",
        "| figure | fresh | steady | steady/fresh | unit | ratio fresh | ratio steady |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for f, s in pairs:
        change = f"{s['value'] / f['value']:.2f}" if f["value"] and s["value"] is not None else "-"
        lines.append(
            f"| {f['name']} | {fmt(f['value'])} | {fmt(s['value'])} | {change} | {f['unit']} | "
            f"{fmt_ratio(f['ratio'])} | {fmt_ratio(s['ratio'])} |"
        )
    return lines


def peer_lines(results: list[dict[str, Any]], peer: dict[str, Any]) -> list[str]:
    """The mount workloads of chainfs and of the ``--compare`` directory, side by side."""
    ours = {r["name"]: r for r in results}
    fs = peer.get("filesystem") or {}
    lines = [
        "",
        f"## Side by side with {peer['directory']} ({fs.get('fstype', '?')} on "
        f"{fs.get('device', '?')})",
        "",
        "The same workloads, the same code, divided by the same local-directory ceiling. "
        "For durations (s) shorter is better; every ratio reads as a fraction of the "
        "ceiling's speed.",
        "",
        "| figure | unit | chainfs | peer | local ceiling | ratio chainfs | ratio peer | "
        "chainfs/peer speed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in peer["results"]:
        c = ours.get(p["name"], {})
        speed = f"{c['ratio'] / p['ratio']:.2f}" if c.get("ratio") and p.get("ratio") else "-"
        lines.append(
            f"| {p['name']} | {p['unit']} | {_value_or_status(c)} | {_value_or_status(p)} | "
            f"{fmt(p.get('ceiling'))} | {fmt_ratio(c.get('ratio'))} | "
            f"{fmt_ratio(p.get('ratio'))} | {speed} |"
        )
    buffered = [
        f"{r['name']} ({who})"
        for who, rows in (("chainfs", list(ours.values())), ("peer", peer["results"]))
        for r in rows
        if r.get("details", {}).get("o_direct") is False
    ]
    if buffered:
        lines += [
            "",
            f"Without O_DIRECT (the file system refused it: page cache): {', '.join(buffered)}.",
        ]
    return lines


def _value_or_status(r: dict[str, Any]) -> str:
    if not r:
        return "absent"
    if r["status"] == "ok":
        return fmt(r["value"])
    return str(r["status"]).split(":")[0]


def _profile_lines(profiles: dict[str, Any], paths: dict[str, Path]) -> list[str]:
    lines = [
        "",
        "## Where the time goes (py-spy, this run was profiled)",
        "",
        "Share of each process's samples by leaf function, while the workload ran; the "
        f"collapsed stacks are in `{paths['json'].stem.split('-profiles')[0]}-profiles/`. "
        "Processes with no samples were idle (py-spy leaves idle threads out).",
    ]
    for workload, procs in profiles.items():
        busy = {n: p for n, p in procs.items() if p.get("samples")}
        if not busy:
            continue
        lines += ["", f"**{workload}**", ""]
        for name, p in sorted(busy.items(), key=lambda kv: -kv[1]["samples"]):
            top = ", ".join(f"{share:.0%} `{frame}`" for frame, share in p["top"][:4])
            lines.append(f"- {name} ({p['samples']} samples): {top}")
    return lines


# -- charts ------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    git = (c.get("git") or {}).get("commit", "")[:10]
    return (
        f"{m.get('cores')} cores, {m.get('memory_GiB')} GiB, Linux {m.get('kernel')}; "
        f"{c.get('mode')} run {report['created_utc'][:16].replace('T', ' ')} UTC"
        + (f"; commit {git}" if git else "")
    )


RATIO_AXIS_MAX = 1.3  # bars beyond this (chainfs faster than its ceiling) are cut and say so


def plot_ratios(report: dict[str, Any], path: Path) -> None:
    """One bar per figure: its fraction of the ceiling, with the target marked."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    rows = [r for r in report["results"] if r.get("ceiling_name")]
    rows.reverse()  # matplotlib draws bottom-up; keep the report's order top-down
    height = max(3.0, 0.36 * len(rows) + 1.8)
    fig, ax = plt.subplots(figsize=(11, height))
    top = RATIO_AXIS_MAX
    for y, r in enumerate(rows):
        ratio, target = r.get("ratio"), r.get("target")
        if y > 0 and family(r["name"]) != family(rows[y - 1]["name"]):
            ax.axhline(y - 0.5, color="#BBBBBB", linewidth=0.6)
        if ratio is None:
            why = r["status"].splitlines()[0] if r["status"] != "ok" else "no ceiling measured"
            why = why if len(why) <= 90 else why[:87] + "..."
            ax.barh(y, top, color="#F4F4F4", height=0.7)
            ax.text(0.01, y, why, va="center", fontsize=8, color=_GREY, style="italic")
        else:
            below = target is not None and ratio < target
            colour = _FAMILY_COLOURS[family(r["name"])]
            ax.barh(y, min(ratio, top), color=colour, height=0.7)
            label = f" {fmt_ratio(ratio)}  ({fmt(r['value'])} {r['unit']})"
            if below:
                label += "  BELOW TARGET"
            x = max(ratio, target or 0.0) + 0.01
            if ratio > top * 0.7:  # no room on the right: write inside the bar
                ax.text(
                    min(ratio, top) - 0.01,
                    y,
                    label + "  ",
                    va="center",
                    ha="right",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
            else:
                ax.text(
                    x,
                    y,
                    label,
                    va="center",
                    fontsize=8,
                    color=_BELOW if below else "#333333",
                    fontweight="bold" if below else "normal",
                )
        if target is not None:
            ax.plot([target, target], [y - 0.42, y + 0.42], color="black", linewidth=2.5)
    ax.axvline(1.0, color="#555555", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(
        [f"{r['name']}  / {CEILING_LABELS.get(r['ceiling_name'], '')}" for r in rows], fontsize=8
    )
    ax.set_xlim(0, top)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("fraction of the ceiling measured in the same run (longer is better)")
    ax.set_title(
        "chainfs against this machine's ceilings\n" + _subtitle(report), fontsize=10, loc="left"
    )
    ax.legend(
        handles=[
            Line2D([], [], color="black", linewidth=2.5, label="target"),
            Line2D([], [], color="#555555", linestyle="--", label="= the ceiling"),
        ],
        fontsize=8,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_absolute(report: dict[str, Any], path: Path) -> None:
    """Throughput (MB/s) with the network and disk ceilings, operation rates next to
    the local directory and disk, and peak memory per process."""
    plt = _pyplot()
    res = [r for r in report["results"] if r["value"] is not None]
    ceilings = report["ceilings"]
    fig, axes = plt.subplots(
        1, 3, figsize=(17, 6.5), gridspec_kw={"width_ratios": [1.25, 1.25, 0.8]}
    )
    fig.suptitle("chainfs absolute figures   " + _subtitle(report), fontsize=10, x=0.01, ha="left")

    # (a) throughput
    ax = axes[0]
    tp = [r for r in res if r["unit"] == "MB/s"][::-1]
    ax.barh(
        range(len(tp)),
        [r["value"] for r in tp],
        color=[_FAMILY_COLOURS[family(r["name"])] for r in tp],
    )
    for y, r in enumerate(tp):
        ax.text(r["value"], y, f" {fmt(r['value'])}", va="center", fontsize=7.5)
    styles = [
        ("iperf3_loopback_MBps", "black", "--"),
        ("fio_seq_read_MBps", "#7F8C8D", ":"),
        ("fio_seq_write_MBps", "#7F8C8D", "-."),
    ]
    for name, colour, ls in styles:
        v = ceilings.get(name)
        if v:
            ax.axvline(
                v,
                color=colour,
                linestyle=ls,
                linewidth=1.2,
                label=f"{CEILING_LABELS[name]} {fmt(v)}",
            )
    ax.set_yticks(range(len(tp)))
    ax.set_yticklabels([r["name"] for r in tp], fontsize=8)
    ax.set_xlabel("MB/s (longer is better)")
    ax.set_title("Throughput", fontsize=10, loc="left")
    if any(ceilings.get(n) for n, _, _ in styles):
        ax.legend(fontsize=7.5, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    if not tp:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes, color=_GREY)

    # (b) operation rates, chainfs next to its ceiling, log scale
    ax = axes[1]
    ops = [r for r in res if r["unit"] in RATE_UNITS][::-1]
    ys = range(len(ops))
    ax.barh(
        [y + 0.18 for y in ys],
        [r["value"] for r in ops],
        height=0.36,
        color=[_FAMILY_COLOURS[family(r["name"])] for r in ops],
    )
    ceil_vals = [r["ceiling"] or 0 for r in ops]
    ax.barh([y - 0.18 for y in ys], ceil_vals, height=0.36, color="#D5D8DC")
    for y, r in zip(ys, ops, strict=True):
        ax.text(r["value"], y + 0.18, f" {fmt(r['value'])}", va="center", fontsize=7)
        if r["ceiling"]:
            lab = CEILING_LABELS.get(r["ceiling_name"], "")
            text = f" {fmt(r['ceiling'])} {lab}"
            ax.text(r["ceiling"], y - 0.18, text, va="center", fontsize=6.5, color="#555555")
    if ops:
        ax.set_xscale("log")
        hi = max([r["value"] for r in ops] + ceil_vals)
        ax.set_xlim(left=max(1.0, min(r["value"] for r in ops) / 3), right=hi * 12)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['name']} ({r['unit']})" for r in ops], fontsize=8)
    ax.set_xlabel("operations per second, log scale (longer is better)")
    ax.set_title(
        "Operation rates: chainfs (colour) above its ceiling (grey)", fontsize=10, loc="left"
    )
    ax.grid(axis="x", alpha=0.3, which="both")
    if not ops:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes, color=_GREY)

    # (c) memory
    ax = axes[2]
    mem = [r for r in res if r["unit"] == "MiB"][::-1]
    ax.barh(range(len(mem)), [r["value"] for r in mem], color=_FAMILY_COLOURS["rss"])
    for y, r in enumerate(mem):
        who = r["details"].get("process", "") if r["name"].endswith("_max") else ""
        text = f" {fmt(r['value'])}" + (f" ({who})" if who else "")
        ax.text(r["value"], y, text, va="center", fontsize=7.5)
    ax.set_yticks(range(len(mem)))
    ax.set_yticklabels([r["name"].replace("rss_peak_", "").replace("rss_", "") for r in mem])
    ax.set_xlabel("peak RSS, MiB (shorter is better)")
    ax.set_title("Memory per process", fontsize=10, loc="left")
    if mem:
        ax.set_xlim(right=max(r["value"] for r in mem) * 1.4)
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes, color=_GREY)
    ax.grid(axis="x", alpha=0.3)

    missing = [r["name"] for r in report["results"] if r["value"] is None]
    if missing:
        fig.text(
            0.01,
            0.01,
            "not in these charts (not run or failed, see the table): " + ", ".join(missing),
            fontsize=7,
            color=_GREY,
            wrap=True,
        )
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
