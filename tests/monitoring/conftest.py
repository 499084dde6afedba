"""Helpers for the monitoring tests: HTTP probes, the dashboard's sample
storage, and a webhook receiver."""

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from monitoring.samples import DatabaseSamples, RedisSamples, store


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and body, for error statuses too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def get_json(url: str) -> tuple[int, dict]:
    status, body = get(url, {"Accept": "application/json"})
    return status, json.loads(body)


def wait_for_status(url: str, expected: int, timeout: float = 20) -> dict:
    """Polls until the endpoint answers `expected`, as a kubelet would."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get_json(url)
        if status == expected:
            return body
        assert time.monotonic() < deadline, f"{url} still answers {status}: {body}"
        time.sleep(0.3)


@pytest.fixture(params=["redis", "database"])
def sample_store(request: pytest.FixtureRequest, settings, transactional_db: None) -> Iterator[RedisSamples | DatabaseSamples]:
    """The dashboard's sample storage: Redis (when REDIS_URL is set) or the database, under a key of the test's own."""
    if request.param == "database":
        settings.REDIS_URL = ""
    elif not settings.REDIS_URL:
        pytest.fail("This test needs Redis: run the suite with `bash tests/run.sh`.")
    settings.MONITORING_SAMPLES_KEY = f"test:monitoring:{uuid.uuid4().hex}"
    store.cache_clear()
    yield store()
    if request.param == "redis":
        store().client.delete(settings.MONITORING_SAMPLES_KEY)
    store.cache_clear()


@dataclass
class Webhook:
    """An HTTP server on loopback that records the JSON bodies POSTed to it."""

    url: str
    received: list[dict] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"the webhook got {self.received}"
            time.sleep(0.05)
        return self.received


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(url="")

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()


def make_sample(t: float, process: str = "host:1", seconds: float = 5.0, **values: object) -> dict:
    """A sample as a process's sampler stores it; unnamed values are zero."""
    return {
        "t": t, "process": process, "role": "server", "seconds": seconds, "ready": True,
        "http_requests": 0, "http_errors": 0, "signaling_received": 0, "signaling_errors": 0,
        "cache_hits": 0, "cache_misses": 0, "cpu_seconds": 0.0,
        "websocket_connections": 0, "db_pool_in_use": 0, "db_pool_size": 0, "memory_bytes": 0,
        **values,
    }
