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


# name -> help; every gauge is per shard, read from Redis and PostgreSQL at scrape time
GAUGES = {
    "stockhold_stream_length": "Entries in the shard's event stream",
    "stockhold_stream_pending": "Events delivered to a worker and not yet acknowledged",
    "stockhold_stream_undelivered": "Events no worker has read yet",
    "stockhold_oldest_unpersisted_event_age_seconds": "Age of the oldest event not yet in PostgreSQL (0: none)",
    "stockhold_shard_ready": "1 when the shard is rebuilt and serving, 0 while it awaits a rebuild",
    "stockhold_events_persisted": "Events the write-behind workers have written for the shard",
}


class PipelineGauges:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(name, text, ["shard"], registry=self.registry) for name, text in GAUGES.items()}

    def set(self, name: str, shard: int, value: float) -> None:
        self.gauges[name].labels(str(shard)).set(value)


@router.get("/metrics", summary="Prometheus metrics: the write-behind pipeline per shard")
async def metrics(request: Request) -> Response:
    state = request.app.state
    gauges: PipelineGauges = state.gauges
    for s in await pipeline_status(state.redis, state.pg, state.keys):
        gauges.set("stockhold_stream_length", s.shard, s.backlog.length)
        gauges.set("stockhold_stream_pending", s.shard, s.backlog.pending)
        gauges.set("stockhold_stream_undelivered", s.shard, s.backlog.undelivered)
        gauges.set("stockhold_oldest_unpersisted_event_age_seconds", s.shard, s.oldest_unpersisted_age_s)
        gauges.set("stockhold_shard_ready", s.shard, 1 if s.ready else 0)
        if s.persisted_total is not None:
            gauges.set("stockhold_events_persisted", s.shard, s.persisted_total)
    return Response(generate_latest(gauges.registry), media_type=CONTENT_TYPE_LATEST)
