"""The HTTP API of tm, served by a child of the supervisor (the "API process") on APP_PORT.

It never touches the pipeline. What it knows of the workers comes from the supervisor's state
lines (one JSON object a line on ``state_fd``); what it knows of PostgreSQL and Kafka comes from
its own long-lived clients. See :mod:`tm.api.server`.
"""

from __future__ import annotations

from tm.api.server import main

__all__ = ["main"]
