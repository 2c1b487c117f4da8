"""The one clock every script call uses (the caller's, in ms): a reservation spanning shards gets one
deadline, and the sweeper compares deadlines with the same clock that set them."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
