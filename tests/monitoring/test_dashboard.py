"""The staff performance dashboard: who may see it, what the page and its data
endpoint hold, its static files on a running server, the deployment-wide
numbers of several processes, and the embedded default's samples surviving a
restart."""

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import Client

from monitoring import selectors
from monitoring.models import AlertRule
from monitoring.samples import SERIES, DatabaseSamples, RedisSamples, store
from tests.bots.conftest import close_thread_connections, staff_client, start_bot_worker  # noqa: F401
from tests.conftest import (
    PROJECT_DIR,
    LiveClient,
    LiveServer,
    embedded_env,
    runserver_command,
    start_server,
)
from tests.monitoring.conftest import get, make_sample

PAGE = "/admin/dashboard/"
DATA = "/admin/dashboard/data"
WINDOWS = [("900", "15 minutes"), ("3600", "1 hour"), ("10800", "3 hours"), ("21600", "6 hours")]
DATA_KEYS = {"window", "step", "now", "refresh_seconds", "storage", "processes", "series", "rules", "events"}
WAIT_SECONDS = 20


# --- access, page and data (in-process) --------------------------------------------


@pytest.fixture
def member_client(transactional_db: None) -> Client:
    """Logged in, but not staff."""
    client = Client()
    client.force_login(User.objects.create_user("member", "member@example.com", "member-password"))
    return client


def assert_sent_to_login(response: Any, path: str) -> None:
    assert response.status_code == 302, (response.status_code, response.content[:300])
    location = urlsplit(response["Location"])
    assert location.path == "/admin/login/", response["Location"]
    assert parse_qs(location.query)["next"] == [path], response["Location"]


@pytest.mark.parametrize("path", [PAGE, f"{DATA}?window=900"])
def test_anonymous_and_non_staff_are_sent_to_the_admin_login(path: str, member_client: Client) -> None:
    assert_sent_to_login(Client().get(path), path)
    assert_sent_to_login(member_client.get(path), path)


def test_staff_get_the_page_with_its_windows_and_external_scripts_only(staff_client: Client) -> None:  # noqa: F811
    response = staff_client.get(PAGE)

    assert response.status_code == 200
    assert "no-cache" in response["Cache-Control"]
    page = response.content.decode()
    assert "Performance dashboard" in page
    select = re.search(r'<select id="window">(.*?)</select>', page, re.DOTALL)
    assert select, page
    options = re.findall(r'<option value="(\d+)"( selected)?>([^<]*)</option>', select.group(1))
    assert [(value, label) for value, _, label in options] == WINDOWS
    assert [value for value, selected, _ in options if selected] == ["3600"]
    assert f'data-url="{DATA}"' in page

    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.DOTALL)
    sources = [re.search(r'src="([^"]+)"', attributes) for attributes, _ in scripts]
    inline = [body for (_, body), source in zip(scripts, sources) if body.strip() or source is None]
    assert inline == [], "inline <script> code would need a CSP exception"
    sources = [source.group(1) for source in sources if source]
    assert "/static/monitoring/vendor/uplot/uPlot.iife.min.js" in sources, sources
    assert "/static/monitoring/dashboard.js" in sources, sources


def test_staff_get_the_data_of_the_stored_samples(
    staff_client: Client, sample_store: RedisSamples | DatabaseSamples  # noqa: F811
) -> None:
    now = time.time()
    # 50 requests over 5 s on one process, 10 over 5 s on another: 12 a second deployment-wide.
    sample_store.add(make_sample(now - 30, process="web-1:101", http_requests=50, memory_bytes=100 * 2**20))
    sample_store.add(make_sample(now - 30, process="web-2:102", http_requests=10, memory_bytes=50 * 2**20))
    AlertRule.objects.create(name="Busy", metric="http_requests_per_second", comparison=">", threshold=100)

    response = staff_client.get(DATA, {"window": 900})

    assert response.status_code == 200
    assert "no-cache" in response["Cache-Control"]
    data = response.json()
    assert set(data) == DATA_KEYS
    assert data["window"] == 900
    assert data["storage"] == sample_store.name
    assert data["refresh_seconds"] >= 1
    assert [(p["process"], p["role"]) for p in data["processes"]] == [("web-1:101", "server"), ("web-2:102", "server")]
    series = data["series"]
    assert set(series) == {"t", *SERIES}
    assert len(series["t"]) >= 900 / data["step"]
    assert {name: len(values) for name, values in series.items()} == dict.fromkeys(series, len(series["t"]))
    assert [v for v in series["http_requests_per_second"] if v is not None] == [12.0]
    assert [v for v in series["memory_mb"] if v is not None] == [150.0]
    assert [rule["name"] for rule in data["rules"]] == ["Busy"]
    assert data["events"] == []


