"""Helpers for the monitoring endpoints' tests: HTTP probes, and a Redis server
of the test's own that it may stop and start again."""

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import free_port


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
