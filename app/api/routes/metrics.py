"""GET /metrics: the write-behind pipeline per shard, in Prometheus text format (prometheus-client).

The gauges are read from Redis and PostgreSQL at scrape time, so every API process answers the same
numbers for the whole deployment, however many processes serve it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from app.worker.status import pipeline_status

router = APIRouter(tags=["operations"])


class PipelineGauges:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["shard"]
        self.length = Gauge(
            "stockhold_stream_length", "Entries in the shard's event stream", labels, registry=self.registry
        )
        self.pending = Gauge(
            "stockhold_stream_pending",
            "Events delivered to a worker and not yet acknowledged",
            labels,
            registry=self.registry,
        )
        self.undelivered = Gauge(
            "stockhold_stream_undelivered", "Events no worker has read yet", labels, registry=self.registry
        )
        self.oldest = Gauge(
            "stockhold_oldest_unpersisted_event_age_seconds",
            "Age of the oldest event not yet in PostgreSQL (0 when none waits)",
            labels,
            registry=self.registry,
        )
        self.ready = Gauge(
            "stockhold_shard_ready",
            "1 when the shard is rebuilt and serving, 0 while it awaits a rebuild",
            labels,
            registry=self.registry,
        )
        self.persisted = Gauge(
            "stockhold_events_persisted",
            "Events the write-behind workers have written for the shard",
            labels,
            registry=self.registry,
        )


@router.get("/metrics", summary="Prometheus metrics: the write-behind pipeline per shard")
async def metrics(request: Request) -> Response:
    state = request.app.state
    gauges: PipelineGauges = state.gauges
    for s in await pipeline_status(state.redis, state.pg, state.keys):
        shard = str(s.shard)
        gauges.length.labels(shard).set(s.backlog.length)
        gauges.pending.labels(shard).set(s.backlog.pending)
        gauges.undelivered.labels(shard).set(s.backlog.undelivered)
        gauges.oldest.labels(shard).set(s.oldest_unpersisted_age_s)
        gauges.ready.labels(shard).set(1 if s.ready else 0)
        if s.persisted_total is not None:
            gauges.persisted.labels(shard).set(s.persisted_total)
    return Response(generate_latest(gauges.registry), media_type=CONTENT_TYPE_LATEST)