@pytest.mark.parametrize("window", ["abc", "61", "", "900.5"])
def test_a_window_not_offered_is_refused_naming_the_allowed_ones(staff_client: Client, window: str) -> None:  # noqa: F811
    response = staff_client.get(DATA, {"window": window})

    assert response.status_code == 400
    error = response.json()["error"]
    for seconds, _ in WINDOWS:
        assert seconds in error, error


# --- static files on a running server ---------------------------------------------------


def test_the_running_server_serves_the_dashboard_scripts(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server()
    for path in ("monitoring/vendor/uplot/uPlot.iife.min.js", "monitoring/dashboard.js"):
        request = f"{server.http}/static/{path}"
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert "javascript" in response.headers["Content-Type"], response.headers["Content-Type"]
            body = response.read()
        assert body == (PROJECT_DIR / "monitoring/static" / path).read_bytes()


# --- deployment-wide numbers ------------------------------------------------------------


@pytest.fixture
def samples_key(settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Redis key of the test's own for the samples, in this process and in the processes it starts."""
    if not settings.REDIS_URL:
        pytest.fail("This test needs Redis: run the suite with `bash tests/run.sh`.")
    key = f"test:dashboard:{uuid.uuid4().hex}"
    settings.MONITORING_SAMPLES_KEY = key
    settings.MONITORING_SAMPLE_SECONDS = 1
    # start_bot_worker takes no extra environment: its processes inherit this one's.
    monkeypatch.setenv("MONITORING_SAMPLES_KEY", key)
    monkeypatch.setenv("MONITORING_SAMPLE_SECONDS", "1")
    store.cache_clear()
    yield key
    store().client.delete(key)
    store.cache_clear()


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def highest(values: list[float | None]) -> float | None:
    seen = [value for value in values if value is not None]
    return max(seen) if seen else None


async def wait_for_type(client: LiveClient, kind: str, **fields: object) -> dict:
    while True:
        frame = await client.receive()
        if frame["type"] == kind and all(frame.get(name) == value for name, value in fields.items()):
            return frame


async def test_the_dashboard_adds_up_every_process_of_the_deployment(
    samples_key: str,
    start_production_server: Callable[..., LiveServer],
    start_bot_worker: Callable,  # noqa: F811
    close_thread_connections: None,  # noqa: F811
) -> None:
    env = {"MONITORING_SAMPLE_SECONDS": "1", "MONITORING_SAMPLES_KEY": samples_key}
    first, second = start_production_server(**env), start_production_server(**env)
    worker = await sync_to_async(start_bot_worker)(first)
    expected = {
        first.process.pid: "server",
        second.process.pid: "server",
        worker.process.pid: "bots",
    }

    for server in (first, second):
        for path in ("/healthz", "/readyz", "/"):
            status, _ = await asyncio.to_thread(get, f"{server.http}{path}")
            assert status == 200, (server.http, path, status)
    alice, bob = LiveClient(first, "Alice"), LiveClient(second, "Bob")
    await alice.join("dashboard-lobby")
    await bob.join("dashboard-lobby")
    await wait_for_type(alice, "peer_joined")
    for number in range(3):
        # Each chat crosses from one server process to the other (the Redis channel layer).
        await alice.send({"type": "chat", "text": f"hello {number}"})
        await wait_for_type(bob, "chat", text=f"hello {number}")
        await bob.send({"type": "chat", "text": f"hi {number}"})
        await wait_for_type(alice, "chat", text=f"hi {number}")

    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            data = await sync_to_async(selectors.dashboard_data)(window=900, now=time.time())
            series = data["series"]
            reporting = {int(p["process"].rsplit(":", 1)[1]): p["role"] for p in data["processes"]}
            seen = {name: highest(series[name]) for name in (
                "http_requests_per_second", "signaling_messages_per_second", "websocket_connections", "memory_mb"
            )}
            resident = {pid: resident_mb(pid) for pid in expected}
            if (
                all(reporting.get(pid) == role for pid, role in expected.items())
                and (seen["http_requests_per_second"] or 0) > 0
                and (seen["signaling_messages_per_second"] or 0) > 0
                and (seen["websocket_connections"] or 0) >= 2
                # Memory adds up every process's: most of their resident sizes now
                # (a process grows a little after its sample), more than any one has.
                and (seen["memory_mb"] or 0) >= 0.8 * sum(resident.values())
            ):
                break
            assert time.monotonic() < deadline, (
                f"after {WAIT_SECONDS} s, expected {expected}; processes reporting: {reporting}; "
                f"highest values: {seen}; resident MB now: {resident}"
            )
            await asyncio.sleep(0.5)
    finally:
        await alice.close()
        await bob.close()

    assert data["storage"] == "redis"
    # Gauges add up each process's latest value, not every sample: one connection on each server.
    assert seen["websocket_connections"] == 2, series["websocket_connections"]
    assert seen["memory_mb"] > 1.2 * max(resident.values()), (seen, resident)


# --- the embedded default ---------------------------------------------------------------


def stored_samples(database: Path) -> list[tuple[str, dict]]:
    with sqlite3.connect(database, timeout=10) as connection:
        rows = connection.execute("SELECT process, data FROM monitoring_sample ORDER BY taken_at").fetchall()
    connection.close()
    return [(process, json.loads(data)) for process, data in rows]


def wait_for_samples_of(database: Path, server: LiveServer, log: Path) -> list[tuple[str, dict]]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        rows = stored_samples(database)
        if any(process.endswith(f":{server.process.pid}") for process, _ in rows):
            return rows
        assert time.monotonic() < deadline, (
            f"no sample of pid {server.process.pid} after {WAIT_SECONDS} s; stored: {[p for p, _ in rows]}\n"
            f"{log.read_text()[-2000:]}"
        )
        time.sleep(0.3)


def test_the_embedded_default_keeps_samples_in_sqlite_across_restarts(tmp_path: Path) -> None:
    env = {**embedded_env(tmp_path), "MONITORING_SAMPLE_SECONDS": "1"}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=PROJECT_DIR, env=env, check=True
    )
    database = tmp_path / "db.sqlite3"
    servers: list[LiveServer] = []
    try:
        first = start_server(env, tmp_path / "first.log", runserver_command)
        servers.append(first)
        for _ in range(3):
            assert get(f"{first.http}/healthz")[0] == 200
        rows = wait_for_samples_of(database, first, tmp_path / "first.log")
        first_name = next(process for process, _ in rows if process.endswith(f":{first.process.pid}"))
        for process, data in rows:
            assert (data["process"], data["role"]) == (process, "server")
        first.stop()
        kept = [process for process, _ in stored_samples(database) if process == first_name]
        assert kept

        second = start_server(env, tmp_path / "second.log", runserver_command)
        servers.append(second)
        assert second.process.pid != first.process.pid
        rows = wait_for_samples_of(database, second, tmp_path / "second.log")
        assert len([process for process, _ in rows if process == first_name]) >= len(kept)
        assert {process.rsplit(":", 1)[1] for process, _ in rows} >= {str(first.process.pid), str(second.process.pid)}
    finally:
        for server in servers:
            server.stop()
