"""Logs: JSON lines with request/connection context, X-Request-ID, no tokens."""

import asyncio
import io
import json
import logging
import logging.config
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import websockets
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client

from lobbies import services
from tests.conftest import PROJECT_DIR, LiveClient, LiveServer, embedded_env
from voicebot import logcontext


def captured(fmt: str) -> tuple[logging.Handler, Callable[[], list[str]]]:
    config = logcontext.logging_config("INFO", fmt)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.config.DictConfigurator(config).configure_formatter(config["formatters"][fmt]))
    handler.addFilter(logcontext.ContextFilter())
    handler.addFilter(logcontext.OutageFilter())
    return handler, lambda: stream.getvalue().splitlines()


@pytest.fixture
def json_log() -> Iterator[Callable[[], list[dict]]]:
    """The project's JSON handler on the root logger; returns the records as parsed objects."""
    handler, lines = captured("json")
    logging.getLogger().addHandler(handler)
    yield lambda: [json.loads(line) for line in lines()]
    logging.getLogger().removeHandler(handler)


def test_a_json_line_has_the_standard_fields_the_context_and_extra_fields(json_log) -> None:
    token = logcontext.bind(request_id="req-1", lobby="lounge")
    try:
        logging.getLogger("voicebot.test").warning("Hello %s", "there", extra={"answer": 42})
    finally:
        logcontext.unbind(token)
    logging.getLogger("voicebot.test").warning("After")

    first, after = json_log()
    assert first["level"] == "WARNING"
    assert first["logger"] == "voicebot.test"
    assert first["message"] == "Hello there"
    assert first["timestamp"].endswith("+00:00")
    assert (first["request_id"], first["lobby"], first["answer"]) == ("req-1", "lounge", 42)
    # Unbinding ends the context.
    assert "request_id" not in after and "lobby" not in after


