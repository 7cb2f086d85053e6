"""The one retry policy: bounded by attempts and by the deadline, never past it."""

from __future__ import annotations

import time

import pytest

from chainfs.common.rpc.retry import Backoff, RetryPolicy


async def test_attempt_bound_ends_the_retries() -> None:
    policy = RetryPolicy(backoff_initial_s=0.001, backoff_max_s=0.002, max_attempts=3)
    backoff = Backoff(policy, timeout_s=60.0)
    assert await backoff.wait()
    assert await backoff.wait()
    assert not await backoff.wait()  # the third failed attempt is the last one
    assert backoff.attempts == 3


async def test_no_pause_reaches_past_the_deadline() -> None:
    policy = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.04, jitter=0.0)
    backoff = Backoff(policy, timeout_s=0.2)
    while await backoff.wait():
        pass
    assert time.monotonic() < backoff.deadline  # gave up instead of sleeping past it
    assert backoff.attempts >= 3  # 0.01 + 0.02 + 0.04 fit before it


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backoff_initial_s": 0.0},
        {"backoff_initial_s": 1.0, "backoff_max_s": 0.5},
        {"max_attempts": 0},
        {"jitter": 1.0},
    ],
)
def test_bad_policy_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
