"""GET /health/: every check with its latency, disk, memory and bot workers, as JSON and HTML."""

import json
from collections.abc import Callable
from datetime import timedelta

from django.utils import timezone

from bots import services as bot_services
from bots.models import Bot, Provider, Worker
from lobbies import services as lobby_services
from tests.conftest import LiveServer, OwnRedis
from tests.monitoring.conftest import get, get_json, wait_for_status

# The test machine's disk and memory are not under test unless a test says so.
ROOMY = {"HEALTH_DISK_MIN_FREE_PERCENT": "0", "HEALTH_MEMORY_MIN_AVAILABLE_PERCENT": "0"}


def page(server: LiveServer) -> str:
    return f"{server.http}/health/?format=json"


def assign_a_bot() -> None:
    provider = Provider.objects.create(name="offline", kind=Provider.Kind.OFFLINE)
    bot = Bot.objects.create(name="Ava", provider=provider, greeting="")
    creator, _ = lobby_services.session_create(name="Creator")
    lobby = lobby_services.lobby_create(name="kitchen", private=False, max_participants=12, created_by=creator)
    bot_services.bot_add_to_lobby(bot=bot, lobby=lobby)


def test_every_check_is_listed_with_its_latency_as_json_and_html(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(**ROOMY)

    status, body = get_json(f"{server.http}/health/")  # Accept: application/json

    assert status == 200, json.dumps(body)
    assert body["status"] == "ok"
    names = {"database:default", "cache", "channel_layer", "disk", "memory", "bot_workers"}
    assert set(body["checks"]) == names
    for check in body["checks"].values():
        assert check["status"] == "ok" and check["latency_ms"] >= 0
    assert "free" in body["checks"]["disk"]["detail"]
    assert get_json(page(server))[1]["checks"].keys() == names

    status, html = get(f"{server.http}/health/", {"Accept": "text/html"})
    assert status == 200
    assert "Health: <span" in html and all(name in html for name in names)


def test_a_nearly_full_disk_is_reported_as_degraded(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server(**{**ROOMY, "HEALTH_DISK_MIN_FREE_PERCENT": "101"})

    status, body = get_json(page(server))

    assert status == 200, json.dumps(body)
    assert body["status"] == "degraded"
    assert body["checks"]["disk"]["status"] == "warning"
    assert "disk nearly full" in body["checks"]["disk"]["message"]


def test_a_stopped_bot_worker_with_bots_assigned_is_a_failure_until_it_beats_again(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(**ROOMY)
    worker = bot_services.worker_register(capacity=8)
    assign_a_bot()
    wait_for_status(page(server), 200)

    # The worker stops: its heartbeat goes stale while a bot is still assigned.
    Worker.objects.filter(pk=worker.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    status, body = get_json(page(server))

    assert status == 503, body
    assert body["status"] == "down"
    bots = body["checks"]["bot_workers"]
    assert bots["status"] == "failed"
    assert "no bot worker is alive" in bots["message"] and worker.name in bots["message"]
    # Readiness does not depend on bot workers: the server still serves people.
    assert get_json(f"{server.http}/readyz")[0] == 200

    # A second worker is alive: the silent one is still reported, as a warning.
    bot_services.worker_register(capacity=8)
    status, body = get_json(page(server))
    assert status == 200, json.dumps(body)
    assert body["status"] == "degraded"
    assert body["checks"]["bot_workers"]["status"] == "warning"
    assert worker.name in body["checks"]["bot_workers"]["message"]

    # The first worker beats again: all clear, without a restart.
    Worker.objects.filter(pk=worker.pk).update(heartbeat_at=timezone.now())
    status, body = get_json(page(server))
    assert status == 200 and body["status"] == "ok", body


def test_redis_down_is_shown_per_check_and_recovers(
    start_production_server: Callable[..., LiveServer], own_redis: OwnRedis
) -> None:
    server = start_production_server(REDIS_URL=own_redis.url, **ROOMY)
    wait_for_status(page(server), 200)

    own_redis.stop()
    status, body = get_json(page(server))

    assert status == 503, body
    assert body["status"] == "down"
    assert body["checks"]["cache"]["status"] == body["checks"]["channel_layer"]["status"] == "failed"
    assert body["checks"]["database:default"]["status"] == "ok"
    assert own_redis.url not in json.dumps(body)
    status, html = get(f"{server.http}/health/")
    assert status == 503 and "channel_layer" in html

    own_redis.start()
    body = wait_for_status(page(server), 200)
    assert body["status"] == "ok"
    assert server.process.poll() is None


def test_a_dead_replica_is_degraded_not_down(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server(DATABASE_REPLICA_URL="postgres://postgres:s3cret@127.0.0.1:1/x", **ROOMY)

    status, body = get_json(page(server))

    assert status == 200, json.dumps(body)
    assert body["status"] == "degraded"
    assert body["checks"]["database:replica_1"]["status"] == "failed"
    assert body["checks"]["database:default"]["status"] == "ok"
    status, html = get(f"{server.http}/health/")
    assert status == 200 and "s3cret" not in html and "s3cret" not in json.dumps(body)
