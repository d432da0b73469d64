"""tm under production-shaped load: ``locust -f loadtests/locustfile.py`` (``make load``,
``make load-ui``; see loadtests/README.md).

Users: :class:`~loadtests.kafka_user.GatewayUser` (gateway `new` events; the crawler that
answers them runs beside them, one per locust process) and :class:`~loadtests.http_user.ApiUser`
(health, counts, task lookups and pages). tm's settings come from the same environment as tm's
(``TASK_STATUS_TOPIC``, ``KAFKA_BROKERS``, ``API_TOKEN``, ...); ``--host`` is tm's API.
"""

from __future__ import annotations

import os
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtests import kafka_user
from loadtests.http_user import ApiUser
from loadtests.kafka_user import GatewayUser, Traffic
from loadtests.options import refuse_non_local
from tm import config

__all__ = ["ApiUser", "GatewayUser"]


# locust's EventHook (locust/event.py) is not annotated: add_listener() returns the listener as is.
@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _start_traffic(environment: Environment, **_: Any) -> None:
    settings = config.load()
    problem = refuse_non_local(host=environment.host or "", brokers=settings.kafka.brokers)
    if problem:
        raise SystemExit(f"loadtests: {problem}; refusing to send traffic there")
    kafka_user.TRAFFIC = Traffic(environment, settings, os.environ.get("API_TOKEN") or None)


@events.test_stop.add_listener  # type: ignore[untyped-decorator]  # as above
def _stop_traffic(environment: Environment, **_: Any) -> None:
    traffic, kafka_user.TRAFFIC = kafka_user.TRAFFIC, None
    if traffic is not None:
        traffic.close()
    # locust's CSV writer writes every CSV_STATS_INTERVAL_SEC and not again at exit: give it
    # one more turn so that the CSV holds the stages finished while draining.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)
