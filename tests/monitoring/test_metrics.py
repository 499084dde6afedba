"""GET /metrics: the Prometheus exposition of a live server after real traffic,
checked by promtool, and its access restriction."""

import asyncio
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveClient, LiveServer

TOKEN = "metrics-test-token"


def scrape(server: LiveServer, token: str = TOKEN) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{server.http}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def samples(body: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(values: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def promtool_check(body: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run the suite with tests/run.sh (Debian package prometheus)"
    return subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)


async def wait_for_type(client: LiveClient, kind: str) -> dict:
    while True:
        frame = await client.receive()
        if frame["type"] == kind:
            return frame


async def test_exposition_after_traffic_passes_promtool_and_counts_it(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(METRICS_BEARER_TOKEN=TOKEN)
    lobby = "metrics-secret-lobby"
    alice = LiveClient(server, "Alice")
    bob = LiveClient(server, "Bob")
    await alice.join(lobby)
    bob_welcome = await bob.join(lobby)
    await wait_for_type(alice, "peer_joined")

    await alice.send({"type": "offer", "to": bob.id, "sdp": "v=0 offer"})
    assert (await wait_for_type(bob, "offer"))["from"] == alice.id
    await bob.send({"type": "answer", "to": alice.id, "sdp": "v=0 answer"})
    await wait_for_type(alice, "answer")
    await alice.send({"type": "ice", "to": bob.id, "candidate": None})
    await wait_for_type(bob, "ice")
    await alice.send({"type": "chat", "text": "hello"})
    await wait_for_type(alice, "chat")
    await wait_for_type(bob, "chat")
    await alice.send({"type": "offer", "to": "nobody", "sdp": "x"})
    assert (await wait_for_type(alice, "error"))["code"] == "unknown_peer"

    body = await asyncio.to_thread(scrape, server)
    checked = promtool_check(body)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""

    values = samples(body)
    assert value(values, "voicebot_websocket_connections_open") == 2
    assert value(values, "voicebot_websocket_connections_opened_total") == 2
    assert value(values, "voicebot_signaling_messages_received_total", type="offer") == 2
    for kind in ("offer", "answer", "ice"):
        assert value(values, "voicebot_signaling_messages_delivered_total", type=kind) == 1
        assert value(values, "voicebot_signaling_relay_latency_seconds_count", type=kind) == 1
    assert value(values, "voicebot_signaling_messages_delivered_total", type="chat") == 2
    assert 0 < value(values, "voicebot_signaling_relay_latency_seconds_sum", type="offer") < 1
    assert value(values, "voicebot_signaling_errors_total", code="unknown_peer") == 1
    assert value(values, "voicebot_signaling_message_size_bytes_count") == 5
    assert value(values, "voicebot_channel_layer_send_seconds_count", operation="send") == 3
    assert value(values, "voicebot_channel_layer_send_seconds_count", operation="group_send") >= 1
    assert value(values, "voicebot_lobbies_active") == 1
    assert value(values, "voicebot_sessions_active") == 2
    assert value(values, "voicebot_lobby_participants_bucket", le="2.0") == 1
    assert value(values, "voicebot_lobby_participants_sum") == 2
    assert value(values, "voicebot_cache_requests_total", cache="shared", outcome="hit") >= 0
    assert value(values, "voicebot_db_pool_connections", alias="default") >= 1
    assert value(values, "voicebot_db_pool_requests_waiting", alias="default") == 0
    assert value(values, "voicebot_bots_in_rooms") == 0
    assert value(values, "voicebot_bot_provider_errors_total", provider="openai") == 0
    # django-prometheus: requests, and queries through its PostgreSQL wrapper of Django's pooled backend.
    assert value(values, "django_http_requests_total_by_method_total", method="POST") >= 2
    assert value(values, "django_db_execute_total", alias="default", vendor="postgresql") > 0
    # The process collector.
    assert value(values, "process_resident_memory_bytes") > 0
    assert value(values, "process_open_fds") > 0
    assert value(values, "process_cpu_seconds_total") > 0

    # Nothing identifying: no lobby name, session id or token is a label.
    for secret in (lobby, alice.id, bob.id, alice.token, bob.token, bob_welcome["peer_id"]):
        assert secret not in body

    await alice.close(1000)
    await wait_for_type(bob, "peer_left")
    await asyncio.sleep(0.2)  # the server runs disconnect() after the close handshake
    values = samples(await asyncio.to_thread(scrape, server))
    assert value(values, "voicebot_websocket_connections_open") == 1
    assert value(values, "voicebot_websocket_connections_closed_total", code="1000") == 1
    assert value(values, "voicebot_lobby_participants_sum") == 1
    await bob.close()


async def test_token_is_required_when_configured(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server(METRICS_BEARER_TOKEN=TOKEN)

    for token in ("", "wrong-token"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(scrape, server, token)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert "voicebot_websocket_connections_open" in await asyncio.to_thread(scrape, server)


def test_allowed_networks_refuse_other_addresses(settings) -> None:
    settings.METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]

    response = Client(REMOTE_ADDR="192.168.1.5").get("/metrics")

    assert response.status_code == 403


@pytest.mark.django_db
def test_allowed_network_and_open_by_default(settings) -> None:
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 200

    settings.METRICS_ALLOWED_NETWORKS = []
    settings.METRICS_BEARER_TOKEN = ""
    response = Client(REMOTE_ADDR="203.0.113.9").get("/metrics")
    assert response.status_code == 200
    assert b"process_open_fds" in response.content
