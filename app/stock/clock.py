"""The one clock every script call uses (the caller's, in ms), so a reservation spanning shards gets one
deadline. With several API replicas their clocks must be kept in step (NTP): a replica whose clock runs
ahead by d expires holds d early, one behind by d expires them d late."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
