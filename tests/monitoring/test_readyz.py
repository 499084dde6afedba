"""GET /readyz: 200 only while the process can serve; each dependency failing for real."""

import json
import socket
import time
from collections.abc import Callable

from tests.conftest import LiveServer, OwnRedis
from tests.monitoring.conftest import get_json, wait_for_status


def test_ready_when_every_dependency_answers(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server()

    body = wait_for_status(f"{server.http}/readyz", 200)

    assert body["status"] == "ok" and body["failing"] == []
    assert set(body["checks"]) == {"database:default", "cache", "channel_layer"}
    assert all(check["status"] == "ok" for check in body["checks"].values())


def test_redis_down_makes_the_process_unready_until_redis_is_back(
    start_production_server: Callable[..., LiveServer], own_redis: OwnRedis
) -> None:
    server = start_production_server(REDIS_URL=own_redis.url)
    wait_for_status(f"{server.http}/readyz", 200)

    own_redis.stop()
    started = time.monotonic()
    status, body = get_json(f"{server.http}/readyz")

    assert status == 503, body
    assert time.monotonic() - started < 4  # bounded by HEALTH_CHECK_TIMEOUT_SECONDS (2 s)
    assert body["status"] == "down"
    assert {"cache", "channel_layer"} <= set(body["failing"])
    assert "database:default" not in body["failing"]
    assert own_redis.url not in json.dumps(body)
    # Liveness checks no dependency: the pod is taken out of rotation, not killed.
    assert get_json(f"{server.http}/healthz") == (200, {"status": "ok"})

    own_redis.start()
    body = wait_for_status(f"{server.http}/readyz", 200)

    assert body["status"] == "ok"
    assert server.process.poll() is None  # the same process, not restarted


def test_a_dead_replica_degrades_the_process_but_it_stays_ready(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(DATABASE_REPLICA_URL="postgres://postgres:s3cret@127.0.0.1:1/x")

    body = wait_for_status(f"{server.http}/readyz", 200)
    started = time.monotonic()
    status, body = get_json(f"{server.http}/readyz")

    assert status == 200, body
    assert time.monotonic() - started < 4
    assert body["status"] == "degraded"
    assert body["failing"] == ["database:replica_1"]
    assert body["checks"]["database:replica_1"]["critical"] is False
    assert "serving, degraded" in body["message"] and "database:replica_1" in body["message"]
    assert "s3cret" not in json.dumps(body)


def test_a_dead_primary_database_makes_the_process_unready(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(DATABASE_URL="postgres://postgres:s3cret@127.0.0.1:1/x")

    status, body = get_json(f"{server.http}/readyz")

    assert status == 503, body
    assert body["status"] == "down"
    assert body["failing"] == ["database:default"]
    assert "s3cret" not in json.dumps(body)


def test_a_hanging_replica_is_cut_off_by_the_budget_and_not_run_twice(
    start_production_server: Callable[..., LiveServer],
) -> None:
    # A port that accepts connections and never answers: the database check hangs.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        server = start_production_server(DATABASE_REPLICA_URL=f"postgres://postgres@127.0.0.1:{port}/x")

        started = time.monotonic()
        status, body = get_json(f"{server.http}/readyz")

        assert time.monotonic() - started < 4
        assert status == 200, body
        assert body["checks"]["database:replica_1"]["message"] == "no answer within 2 s"
        assert body["checks"]["database:default"]["status"] == "ok"

        # The first check's thread is still waiting: it is not started again.
        status, body = get_json(f"{server.http}/readyz")
        assert status == 200, body
        assert body["checks"]["database:replica_1"]["message"] == "the previous check has not returned yet"
    finally:
        silent.close()
