"""The caches in front of the database: correct across processes, harmless when Redis is away."""

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from django.core.cache import caches

from lobbies import cache, selectors, services
from lobbies.models import Lobby, Session
from tests.conftest import LiveClient, LiveServer, Person, free_port, http_json


def detail(server: LiveServer, lobby: str) -> list[str]:
    return [peer["name"] for peer in http_json(f"{server.http}/api/lobbies/{lobby}/")["participants"]]


async def test_two_processes_never_serve_a_stale_roster(production_servers: list[LiveServer]) -> None:
    one, two = production_servers
    alice, bob = LiveClient(one, "Alice"), LiveClient(two, "Bob")

    await alice.join("shared")
    assert detail(two, "shared") == ["Alice"]
    await bob.join("shared")
    assert detail(one, "shared") == ["Alice", "Bob"]
    await alice.close()
    assert (await bob.receive())["type"] == "peer_left"
    assert detail(one, "shared") == detail(two, "shared") == ["Bob"]
    await bob.close()


async def test_a_renamed_session_is_seen_at_once_by_every_process(
    production_servers: list[LiveServer], transactional_db: None
) -> None:
    one, two = production_servers
    alice = LiveClient(one, "Alice")
    await alice.join("names")  # process one now caches Alice's identity
    await alice.close()

    session = await Session.objects.aget(pk=alice.id)
    session.name = "Alice Liddell"
    await session.asave()  # as an admin would; every process is told to forget it

    deadline = time.monotonic() + 5
    while (await alice.join("names"))["name"] != "Alice Liddell":
        assert time.monotonic() < deadline, "process one kept the old name"
        await alice.close()
    await alice.close()


@pytest.fixture
def redis_we_can_stop(settings) -> Iterator[Callable[[], None]]:
    """A Redis server of the test's own as the cache, which the test may stop and start."""
    port = free_port()
    command = [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    processes: list[subprocess.Popen] = []

    def start() -> None:
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop() -> None:
        processes[-1].terminate()
        processes[-1].wait(timeout=10)

    start()
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
    yield start, stop
    stop()
    caches["default"].close()


@pytest.mark.django_db
def test_with_redis_down_lookups_fall_back_to_the_database_and_recover(
    redis_we_can_stop, alice: Person, caplog: pytest.LogCaptureFixture
) -> None:
    start, stop = redis_we_can_stop
    Lobby.objects.create(name="outage")
    services.lobby_join(lobby_name="outage", session=Session.objects.get(pk=alice.id), channel_name="c!1")
    assert selectors.lobby_detail(name="outage")["participants"][0]["name"] == "Alice"
    hits = cache.stats[("shared", "hit")]
    assert selectors.lobby_detail(name="outage")["participant_count"] == 1
    assert cache.stats[("shared", "hit")] == hits + 1

    stop()
    errors = cache.stats[("shared", "error")]
    with caplog.at_level(logging.WARNING, logger="lobbies.cache"):
        cache.shared.last_warning = 0
        assert selectors.lobby_detail(name="outage")["participant_count"] == 1
    assert cache.stats[("shared", "error")] > errors
    assert "using the database instead" in caplog.text

    start()
    deadline = time.monotonic() + 10
    hits = cache.stats[("shared", "hit")]
    while cache.stats[("shared", "hit")] == hits:
        assert time.monotonic() < deadline, "the cache did not come back"
        assert selectors.lobby_detail(name="outage")["participant_count"] == 1
        time.sleep(0.1)
