"""The alert rules in k8s/prometheus: promtool accepts them, and their own unit tests pass (a case
where each alert fires and one where it does not, in tm-alerts.test.yaml). promtool comes with
Debian's `prometheus` package, which `make test` installs (stack/tools.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[2] / "k8s" / "prometheus"
RULES = RULES_DIR / "tm-alerts.yaml"
RULE_TESTS = RULES_DIR / "tm-alerts.test.yaml"


def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found: run `bash stack/tools.sh` (or `apt-get install prometheus`)",
            pytrace=False,
        )
    done = subprocess.run(
        [promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    assert "SUCCESS" in _promtool("check", "rules", RULES.name)


def test_promtool_unit_tests_pass() -> None:
    assert "SUCCESS" in _promtool("test", "rules", RULE_TESTS.name)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    # A line-based reading (no YAML parser in the venv): each check is an `alertname:` line
    # followed by its `exp_alerts:` line, which is `[]` (quiet) or opens a list (fired).
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    checks = re.findall(
        r"^\s*alertname: (\w+)\n\s*exp_alerts:(.*)$", RULE_TESTS.read_text(), re.MULTILINE
    )
    fired = {name for name, rest in checks if not rest.strip().startswith("[]")}
    quiet = {name for name, rest in checks if rest.strip().startswith("[]")}
    assert len(alerts) == 10
    assert fired == alerts
    assert quiet == alerts
