"""GET /metrics, in Prometheus text format (prometheus-client): the write-behind pipeline per shard, and
the counters and histograms of the API processes (app/telemetry/metrics.py).

The per-shard gauges are read from Redis and PostgreSQL at scrape time, so every API process answers the
same numbers for the whole deployment, however many processes serve it. They are a custom collector, not
Gauge objects: values read at scrape time belong to no process, and in multiprocess mode a Gauge would be
written to the scraping process's file and reported once per process. The counters are summed over every
process of the deployment (multiprocess mode, set up by `stockhold serve`).

The stream lag is ``stockhold_oldest_unpersisted_event_age_seconds``: how long the oldest stock event of
the shard has waited for PostgreSQL (delivered to a worker or not), 0 when none waits. The other three
stream gauges say how many wait, and where.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.worker.status import ShardStatus, pipeline_status

router = APIRouter(tags=["operations"])


# name -> help; every gauge is per shard, read from Redis and PostgreSQL at scrape time
GAUGES = {
    "stockhold_stream_length": "Entries in the shard's event stream",
    "stockhold_stream_pending": "Events delivered to a worker and not yet acknowledged",
    "stockhold_stream_undelivered": "Events no worker has read yet",
    "stockhold_oldest_unpersisted_event_age_seconds": (
        "Stream lag: age of the shard's oldest event not yet in PostgreSQL (0: none waits)"
    ),
    "stockhold_shard_ready": "1 when the shard is rebuilt and serving, 0 while it awaits a rebuild",
    "stockhold_events_persisted": "Events the write-behind workers have written for the shard",
}


def _values(s: ShardStatus) -> Iterator[tuple[str, float]]:
    yield "stockhold_stream_length", s.backlog.length
    yield "stockhold_stream_pending", s.backlog.pending
    yield "stockhold_stream_undelivered", s.backlog.undelivered
    yield "stockhold_oldest_unpersisted_event_age_seconds", s.oldest_unpersisted_age_s
    yield "stockhold_shard_ready", 1 if s.ready else 0
    if s.persisted_total is not None:  # PostgreSQL did not answer: no figure rather than a wrong one
        yield "stockhold_events_persisted", s.persisted_total


class PipelineGauges(Collector):
    """The per-shard gauges, from the statuses the last scrape read (registered in the scrape registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.statuses: list[ShardStatus] = []
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(name, text, labels=["shard"]) for name, text in GAUGES.items()}
        for s in self.statuses:
            for name, value in _values(s):
                families[name].add_metric([str(s.shard)], value)
        yield from families.values()


@router.get("/metrics", summary="Prometheus metrics: the write-behind pipeline per shard, requests, sweeps")
async def metrics(request: Request) -> Response:
    state = request.app.state
    gauges: PipelineGauges = state.gauges
    # no await between reading the statuses and rendering them: a concurrent scrape cannot mix in its own
    gauges.statuses = await pipeline_status(state.redis, state.pg, state.keys)
    return Response(generate_latest(state.metrics.scrape), media_type=CONTENT_TYPE_LATEST)
