"""`chainfs bench`: chainfs figures next to ceilings measured in the same run.

- ``ceilings``: what this machine can do without chainfs (iperf3 loopback,
  fio direct I/O, a local directory's metadata rates) and what it is.
- ``workloads``: the chainfs figures, one registered function per workload,
  written against the public API (``chainfs.connect``, ``LocalCluster``).
- ``workers``: the spawned client processes that do the I/O.
- ``runner``: starts the cluster(s), runs the selection, builds the report.
- ``report``: JSON (stable shape), Markdown summary, PNG charts.
- ``compare``: two reports side by side (``chainfs bench compare``).
- ``cluster``: the one way every benchmark brings up servers (``LocalCluster``).
- ``studies``: single parts measured closer (``chainfs bench <study>``).

How to run it and read the numbers: ``chainfs/bench/README.md``.
"""

from __future__ import annotations
