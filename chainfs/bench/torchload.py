"""The DataLoader figure's client: PyTorch's DataLoader, default (fork) start, over chainfs.

Runs in a process of its own (``workers.in_fresh_process(..., daemon=False)``):
the DataLoader forks its workers from it, and multiprocessing forbids a daemonic
process (the bench's client pool) to have children. Imports torch: import this
module only where torch is installed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from chainfs.bench.workers import TaskOutput, check_sample, random_range
from chainfs.client.torch import ChainfsDataset
from chainfs.client.usrbio.config import AGENT_SOCKET_ENV

DATALOADER_TIMEOUT_S = 120.0  # a batch not delivered by then fails the run (DataLoader timeout)


class CheckedSamples(ChainfsDataset):
    """(path, offset, length) samples, each checked against its stamps in the worker
    and handed over as a uint8 tensor (a batch is stacked in shared memory)."""

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        records = [self.records[i] for i in indices]
        datas = self.read_records(records)
        out = []
        for rec, data in zip(records, datas, strict=True):
            assert not isinstance(rec, str)
            check_sample(*rec, data)
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return out


def run_dataloader(address: str, files: list[tuple[str, int]], p: dict[str, Any]) -> TaskOutput:
    """Read random ``sample_bytes`` samples of ``files`` with ``workers`` DataLoader
    workers: untimed until every worker delivered and ``warmup_seconds`` passed, then
    timed for ``seconds`` (batches received by this process)."""
    os.environ.pop(AGENT_SOCKET_ENV, None)  # each worker reads through its own connection
    # A spawned process inherits "spawn" as its default start method; a user's main
    # process on Linux has "fork", the default the DataLoader is measured with.
    multiprocessing.set_start_method("fork", force=True)
    # 8 workers on 2 cores is the point of the figure, not a mistake to warn about.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    rng = random.Random(int(p["seed"]))
    sample, batch, workers = int(p["sample_bytes"]), int(p["batch"]), int(p["workers"])
    records = [random_range(rng, files, sample) for _ in range(int(p["max_samples"]))]
    loader = DataLoader(
        CheckedSamples(address, records),
        batch_size=batch,
        num_workers=workers,
        timeout=DATALOADER_TIMEOUT_S,
    )
    it = iter(loader)
    try:
        for _ in range(workers):  # batches go round-robin: each worker has delivered one
            next(it)
        warm_until = time.monotonic() + float(p["warmup_seconds"])
        while time.monotonic() < warm_until:
            next(it)
        t0 = time.monotonic()
        stop_at = t0 + float(p["seconds"])
        nbytes = batches = 0
        while time.monotonic() < stop_at:
            got = next(it, None)
            if got is None:
                break  # dataset exhausted (max_samples): the time so far is the phase
            nbytes += got.numel()
            batches += 1
        t1 = time.monotonic()
    finally:
        del it  # stops the workers
    phase = {"t0": t0, "t1": t1, "bytes": float(nbytes), "ops": float(batches * batch)}
    return {"read": phase, "start_method": multiprocessing.get_start_method()}
