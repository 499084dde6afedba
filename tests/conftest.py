"""Fixtures shared by the whole suite: named people, live servers, WebSocket clients."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import websockets
from channels.layers import channel_layers
from django.conf import settings
from django.db import connection
from django.db.models import F
from playwright.sync_api import Browser, sync_playwright

from lobbies import cache, selectors, services
from lobbies.models import Session
from voicebot.server import uvicorn_command

PROJECT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def test_database_released(django_db_setup: None) -> Iterator[None]:
    """Lets pytest-django drop the test database at the end: threads that ran
    ORM work (database_sync_to_async's, the roster thread) still hold the
    connections they took from the pool, and Postgres refuses to drop a
    database in use (after waiting 5 s)."""
    yield
    database = connection.settings_dict
    if connection.vendor == "postgresql":
        with psycopg.connect(
            host=database["HOST"], port=database["PORT"] or 5432, user=database["USER"],
            password=database["PASSWORD"], dbname="postgres", autocommit=True,
        ) as maintenance:
            maintenance.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [database["NAME"]]
            )


@dataclass
class Person:
    """Someone with a session: what a client knows after POST /api/sessions/."""

    id: str
    name: str
    token: str


def make_person(name: str) -> Person:
    session, token = services.session_create(name=name)
    return Person(id=str(session.id), name=session.name, token=token)


def leave_unused(person: Person, days: float) -> None:
    """As if `days` passed without the session being used: its last use moves
    back by as much, and its cached copies, which live LOCAL_CACHE_TTL_SECONDS,
    are gone."""
    Session.objects.filter(pk=person.id).update(last_seen_at=F("last_seen_at") - timedelta(days=days))
    key = selectors.session_cache_key(selectors.token_hash(person.token))
    cache.local.forget(key)
    cache.shared.delete(key)


@pytest.fixture
def alice(transactional_db: None) -> Person:
    return make_person("Alice")


@pytest.fixture
def bob(transactional_db: None) -> Person:
    return make_person("Bob")


@pytest.fixture
def carol(transactional_db: None) -> Person:
    return make_person("Carol")


@pytest.fixture(params=["redis", "memory"])
def channel_layer(request: pytest.FixtureRequest, settings) -> Iterator[str]:
    """Run the test over the Redis channel layer and over the in-memory one."""
    if request.param == "memory":
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    elif not settings.REDIS_URL:
        pytest.fail("REDIS_URL is not set: run the suite with `bash tests/run.sh`.")
    else:
        # A prefix of its own, so no group or queue left by another test can interfere.
        layer = settings.CHANNEL_LAYERS["default"]
        config = {**layer["CONFIG"], "prefix": f"test-{uuid.uuid4().hex[:12]}"}
        settings.CHANNEL_LAYERS = {"default": {**layer, "CONFIG": config}}
    # Layers hold connections bound to an event loop; every test gets fresh ones.
    channel_layers.backends = {}
    yield request.param
    channel_layers.backends = {}


def set_channel_capacity(settings, capacity: int) -> None:
    layer = settings.CHANNEL_LAYERS["default"]
    settings.CHANNEL_LAYERS = {"default": {**layer, "CONFIG": {**layer.get("CONFIG", {}), "capacity": capacity}}}
    channel_layers.backends = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class OwnRedis:
    """A Redis server of the test's own, which it may stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    redis.start()
    yield redis
    redis.stop()


@dataclass
class LiveServer:
    process: subprocess.Popen
    port: int
    log: Path | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def production_command(port: int) -> list[str]:
    """The production command of docs/deploying.md."""
    return uvicorn_command(port)


def runserver_command(port: int) -> list[str]:
    """The development command of the README."""
    return [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]


def start_server(
    env: dict[str, str], log_path: Path, command: Callable[[int], list[str]] = production_command
) -> LiveServer:
    """Start a server for the project on a free loopback port."""
    port = free_port()
    log = log_path.open("ab")
    process = subprocess.Popen(
        command(port),
        cwd=PROJECT_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(process=process, port=port, log=log_path)
    try:
        wait_for_http(f"{server.http}/healthz", process=process)
    except Exception:
        server.stop()
        raise RuntimeError(f"server did not start; its log: {log_path.read_text()[-3000:]}")
    return server


def embedded_env(data_dir: Path) -> dict[str, str]:
    """The environment of a bare machine: no database, Redis or secret configured."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY"}}
    env["VOICEBOT_DATA_DIR"] = str(data_dir)
    return env


def production_env() -> dict[str, str]:
    """Postgres (the test database) and Redis, as the running test process uses them."""
    db = settings.DATABASES["default"]
    if not db["ENGINE"].endswith(".postgresql") or not settings.REDIS_URL:
        pytest.fail("This test needs Postgres and Redis: run the suite with `bash tests/run.sh`.")
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{credentials}@{host}:{port}/{db['NAME']}"
    return env


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server on the embedded default, migrated, as the README's first command runs it."""
    env = embedded_env(tmp_path)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=PROJECT_DIR, env=env, check=True
    )
    server = start_server(env, tmp_path / "server.log", runserver_command)
    yield server
    server.stop()


@pytest.fixture
def start_production_server(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Starts server processes sharing the test database and Redis; stops them all afterwards."""
    servers: list[LiveServer] = []

    def start(**extra_env: str) -> LiveServer:
        server = start_server({**production_env(), **extra_env}, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def production_servers(start_production_server: Callable[..., LiveServer]) -> list[LiveServer]:
    """Two server processes sharing the test database and Redis."""
    return [start_production_server(), start_production_server()]


def http_json(url: str, body: dict | None = None, token: str = "") -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as response:
        return json.loads(response.read())


class LiveClient:
    """A non-browser client of a live server: HTTP for the session, then the lobby WebSocket."""

    def __init__(self, server: LiveServer, name: str) -> None:
        self.server = server
        session = http_json(f"{server.http}/api/sessions/", {"name": name})
        self.id: str = session["id"]
        self.token: str = session["token"]
        self.socket: websockets.ClientConnection | None = None

    async def join(self, lobby: str, server: LiveServer | None = None) -> dict:
        """Connect to the lobby, on `server` if given (a reconnection may land on another process)."""
        self.server = server or self.server
        url = f"{self.server.ws}/ws/lobby/{lobby}/?token={self.token}"
        self.socket = await websockets.connect(url, open_timeout=10)
        welcome = await self.receive()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def send(self, frame: dict) -> None:
        await self.socket.send(json.dumps(frame))

    async def receive(self, timeout: float = 5) -> dict:
        return json.loads(await asyncio.wait_for(self.socket.recv(), timeout))

    async def close(self, code: int = 1000) -> None:
        """Leave (1000) or, with another code, drop the connection as a lost network would."""
        if self.socket is not None:
            await self.socket.close(code=code)


async def negotiate(offerer: LiveClient, answerer: LiveClient) -> None:
    """An offer, its answer and an ICE candidate between two people, each received as sent."""
    await offerer.send({"type": "offer", "to": answerer.id, "sdp": "v=0 offer"})
    assert await answerer.receive() == {"type": "offer", "to": answerer.id, "sdp": "v=0 offer", "from": offerer.id}
    await answerer.send({"type": "answer", "to": offerer.id, "sdp": "v=0 answer"})
    assert (await offerer.receive())["sdp"] == "v=0 answer"
    candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0"}
    await answerer.send({"type": "ice", "to": offerer.id, "candidate": candidate})
    assert (await offerer.receive())["candidate"] == candidate


@contextmanager
def chromium() -> Iterator[Browser]:
    """Opened after the test's database work: Playwright's sync API runs an
    event loop in this thread, where the ORM refuses to work."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            headless=True,
            args=["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
        )
        yield browser
        browser.close()


def run_browser_scenario(scenario: Path, timeout: float) -> dict:
    """Run a browser scenario script on the embedded default inside a fresh
    network namespace that has only loopback, so no media, STUN, DNS or provider
    traffic can leave the machine and ICE can only succeed on 127.0.0.1.
    Returns the JSON object it prints last, after checking it succeeded."""
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY")}
    # The scenario's path and interpreter go in as arguments, so no quoting is needed.
    command = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$1"', sys.executable, str(scenario)]
    # Its own process group, so a timeout also ends the server and browser it started.
    process = subprocess.Popen(
        command, cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{scenario.name} took over {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr[-4000:]}")
    lines = stdout.strip().splitlines()
    assert lines, f"the scenario printed nothing (exit {process.returncode})\nstderr:\n{stderr[-4000:]}"
    results = json.loads(lines[-1])
    assert process.returncode == 0 and results["ok"], f"{results.get('error')}\n{json.dumps(results, indent=2)}\n{stderr[-4000:]}"
    return results
