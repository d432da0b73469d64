"""What every handler may reach: the settings, the supervisor's view, the dependency clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from tm.api.counts import SharedCounts
from tm.api.database import ApiDatabase
from tm.api.kafka_watch import KafkaWatch
from tm.api.state import StateReader
from tm.config import Settings

if TYPE_CHECKING:
    from tm.api.redis_watch import RedisWatch


@dataclass(frozen=True, slots=True)
class Api:
    settings: Settings
    state: StateReader
    database: ApiDatabase
    kafka: KafkaWatch
    registry: CollectorRegistry  # what GET /metrics renders
    counts: SharedCounts  # the answers of get_web_crawl_metrics, shared between requests
    started_at: float  # time.time() when this API process started
    redis: RedisWatch | None = None  # REDIS_URL set: the task-event feed's Redis, for display


API_KEY = web.AppKey("api", Api)


def api_of(request: web.Request) -> Api:
    return request.app[API_KEY]
