"""This process's Prometheus metrics: reservations by outcome, request latency per route, the expiry
sweeper, the sold-out fast path (the webhook sender adds its own counters to the same registry).

`stockhold serve --workers N` runs N processes behind one port, and a scrape reaches one of them at
random, so each process's counters alone would be a random Nth of the truth. prometheus-client's
multiprocess mode solves exactly this: `serve` points PROMETHEUS_MULTIPROC_DIR at a directory of its own
before the workers start, every process writes its counters to its own memory-mapped file there, and a
scrape of any process sums the files of all of them (MultiProcessCollector), those of workers that died
and were replaced included, so totals never go backwards while `serve` runs. Without the variable (the
test suite, an app built in process) the metrics are plain in-memory ones, private to each app.

The choice is made when prometheus_client is first imported (its ValueClass); Metrics reads it back
rather than looking at the environment again, so the two can never disagree.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values

# Request latency: a sold-out refusal from memory answers in well under a millisecond, a reservation in
# a few, a durable confirm in tens; seconds are overload queueing. 14 buckets from 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One sweep of every shard: a few pipelined Redis calls when nothing is due, more when thousands are.
SWEEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UNMATCHED_ROUTE = "unmatched"  # a path no route serves: one label for all, or scanners would mint labels


def multiprocess_enabled() -> bool:
    """Whether prometheus_client writes this process's values to PROMETHEUS_MULTIPROC_DIR."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class Metrics:
    """The metrics of one API process. ``registry`` is where its metrics register (the webhook sender's
    too); ``scrape`` is what /metrics exposes: the same registry in one process, the sum of every
    process's files in multiprocess mode (plus, in both, the per-shard pipeline gauges)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_enabled()
        self.registry = CollectorRegistry()
        if self.multiprocess:
            self.scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scrape)  # type: ignore[no-untyped-call]
        else:
            self.scrape = self.registry
        reg = self.registry
        self.reservations = Counter(
            "stockhold_reservations",
            "POST /v1/reservations answers by outcome: reserved, idempotent_replay, sold_out_fast_path, or the "
            "problem code (insufficient_stock, limit_exceeded, not_eligible, rate_limited, ...; error: a 500)",
            ["outcome"],
            registry=reg,
        )
        self.requests = Histogram(
            "stockhold_request_duration_seconds",
            "HTTP request latency, from the first byte handled to the last sent, by method, route template "
            "and status class",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.sweeps = Counter(
            "stockhold_sweeper_runs",
            "Expiry sweeps of every shard run by this deployment's sweepers, by result (ok, error)",
            ["result"],
            registry=reg,
        )
        self.expired_holds = Counter(
            "stockhold_expired_holds",
            "Reservation parts (one per shard a reservation spans) the sweepers expired past their deadline",
            registry=reg,
        )
        self.sweep_seconds = Histogram(
            "stockhold_sweep_duration_seconds",
            "How long one sweep of every shard took",
            buckets=SWEEP_BUCKETS,
            registry=reg,
        )
        self.sold_out_hits = Counter(
            "stockhold_sold_out_fast_path_hits",
            "Reservations refused from the process's memory of sold-out SKUs, without asking Redis",
            registry=reg,
        )
        # labels() takes a lock and builds a tuple key each call; the hot path keeps its children here
        self._latency: dict[tuple[str, str, int], Histogram] = {}
        self._outcomes: dict[str, Counter] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        child = self._latency.get(key)
        if child is None:
            status_class = f"{status // 100}xx" if status else "none"  # none: the client left first
            child = self._latency[key] = self.requests.labels(method, route, status_class)
        child.observe(seconds)

    def count_reservation(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.reservations.labels(outcome)
        child.inc()

    def count_sweep(self, started: float, expired: int | None) -> None:
        """One sweeper tick that began at ``started`` (perf_counter) and expired ``expired`` parts (None:
        it failed)."""
        self.sweep_seconds.observe(time.perf_counter() - started)
        self.sweeps.labels("ok" if expired is not None else "error").inc()
        if expired:
            self.expired_holds.inc(expired)

    def close(self) -> None:
        """At the end of the process's life: drop its live-gauge files (prometheus-client's rule; its
        counters stay, so totals keep what it counted)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
