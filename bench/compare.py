#!/usr/bin/env python3
"""Compare two `chainfs bench` reports side by side.

    python bench/compare.py bench/results/A.json bench/results/B.json

Prints each ceiling and each figure of A and B with B/A, and each figure's
ratio to its ceiling in both runs. On one machine compare the values; across
machines compare the ratios (each run divides by its own ceilings).
Needs only the standard library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def _label(report: dict[str, Any]) -> str:
    c = report.get("config", {})
    m = report.get("machine", {})
    commit = (c.get("git") or {}).get("commit", "?")[:10]
    dirty = "+dirty" if (c.get("git") or {}).get("dirty") else ""
    return (
        f"{report.get('created_utc', '?')[:16]} {c.get('mode', '?')} run, commit {commit}{dirty}, "
        f"{m.get('cores')} cores, {m.get('memory_GiB')} GiB, {m.get('cpu_model')}"
    )


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    out = [f"A: {_label(a)}", f"B: {_label(b)}"]
    ma, mb = a.get("machine", {}), b.get("machine", {})
    if any(ma.get(k) != mb.get(k) for k in ("cores", "memory_GiB", "cpu_model", "kernel")):
        out.append("machines differ: compare the ratio columns, not the values")
    if a.get("config", {}).get("mode") != b.get("config", {}).get("mode"):
        out.append("one run is --quick and the other is not: sizes differ")
    out.append("")
    out.append(f"{'ceiling':36} {'A':>12} {'B':>12} {'B/A':>7}")
    names = list(a.get("ceilings", {})) + [
        n for n in b.get("ceilings", {}) if n not in a.get("ceilings", {})
    ]
    for n in names:
        va, vb = a.get("ceilings", {}).get(n), b.get("ceilings", {}).get(n)
        out.append(f"{n:36} {_num(va):>12} {_num(vb):>12} {_change(va, vb):>7}")
    out.append("")
    out.append(
        f"{'figure':26} {'unit':10} {'A':>10} {'B':>10} {'B/A':>7}  "
        f"{'ratio A':>8} {'ratio B':>8}  note"
    )
    ra = {r["name"]: r for r in a.get("results", [])}
    rb = {r["name"]: r for r in b.get("results", [])}
    for n in list(ra) + [n for n in rb if n not in ra]:
        x, y = ra.get(n, {}), rb.get(n, {})
        notes = []
        for tag, r in (("A", x), ("B", y)):
            status = r.get("status", "missing") if r else "missing"
            if status != "ok":
                notes.append(f"{tag} {status.split(':')[0]}")
        target = (y or x).get("target")
        if target is not None and y.get("ratio") is not None and y["ratio"] < target:
            notes.append(f"B below target {target}")
        out.append(
            f"{n:26} {(x or y).get('unit', ''):10} {_num(x.get('value')):>10} "
            f"{_num(y.get('value')):>10} {_change(x.get('value'), y.get('value')):>7}  "
            f"{_num(x.get('ratio')):>8} {_num(y.get('ratio')):>8}  {'; '.join(notes)}"
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    a, b = (json.loads(Path(p).read_text()) for p in argv[1:3])
    print(compare(a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
