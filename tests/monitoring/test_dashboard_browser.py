"""The performance dashboard in a real browser (Debian's Chromium through
Playwright), against two server processes on Postgres and Redis.

The screenshot is saved to test-artifacts/dashboard.png.
"""

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy
import pytest
import redis
from django.contrib.auth.models import User
from playwright.sync_api import Browser, Page, expect, sync_playwright

from monitoring.models import AlertRule
from tests.conftest import PROJECT_DIR, LiveClient, LiveServer

ARTIFACTS = PROJECT_DIR / "test-artifacts"
# Rule names come from admins; the page must show this one as text.
HOSTILE_NAME = 'Any traffic <img src=x onerror="window.injected=1">'
WAIT_MS = 30_000


@contextmanager
def chromium() -> Iterator[Browser]:
    """Opened after the test's database work and traffic: Playwright's sync API
    runs an event loop in this thread, where the ORM and asyncio.run refuse to work."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def servers(start_production_server: Callable[..., LiveServer], settings) -> Iterator[list[LiveServer]]:
    """Two processes sampling every second into a Redis key of this test's own."""
    key = f"test:monitoring:{uuid.uuid4().hex}"
    env = {"MONITORING_SAMPLE_SECONDS": "1", "MONITORING_SAMPLES_KEY": key}
    yield [start_production_server(**env), start_production_server(**env)]
    redis.Redis.from_url(settings.REDIS_URL).delete(key)


def log_in(browser: Browser, server: LiveServer, username: str, password: str) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{server.http}/admin/login/?next=/admin/dashboard/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    return page


async def talk(servers: list[LiveServer]) -> None:
    """Two people on different processes join one lobby and exchange signaling and chat."""
    alice, bob = LiveClient(servers[0], "Alice"), LiveClient(servers[1], "Bob")
    await alice.join("dashboard")
    await bob.join("dashboard")
    for number in range(20):
        await alice.send({"type": "chat", "text": f"hello {number}"})
    await asyncio.sleep(3)  # the WebSockets stay open over a few samples
    await alice.close()
    await bob.close()


def chart_points(page: Page, chart: str) -> int:
    return int(page.get_attribute(f'.chart[data-chart="{chart}"]', "data-points") or 0)


def assert_not_blank(screenshot: Path) -> None:
    with av.open(str(screenshot)) as image:
        pixels = next(image.decode(video=0)).to_ndarray(format="rgb24")
    colours = numpy.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"the screenshot has {len(colours)} colours"


def test_others_are_refused(servers: list[LiveServer]) -> None:
    User.objects.create_user("visitor", "visitor@example.com", "visitor-password")
    with chromium() as browser:
        page = log_in(browser, servers[0], "visitor", "visitor-password")
        assert "correct username and password for a staff account" in page.content()
        page.goto(f"{servers[0].http}/admin/dashboard/")
        assert "/admin/login/" in page.url
        assert page.locator("#dashboard").count() == 0


def test_staff_see_every_process_and_a_low_threshold_rule_go_critical(servers: list[LiveServer]) -> None:
    User.objects.create_superuser("sre", "sre@example.com", "sre-password")
    AlertRule.objects.create(
        name=HOSTILE_NAME, metric="http_requests_per_second", comparison=">", threshold=0.01,
        duration_seconds=0, severity=AlertRule.CRITICAL,
    )
    asyncio.run(talk(servers))
    with chromium() as browser:
        page = log_in(browser, servers[0], "sre", "sre-password")
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        rule = page.locator("#rules tbody tr", has_text="Any traffic")
        rule.and_(page.locator('[data-state="critical"]')).wait_for(timeout=WAIT_MS)
        assert rule.inner_text().count("<img") == 1, "the rule's name shows as text"
        assert page.evaluate("window.injected") is None
        page.locator("#events li", has_text="firing").first.wait_for(timeout=WAIT_MS)

        # Both processes have reported, and the charts the traffic moved have points.
        expect(page.locator("#process-count")).to_have_text("2", timeout=WAIT_MS)
        for chart in ("requests", "latency", "websockets", "signaling", "relay", "cpu", "memory", "dbpool", "cache"):
            assert chart_points(page, chart) > 0, chart
        data = page.evaluate(
            "fetch(document.getElementById('dashboard').dataset.url + '?window=900').then(response => response.json())"
        )
        assert max(value or 0 for value in data["series"]["signaling_messages_per_second"]) > 0
        assert max(value or 0 for value in data["series"]["websocket_connections"]) == 2
        assert errors == []

        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert_not_blank(screenshot)
