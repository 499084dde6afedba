"""OpenTelemetry traces: exported over OTLP/HTTP only when an endpoint is configured."""

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import websockets
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bots import worker as bot_worker
from bots.pipeline import TurnRecord
from tests.conftest import PROJECT_DIR, LiveClient, LiveServer, embedded_env
from voicebot import logcontext, tracing


class Collector:
    """A fake OTLP/HTTP collector on loopback: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.resources: list[dict] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(self.path, body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, path: str, body: bytes) -> None:
        self.paths.append(path)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            self.resources.append({a.key: a.value.string_value for a in resource_spans.resource.attributes})
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "attributes": {a.key: attribute_value(a.value) for a in span.attributes},
                        }
                    )

    def wait_for(self, found: Callable[[list[dict]], bool], timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not found(self.spans) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.spans

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attribute_value(value) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.close()


def named(spans: list[dict], name: str) -> list[dict]:
    return [span for span in spans if span["name"] == name]


def test_http_requests_and_websocket_connects_are_exported(
    start_production_server: Callable[..., LiveServer], collector: Collector
) -> None:
    server = start_production_server(
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_SERVICE_NAME="voicebot-under-test",
        # Export within a tenth of a second rather than every five.
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    caller_trace = "0af7651916cd43dd8448eb211c80319c"
    request = urllib.request.Request(
        f"{server.http}/healthz",
        headers={"X-Request-ID": "traced-1", "traceparent": f"00-{caller_trace}-b7ad6b7169203331-01"},
    )
    urllib.request.urlopen(request, timeout=10).read()
    alice = LiveClient(server, "Alice")

    async def connect() -> None:
        await alice.join("traced")
        await alice.close()
        # A refused connection: no valid token.
        async with websockets.connect(f"{server.ws}/ws/lobby/traced/?token=not-a-token") as socket:
            assert json.loads(await socket.recv())["code"] == "unauthenticated"

    asyncio.run(connect())

    spans = collector.wait_for(lambda spans: len(named(spans, "websocket.connect")) >= 2)
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    assert {"service.name": "voicebot-under-test"}.items() <= collector.resources[0].items()

    # start_production_server polled /healthz too, without a request ID.
    (health,) = [s for s in named(spans, "GET /healthz") if s["attributes"]["voicebot.request_id"] == "traced-1"]
    assert health["trace_id"] == caller_trace  # joined the caller's trace
    assert health["attributes"]["http.request.method"] == "GET"
    assert health["attributes"]["http.route"] == "/healthz"
    assert health["attributes"]["http.response.status_code"] == 200
    assert health["attributes"]["voicebot.request_id"] == "traced-1"
    (session,) = named(spans, "POST /api/sessions/")
    assert session["attributes"]["http.response.status_code"] == 201

    joined, refused = sorted(named(spans, "websocket.connect"), key=lambda s: s["attributes"]["voicebot.outcome"])
    assert joined["attributes"]["voicebot.outcome"] == "joined"
    assert joined["attributes"]["voicebot.lobby"] == "traced"
    assert joined["attributes"]["voicebot.session_id"] == alice.id
    assert len(joined["attributes"]["voicebot.connection_id"]) == 32
    assert refused["attributes"]["voicebot.outcome"] == "unauthenticated"
    assert "voicebot.session_id" not in refused["attributes"]
    # No token in any span.
    everything = json.dumps(spans)
    assert alice.token not in everything and "not-a-token" not in everything


def test_without_an_endpoint_the_sdk_is_not_set_up(tmp_path: Path, collector: Collector) -> None:
    probe = (
        "import django; django.setup(); import voicebot.asgi; "
        "from opentelemetry import trace; from voicebot import tracing; "
        "print(type(trace.get_tracer_provider()).__name__, tracing._configured)"
    )
    env = {k: v for k, v in embedded_env(tmp_path).items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=PROJECT_DIR,
        env={**env, "DJANGO_SETTINGS_MODULE": "voicebot.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ProxyTracerProvider", "False"]
    assert collector.spans == []


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Spans made through voicebot.tracing.tracer, kept in memory (no global provider is set)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    return exporter


PROFILE = SimpleNamespace(name="Tea Bot")


def quiet_turn_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """record_turn without its other duties (the database row, the metrics)."""
    monkeypatch.setattr(bot_worker.services, "turn_record", lambda **fields: None)
    monkeypatch.setattr(bot_worker, "metrics", SimpleNamespace(turn_finished=lambda *args: None))


def test_a_bot_turn_is_a_span_with_its_stage_timings(spans: InMemorySpanExporter, monkeypatch) -> None:
    quiet_turn_records(monkeypatch)
    worker = bot_worker.BotWorker(server_url="ws://127.0.0.1:1", capacity=1)
    turn = TurnRecord(
        source="voice",
        speaker_peer_id="peer-1",
        speaker_name="Alice",
        user_text="what time is it",
        reply_text="Time for tea.",
        end_of_speech_ms=310.0,
        recognition_ms=0.0,
        model_first_token_ms=120.5,
        synthesis_first_audio_ms=40.0,
        first_audio_ms=520.0,
    )
    turn.started_at -= 1.5  # the turn took a second and a half

    async def record() -> None:
        logcontext.bind(bot="Tea Bot", lobby="kitchen", assignment_id=7)
        await worker.record_turn(7, turn, PROFILE)

    asyncio.run(record())

    (span,) = spans.get_finished_spans()
    assert span.name == "bot.turn"
    assert 1.4 < (span.end_time - span.start_time) / 1e9 < 3
    attributes = dict(span.attributes)
    assert attributes == {
        "voicebot.turn.source": "voice",
        "voicebot.turn.interrupted": False,
        "voicebot.turn.end_of_speech_ms": 310.0,
        "voicebot.turn.recognition_ms": 0.0,
        "voicebot.turn.model_first_token_ms": 120.5,
        "voicebot.turn.synthesis_first_audio_ms": 40.0,
        "voicebot.turn.first_audio_ms": 520.0,
        "voicebot.turn.failed": False,
        "voicebot.bot": "Tea Bot",
        "voicebot.lobby": "kitchen",
        "voicebot.assignment_id": "7",
    }
    # What was said is conversation history, not telemetry.
    assert "tea" not in json.dumps(attributes).replace("Tea Bot", "")


def test_a_failed_bot_turn_is_marked_as_an_error(spans: InMemorySpanExporter, monkeypatch) -> None:
    quiet_turn_records(monkeypatch)
    worker = bot_worker.BotWorker(server_url="ws://127.0.0.1:1", capacity=1)
    turn = TurnRecord(source="chat", speaker_peer_id="p", speaker_name="Bob", user_text="hi", reply_text="", error="x")

    asyncio.run(worker.record_turn(1, turn, PROFILE))

    (span,) = spans.get_finished_spans()
    assert span.attributes["voicebot.turn.failed"] is True
    assert span.status.status_code.name == "ERROR"


def test_a_bot_runs_with_its_assignment_bot_and_lobby_as_log_context() -> None:
    worker = bot_worker.BotWorker(server_url="ws://127.0.0.1:1", capacity=1)
    seen: dict[str, str] = {}

    class Runner:
        profile = SimpleNamespace(name="Tea Bot")

        async def run(self) -> None:
            # A task the runner starts inherits the context too.
            seen.update(await asyncio.create_task(asyncio.sleep(0, logcontext.current())))

    claim = SimpleNamespace(assignment_id=9, bot_id=3, lobby_name="kitchen", session_id="bot-session", token="t")
    asyncio.run(worker.supervise(Runner(), claim))

    assert seen == {"assignment_id": "9", "bot": "Tea Bot", "lobby": "kitchen", "session_id": "bot-session"}
