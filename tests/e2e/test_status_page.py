"""The status page in a real browser (Debian's headless chromium, driven by Selenium) against a
real `tm run`: it loads with no console error, shows the running workers and their partitions,
shows a dead letter the test caused with its reason, finds a task by id, and keeps task data
behind the API token.

The browser and its driver are the system's (``stack/tools.sh`` installs them): Selenium is
given both paths, so it never looks for or downloads one. A screenshot goes to the test's
directory, and to ``docs/img/status-page.png`` when ``TM_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from harness import wait_for
from harness.stack import Stack
from harness.tm import TmRun
from tm.traffic import new_task_message

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "status-page-token"
README_SCREENSHOT = Path(__file__).parents[2] / "docs" / "img" / "status-page.png"
PAGE_TIMEOUT_S = 60.0


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} missing: run 'bash stack/tools.sh' (as root) to install it")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1100")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def status_of(port: int, path: str) -> int:
    """The status the API answers ``path`` with, without a token; 0: nobody listening."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        with error:
            return error.code
    except (ConnectionError, urllib.error.URLError):
        return 0


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def wait_text(driver: WebDriver, element_id: str, pattern: str) -> str:
    """The panel's text, once it matches ``pattern``."""
    return wait_for(
        lambda: re.search(pattern, found := text(driver, element_id)) and found,
        timeout_s=PAGE_TIMEOUT_S,
        what=f"#{element_id} matching {pattern!r}",
    )


def severe(driver: WebDriver) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry for entry in entries if entry["level"] == "SEVERE"]


def test_the_status_page_shows_a_live_tm_and_keeps_task_data_behind_the_token(
    stack: Stack, tmp_path: Path, browser: WebDriver
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", API_TOKEN=TOKEN)
    try:
        wait_for(
            lambda: status_of(tm.port, "/api/health/ready") == 200,
            timeout_s=PAGE_TIMEOUT_S,
            what="tm ready",
        )
        task_id = str(uuid.uuid4())
        headers, value = new_task_message(1)
        stack.produce(
            [
                (None, [*headers, ("task_id", task_id.encode())], value),
                (None, headers, b"{not json"),
            ]
        )
        wait_for(lambda: stack.count(f"id = '{task_id}'") == 1, what="the task stored")
        pids = tm.worker_pids()

        browser.get(f"http://127.0.0.1:{tm.port}/")
        # Without the token: the live group, and task data refused.
        workers = wait_text(browser, "workers", r"joined.*\n.*joined")
        for pid in pids:
            assert str(pid) in workers
        partitions = wait_text(browser, "partitions", r"worker [01]")
        assert re.search(rf"\n{stack.partitions - 1} worker [01] \d+ \d+ \d+ ok", partitions)
        wait_text(browser, "health", r"healthy")
        wait_text(browser, "rates", r"consumed")
        wait_text(browser, "reasons", r"invalid_json 1")
        assert "token required" in wait_text(browser, "dead-letters", r"token required")
        assert "token required" in text(browser, "task")
        assert status_of(tm.port, "/api/dead-letters") == 401
        assert status_of(tm.port, f"/api/tasks/{task_id}") == 401
        assert severe(browser) == []

        # With the token: the dead letter with its reason, and the lookup.
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-form").submit()
        dead = wait_text(browser, "dead-letters", r"invalid_json")
        assert "{not json" in dead
        browser.find_element(By.ID, "task-id").send_keys(task_id)
        browser.find_element(By.ID, "lookup").submit()
        found = wait_text(browser, "task", task_id)
        assert "user1@example.com" in found and re.search(r"status (new|completed)", found)
        wait_text(browser, "rates", r"over the last \d+ s")
        assert severe(browser) == []
        browser.save_screenshot(str(tmp_path / "status-page.png"))
        if os.environ.get("TM_UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(tmp_path / "status-page.png", README_SCREENSHOT)

        # A wrong token is refused, in the page as by the endpoint.
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.ID, "token-form").submit()
        wait_text(browser, "dead-letters", r"refused")
        browser.find_element(By.ID, "lookup").submit()
        wait_text(browser, "task", r"refused")
    finally:
        assert tm.stop() == 0, tm.output()