def test_a_lost_connection_is_one_warning_line_and_other_errors_keep_their_traceback(json_log) -> None:
    logger = logging.getLogger("channels_redis.pubsub")  # once a second per process while Redis is away
    for error in (redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379."), FileNotFoundError("a bug")):
        try:
            raise error
        except Exception:
            logger.exception("Unexpected exception in receive task")

    lost, bug = json_log()
    assert (lost["level"], lost["message"]) == (
        "WARNING",
        "Unexpected exception in receive task: ConnectionError: Error 111 connecting to 127.0.0.1:6379.",
    )
    assert "exc_info" not in lost
    assert bug["level"] == "ERROR" and "FileNotFoundError: a bug" in bug["exc_info"]


def test_an_exception_stays_on_one_json_line(json_log) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("voicebot.test").exception("It failed")

    (record,) = json_log()
    assert record["message"] == "It failed"
    assert "ValueError: boom" in record["exc_info"]


def test_the_text_format_shows_the_context_after_the_message() -> None:
    handler, lines = captured("text")
    logger = logging.getLogger("voicebot.test")
    logger.addHandler(handler)
    token = logcontext.bind(connection_id="c1", session_id="s1")
    try:
        logger.warning("Hello")
    finally:
        logcontext.unbind(token)
        logger.removeHandler(handler)

    (line,) = lines()
    assert line.endswith("WARNING voicebot.test Hello [connection_id=c1 session_id=s1]")


def test_a_token_in_a_message_is_redacted(json_log) -> None:
    logging.getLogger("voicebot.test").warning("GET %s", "/ws/lobby/x/?token=SECRET123&password=p")

    (record,) = json_log()
    assert "SECRET123" not in record["message"]
    assert record["message"] == "GET /ws/lobby/x/?token=[redacted]&password=p"


# database_sync_to_async tidies the database connections of its thread, which
# may hold one from an earlier test.
@pytest.mark.django_db
def test_context_reaches_database_sync_to_async_calls() -> None:
    async def visit() -> dict[str, str]:
        logcontext.bind(connection_id="c2", lobby="lounge")
        return await database_sync_to_async(logcontext.current)()

    assert asyncio.run(visit()) == {"connection_id": "c2", "lobby": "lounge"}


@pytest.mark.django_db(transaction=True)
def test_audit_fields_come_out_as_json_fields(json_log) -> None:
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    creator = services.session_create(name="Creator")[0]
    services.lobby_create(name="audited", private=False, max_participants=4, created_by=creator)
    token = logcontext.bind(request_id="req-audit", lobby="something-else")
    try:
        services.lobby_close(lobby_name="audited", by=admin)
    finally:
        logcontext.unbind(token)

    (record,) = [record for record in json_log() if record["logger"] == "voicebot.audit"]
    assert record["action"] == "lobby_close"
    assert record["admin_user"] == "root"
    # The audit's own lobby field wins over the context's.
    assert record["lobby"] == "audited"
    assert record["session_ids"] == []
    assert record["request_id"] == "req-audit"


@pytest.mark.django_db
def test_an_acceptable_x_request_id_is_echoed() -> None:
    response = Client().get("/healthz", HTTP_HOST="localhost", HTTP_X_REQUEST_ID="abc-123.4_5:6")
    assert response["X-Request-ID"] == "abc-123.4_5:6"


@pytest.mark.django_db
@pytest.mark.parametrize("header", [None, "", "has space", "x" * 129, "semi;colon", "new\nline"])
def test_a_missing_or_unsafe_x_request_id_is_replaced_by_a_new_one(header: str | None) -> None:
    extra = {} if header is None else {"HTTP_X_REQUEST_ID": header}
    first = Client().get("/healthz", HTTP_HOST="localhost", **extra)["X-Request-ID"]
    second = Client().get("/healthz", HTTP_HOST="localhost", **extra)["X-Request-ID"]
    assert len(first) == 32 and first != second and first != header


def test_log_format_comes_from_the_environment(tmp_path: Path) -> None:
    show = "import django; django.setup(); from django.conf import settings as s; print(s.VOICEBOT_LOG_FORMAT)"

    def log_format(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", show],
            cwd=PROJECT_DIR,
            env={**embedded_env(tmp_path), "DJANGO_SETTINGS_MODULE": "voicebot.settings", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert log_format().stdout.strip() == "text"
    assert log_format(VOICEBOT_LOG_FORMAT="json").stdout.strip() == "json"
    assert log_format(DATABASE_URL="postgres://x@127.0.0.1/x", DJANGO_SECRET_KEY="k").stdout.strip() == "json"
    refused = log_format(VOICEBOT_LOG_FORMAT="xml")
    assert refused.returncode != 0 and "VOICEBOT_LOG_FORMAT must be json or text" in refused.stderr


def read_json_log(path: Path, until: Callable[[list[dict]], bool], timeout: float = 10) -> list[dict]:
    """Every line of a server's log (uvicorn's own included) parsed as JSON, once `until` holds for them."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if until(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_a_visit_can_be_followed_in_a_live_servers_json_log(
    start_production_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    # DEBUG: the libraries' chattiest lines must not leak the token either.
    server = start_production_server(VOICEBOT_LOG_FORMAT="json", VOICEBOT_LOG_LEVEL="DEBUG")
    log_path = tmp_path / "server-0.log"
    alice = LiveClient(server, "Alice")

    request = urllib.request.Request(f"{server.http}/no-such-page/", headers={"X-Request-ID": "visit-42"})
    with pytest.raises(urllib.error.HTTPError) as not_found:
        urllib.request.urlopen(request, timeout=10)
    assert not_found.value.headers["X-Request-ID"] == "visit-42"

    async def visit() -> None:
        url = f"{server.ws}/ws/lobby/logged/?token={alice.token}"
        async with websockets.connect(url, additional_headers={"X-Request-ID": "visit-42"}) as socket:
            welcome = json.loads(await socket.recv())
            assert welcome["type"] == "welcome"
            await socket.send(json.dumps({"type": "ping"}))
            assert json.loads(await socket.recv())["type"] == "pong"

    asyncio.run(visit())

    def closed(records: list[dict]) -> bool:
        return any(r["logger"] == "lobbies.consumers" and r["message"].startswith("WebSocket closed") for r in records)

    records = read_json_log(log_path, closed)
    assert all({"timestamp", "level", "logger", "message"} <= record.keys() for record in records)
    (not_found_line,) = [r for r in records if r["logger"] == "django.request" and "no-such-page" in r["message"]]
    assert not_found_line["request_id"] == "visit-42"
    (access,) = [r for r in records if r["logger"] == "voicebot.access" and r["path"] == "/no-such-page/"]
    assert (access["request_id"], access["method"], access["status"]) == ("visit-42", "GET", 404)
    assert access["duration_ms"] >= 0

    connected = next(r for r in records if r["message"].startswith("WebSocket connect to lobby logged"))
    assert connected["message"].endswith(": joined")
    assert connected["request_id"] == "visit-42"
    assert (connected["session_id"], connected["lobby"]) == (alice.id, "logged")
    assert len(connected["connection_id"]) == 32
    # The close is handled later, by another handler of the same consumer: same context.
    (close,) = [r for r in records if closed([r])]
    assert {key: close[key] for key in ("connection_id", "session_id", "lobby", "request_id")} == {
        key: connected[key] for key in ("connection_id", "session_id", "lobby", "request_id")
    }
    assert alice.token not in log_path.read_text()
    # The server's own lines stay; its lines for each WebSocket, which the consumer's replace, do not.
    assert any(r["logger"] == "uvicorn.error" and r["message"].startswith("Uvicorn running on") for r in records)
    uvicorn_lines = [r["message"] for r in records if r["logger"] == "uvicorn.error"]
    assert not [line for line in uvicorn_lines if "[accepted]" in line or line.startswith("connection ")]


def test_a_malformed_log_call_does_not_raise_in_the_caller(json_log) -> None:
    logging.raiseExceptions, before = False, logging.raiseExceptions
    try:
        logging.getLogger("voicebot.test").warning("%s and %s", "only one")
    finally:
        logging.raiseExceptions = before
