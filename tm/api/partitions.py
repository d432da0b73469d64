"""``GET /api/partitions``: the consumer group as the status page shows it.

This tm's workers (slot, pid, uptime, restarts, the partitions each owns), and per partition of
the task-status topic its committed offset, end offset, lag, whether it is stalled, and which
member owns it. Everything is read from what the API process already holds: the supervisor's
latest state line, the last answers of :class:`~tm.api.kafka_watch.KafkaWatch` (group
description, offsets) and ``/proc``. No request reaches the broker or the database.

A worker is matched to its group member by the client id (``<KAFKA_CLIENT_ID>-<slot>``) and,
under static membership, the instance id (``<KAFKA_GROUP_INSTANCE_ID>-<slot>``). When several
members match (two pods with the same client id and dynamic membership), the worker's partitions
are not known (``null``): the count from the state line still is.
"""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from tm.adapters.kafka.tools import Group, Member
from tm.api.context import api_of
from tm.api.kafka_watch import Lag
from tm.api.responses import json_response, now_iso
from tm.api.state import WorkerState
from tm.connections import KafkaSettings

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_STARTTIME_FIELD = 19  # of /proc/<pid>/stat, counted after the command's closing parenthesis


def process_uptime_s(stat: str, system_uptime_s: float) -> float | None:
    """Seconds a process has run, from its ``/proc/<pid>/stat`` line and the system's uptime
    (the first field of ``/proc/uptime``); None when the line cannot be read."""
    fields = stat.rpartition(")")[2].split()
    try:
        started_s = int(fields[_STARTTIME_FIELD]) / _TICKS_PER_S
    except (IndexError, ValueError):
        return None
    return max(0.0, system_uptime_s - started_s)


def _uptime_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as stat, open("/proc/uptime") as uptime:
            return process_uptime_s(stat.read(), float(uptime.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def member_of(slot: int, group: Group | None, settings: KafkaSettings) -> Member | None:
    """The group member that is this tm's worker in ``slot``; None when none or several are."""
    if group is None:
        return None
    instance = f"{settings.group_instance_id}-{slot}" if settings.group_instance_id else None
    found = [
        m
        for m in group.members
        if m.client_id == f"{settings.client_id}-{slot}" and m.instance_id == instance
    ]
    return found[0] if len(found) == 1 else None


def worker_json(worker: WorkerState, member: Member | None) -> dict[str, Any]:
    uptime_s = _uptime_s(worker.pid) if worker.pid else None
    return {
        "slot": worker.slot,
        "pid": worker.pid,
        "joined": worker.joined,
        "retrying": worker.retrying,
        "restarts": worker.restarts,
        "uptimeS": None if uptime_s is None else round(uptime_s, 1),
        "partitionCount": worker.partitions,
        "partitions": list(member.partitions) if member is not None else None,
    }


def partitions_json(
    lag: Lag, group: Group | None, slots: dict[Member, int]
) -> list[dict[str, Any]]:
    """Per partition: offsets, lag, stalled, and the owning member (with its slot when it is
    one of this tm's workers)."""
    owners = {p: m for m in (group.members if group else ()) for p in m.partitions}
    answer = []
    for partition in sorted(lag.by_partition):
        owner = owners.get(partition)
        answer.append(
            {
                "partition": partition,
                "committed": lag.committed.get(partition),
                "end": lag.ends.get(partition),
                "lag": lag.by_partition[partition],
                "stalled": partition in lag.stalled,
                "owner": None
                if owner is None
                else {"clientId": owner.client_id, "host": owner.host, "slot": slots.get(owner)},
            }
        )
    return answer


async def get_partitions(request: web.Request) -> web.Response:
    api = api_of(request)
    settings = api.settings.kafka
    lag, group = api.kafka.lag, api.kafka.group
    members = {w.slot: member_of(w.slot, group, settings) for w in api.state.current.workers}
    slots = {member: slot for slot, member in members.items() if member is not None}
    return json_response(
        {
            "topic": settings.task_status_topic,
            "groupId": settings.group_id,
            "groupStable": None if group is None else group.is_stable,
            "fresh": lag.is_fresh(time.monotonic()),
            "workers": [worker_json(w, members[w.slot]) for w in api.state.current.workers],
            "partitions": partitions_json(lag, group, slots),
            "timestamp": now_iso(),
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/partitions", get_partitions)
