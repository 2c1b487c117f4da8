"""The webhook sender's backoff (app/webhooks/sender.py retry_delay): doubling steps from the base, capped,
of which a random half ("equal jitter"). Pure arithmetic: no servers."""

from __future__ import annotations

import random

import pytest

from app.webhooks.sender import retry_delay


def test_the_steps_double_from_the_base_up_to_the_cap() -> None:
    # the longest wait of each step (the jitter's top): 1, 2, 4, ... then the cap for good
    longest = [retry_delay(attempt, base_s=1.0, cap_s=60.0, rand=lambda: 1.0) for attempt in range(1, 10)]

    assert longest == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_no_retry_comes_sooner_than_half_its_step() -> None:
    shortest = [retry_delay(attempt, base_s=0.5, cap_s=10.0, rand=lambda: 0.0) for attempt in range(1, 7)]

    assert shortest == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0]


@pytest.mark.parametrize("attempt", [1, 4, 12])
def test_the_jitter_spreads_retries_over_the_upper_half_of_the_step(attempt: int) -> None:
    step = min(30.0, 2.0 * 2 ** (attempt - 1))
    rng = random.Random(attempt)

    delays = [retry_delay(attempt, base_s=2.0, cap_s=30.0, rand=rng.random) for _ in range(2_000)]

    assert all(step / 2 <= d <= step for d in delays)
    # spread over the half, not bunched: every quarter of it is used
    quarters = {min(3, int((d - step / 2) / (step / 8))) for d in delays}
    assert quarters == {0, 1, 2, 3}
