"""Process-level tuning applied once a process has started and before it serves.

CPython's cyclic garbage collector walks every tracked object of the generations it collects. After
start a process holds hundreds of thousands of long-lived objects (FastAPI, pydantic, redis-py, asyncpg
and their models), and each full collection walked them all: measured under a reservation burst, those
pauses put the p99 latency at 33-37 ms where the rest of the distribution sat below 12 ms. Freezing the
start-up heap moves it out of the collector's sight (gc.freeze, meant for exactly this), and a larger
first generation threshold lets request garbage, which is almost all acyclic and freed by reference
counting, pass without a collection every 700 allocations. Measured together (wrk -t2 -c64, 2 workers,
write-behind worker out of process): p99 33-37 -> 12 ms, throughput +3%. The freeze alone gave the p99.
"""

from __future__ import annotations

import gc

# Objects allocated (minus freed) before a first-generation collection; CPython's default is 700.
GEN0_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
