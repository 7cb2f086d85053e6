"""The one retry policy of every client: exponential backoff with jitter,
bounded by a deadline and by a number of attempts.

A caller runs an attempt (or a round of attempts over several servers), and
on a failure it considers retryable asks :meth:`Backoff.wait` for the pause
before the next one. ``wait`` answers False, without sleeping, once the
deadline would pass before that pause ends or the attempt bound is reached:
the caller then gives up with the last error. Which errors are retryable
(fail over, retry the same server, or give up) each caller decides itself.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of one retrying call (a config section where a client exposes one)."""

    backoff_initial_s: float = 0.05  # pause after the first failed attempt
    backoff_max_s: float = 0.5  # the pause doubles up to this (failover noticed quickly)
    max_attempts: int = 1000  # attempts (or rounds over all servers) of one call
    jitter: float = 0.5  # each pause is drawn from [(1 - jitter) * p, p]

    def __post_init__(self) -> None:
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(
                f"need 0 < backoff_initial_s <= backoff_max_s, not "
                f"{self.backoff_initial_s}, {self.backoff_max_s}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter}")


class Backoff:
    """The pauses of one call under ``policy``, which must end by ``timeout_s``."""

    def __init__(self, policy: RetryPolicy, timeout_s: float) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.attempts = 0  # failed attempts so far
        self._pause_s = policy.backoff_initial_s

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    async def wait(self) -> bool:
        """Count a failed attempt and pause before the next; False (no pause)
        when the attempt bound is reached or the deadline would pass first."""
        self.attempts += 1
        if self.attempts >= self.policy.max_attempts:
            return False
        pause_s = self._pause_s * random.uniform(1 - self.policy.jitter, 1.0)
        if pause_s >= self.remaining_s():
            return False
        await asyncio.sleep(pause_s)
        self._pause_s = min(self._pause_s * 2, self.policy.backoff_max_s)
        return True
