"""The Grafana dashboard as code (stack/dashboard.py): the committed JSON is what the script
builds, and every panel follows the house rules (a unit, the namespace/instance selector,
``$__rate_interval`` for rates)."""

from __future__ import annotations

import json
import re

from stack import dashboard


def test_the_committed_json_is_what_the_script_builds() -> None:
    assert dashboard.OUT.read_text() == dashboard.render(), (
        "k8s/components/monitoring/tm-dashboard.json is stale: run `python -m stack.dashboard`"
    )
    assert dashboard.main(["--check"]) == 0


def test_every_panel_has_a_unit_and_every_query_the_selector() -> None:
    model = json.loads(dashboard.OUT.read_text())
    panels = [p for p in model["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
    for title, expr in dashboard.queries(model):
        assert 'namespace=~"$namespace"' in expr and 'instance=~"$instance"' in expr, title
        # A rate or an increase always over Grafana's own window, never a fixed one.
        windows = re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), (title, windows)
    variables = {v["name"] for v in model["templating"]["list"]}
    assert variables == {"datasource", "namespace", "instance"}


def test_an_expression_is_instantiated_as_prometheus_takes_it() -> None:
    expr = dashboard.rate("tm_messages_applied_total", "outcome")
    assert dashboard.instantiate(expr, "5m") == (
        'sum by (outcome) (rate(tm_messages_applied_total{namespace=~".*", instance=~".*"}[5m]))'
    )
