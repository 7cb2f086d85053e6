"""``chainfs bench compare OLD NEW``: two suite reports side by side.

Every ceiling and every figure of either report gets a row: its value before
and after, ``NEW/OLD``, and its ratio to the ceiling in both runs. On one
machine compare the values; across machines (or when the ceilings moved: other
load) compare the ratios, since each run divides by its own ceilings. A figure
that ran in OLD and did not run (or is absent) in NEW is listed as dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chainfs.bench.report import fmt, fmt_ratio


def load(path: Path) -> dict[str, Any]:
    """A report from its JSON file, or from the one JSON report in a directory."""
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one report (*.json), found {len(found)}")
        path = found[0]
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON report ({e})") from None
    if not isinstance(doc, dict) or "results" not in doc or "ceilings" not in doc:
        raise ValueError(f"{path}: not a `chainfs bench` report (no results and ceilings)")
    return doc


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def _label(report: dict[str, Any]) -> str:
    c, m = report.get("config", {}), report.get("machine", {})
    git = c.get("git") or {}
    commit = str(git.get("commit", "?"))[:10] + ("+dirty" if git.get("dirty") else "")
    return (
        f"{str(report.get('created_utc', '?'))[:16]} {c.get('mode', '?')} run, commit {commit}, "
        f"{m.get('cores')} cores, {m.get('memory_GiB')} GiB, {m.get('cpu_model')}"
    )


def _union(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return list(a) + [n for n in b if n not in a]


def _warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    ma, mb = a.get("machine", {}), b.get("machine", {})
    out = []
    if any(ma.get(k) != mb.get(k) for k in ("cores", "memory_GiB", "cpu_model", "kernel")):
        out.append("machines differ: compare the ratio columns, not the values")
    if a.get("config", {}).get("mode") != b.get("config", {}).get("mode"):
        out.append("one run is --quick and the other is not: sizes differ")
    return out


def _ceiling_rows(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    ca, cb = a.get("ceilings", {}), b.get("ceilings", {})
    rows = [f"{'ceiling':36} {'OLD':>12} {'NEW':>12} {'NEW/OLD':>8}"]
    for n in _union(ca, cb):
        va, vb = ca.get(n), cb.get(n)
        rows.append(f"{n:36} {fmt(va):>12} {fmt(vb):>12} {_change(va, vb):>8}")
    return rows


def _note(old: dict[str, Any], new: dict[str, Any]) -> str:
    notes = [
        f"{tag} {str(r.get('status', 'absent')).split(':')[0] if r else 'absent'}"
        for tag, r in (("OLD", old), ("NEW", new))
        if not r or r.get("status") != "ok"
    ]
    target = (new or old).get("target")
    if target is not None and new.get("ratio") is not None and new["ratio"] < target:
        notes.append(f"NEW below target {target}")
    return "; ".join(notes)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, list[str]]:
    """The table of OLD ``a`` against NEW ``b``, and the figures that ran in ``a`` only."""
    out = [f"OLD: {_label(a)}", f"NEW: {_label(b)}", *_warnings(a, b), ""]
    out += _ceiling_rows(a, b)
    out += [
        "",
        f"{'figure':26} {'unit':10} {'OLD':>10} {'NEW':>10} {'NEW/OLD':>8}  "
        f"{'ratio OLD':>9} {'ratio NEW':>9}  note",
    ]
    ra = {r["name"]: r for r in a.get("results", [])}
    rb = {r["name"]: r for r in b.get("results", [])}
    dropped = []
    for n in _union(ra, rb):
        x, y = ra.get(n, {}), rb.get(n, {})
        if x.get("status") == "ok" and y.get("status") != "ok":
            dropped.append(n)
        out.append(
            f"{n:26} {(x or y).get('unit', ''):10} {fmt(x.get('value')):>10} "
            f"{fmt(y.get('value')):>10} {_change(x.get('value'), y.get('value')):>8}  "
            f"{fmt_ratio(x.get('ratio')):>9} {fmt_ratio(y.get('ratio')):>9}  {_note(x, y)}"
        )
    out += _cpu_rows(a, b)
    out += ["", f"dropped (ran in OLD, not in NEW): {', '.join(dropped) or 'none'}"]
    return "\n".join(out), dropped


def _cpu_rows(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """CPU seconds of each workload both runs measured, and per operation of its mix."""
    ca, cb = a.get("cpu") or {}, b.get("cpu") or {}
    both = [w for w in ca if w in cb]
    if not both:
        return []
    rows = ["", f"{'CPU of workload':26} {'OLD s':>10} {'NEW s':>10} {'NEW/OLD':>8}  "
                f"{'OLD us/op':>9} {'NEW us/op':>9}"]  # fmt: skip
    for w in both:
        ta, tb = ca[w].get("total_cpu_s"), cb[w].get("total_cpu_s")
        pa, pb = (_per_op(c) for c in (ca[w], cb[w]))
        rows.append(f"{w:26} {fmt(ta):>10} {fmt(tb):>10} {_change(ta, tb):>8}  {pa:>9} {pb:>9}")
    return rows


def _per_op(cpu: dict[str, Any]) -> str:
    ops, total = cpu.get("ops"), cpu.get("total_cpu_s")
    return f"{1e6 * total / ops:,.0f}" if ops and total is not None else "-"
