"""The StatefulSet's claim (docs/kubernetes.md): a pod restarted under its stable
name, with the manifests' KAFKA_GROUP_INSTANCE_ID (the pod's name) and KAFKA_SESSION_TIMEOUT,
gets its partitions back without a rebalance: the other pod's workers see no revocation and
no new assignment. Two `tm run` processes stand for pods tm-0 and tm-1; tm-1 is stopped
(SIGTERM, as the kubelet does) and started again. The same restart without an instance id does
rebalance, which shows that the test can see one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import wait_for
from harness.stack import Stack, make_stack
from harness.tm import TmRun
from tests.k8s.conftest import build, tm_config
from tm.config import Settings

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    with make_stack(settings, partitions=6) as made:
        yield made


def _restart_tm_1(
    stack: Stack, tmp_path: Path, env: dict[str, str], static: bool
) -> list[tuple[str, list[int]]]:
    """Start tm-0 and tm-1 (2 workers each), restart tm-1; tm-0's assign/revoke lines after."""
    ids = {"tm-0": {"KAFKA_GROUP_INSTANCE_ID": "tm-0"}, "tm-1": {"KAFKA_GROUP_INSTANCE_ID": "tm-1"}}
    if not static:
        ids = {"tm-0": {}, "tm-1": {}}
    tm0 = TmRun(stack, tmp_path, **env, **ids["tm-0"])
    tm1 = TmRun(stack, tmp_path, **env, **ids["tm-1"])
    try:

        def settled() -> bool:
            mine, theirs = tm0.owned(), tm1.owned()
            return bool(mine and theirs) and len(mine | theirs) == 6 == stack.group_assigned()

        wait_for(settled, timeout_s=60, what="6 partitions over the 4 workers")
        before = len(tm0.rebalance_events())
        owned = tm1.owned()
        assert tm1.stop() == 0
        tm1 = TmRun(stack, tmp_path, **env, **ids["tm-1"])
        wait_for(lambda: stack.group_assigned() == 6, timeout_s=60, what="the group stable again")
        if static:  # its static members get back what they had
            wait_for(lambda: tm1.owned() == owned, timeout_s=30, what=f"tm-1 owning {owned}")
        else:
            wait_for(lambda: tm1.owned(), timeout_s=30, what="tm-1 owning partitions")
        return [(kind, parts) for _, kind, parts in tm0.rebalance_events()[before:]]
    finally:
        tm1.stop()
        tm0.stop()


def test_a_restarted_pod_gets_its_partitions_back_without_a_rebalance(
    stack: Stack, kustomize: str, tmp_path: Path
) -> None:
    config = tm_config(build(kustomize, "prod"))["data"]
    env = {"TM_WORKERS": "2", "KAFKA_SESSION_TIMEOUT": config["KAFKA_SESSION_TIMEOUT"]}
    assert _restart_tm_1(stack, tmp_path, env, static=True) == []


def test_without_an_instance_id_the_same_restart_rebalances(
    stack: Stack, kustomize: str, tmp_path: Path
) -> None:
    config = tm_config(build(kustomize, "prod"))["data"]
    env = {"TM_WORKERS": "2", "KAFKA_SESSION_TIMEOUT": config["KAFKA_SESSION_TIMEOUT"]}
    assert _restart_tm_1(stack, tmp_path, env, static=False) != []
