"""The production server's WebSocket protocol (voicebot/server.py): large
messages go compressed to clients that offer permessage-deflate, small ones
as they are, and none when it is switched off; an idle connection keeps
nothing it no longer needs; what the application made while starting is
kept out of the garbage collector's full passes."""

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable

import pytest
import uvicorn
import websockets
from channels.layers import get_channel_layer

from lobbies.layers import Inbox
from lobbies.loadtest.clients import SDP, CountingConnection, Tally
from tests.conftest import PROJECT_DIR, LiveClient, LiveServer, Person, free_port
from voicebot.asgi import application
from voicebot.queues import OneReaderQueue
from voicebot.server import WebSocketProtocol

CANDIDATE = {"candidate": "candidate:1 1 udp 2122194687 192.0.2.2 46589 typ host", "sdpMid": "0", "sdpMLineIndex": 0}


async def join_counting(server: LiveServer, client: LiveClient, lobby: str) -> tuple[websockets.ClientConnection, Tally]:
    """Join with a connection that counts the bytes the server sends after the welcome."""
    socket = await websockets.connect(
        f"{server.ws}/ws/lobby/{lobby}/?token={client.token}", compression="deflate", create_connection=CountingConnection
    )
    assert json.loads(await socket.recv())["type"] == "welcome"
    tally = Tally()
    socket.tally = tally
    return socket, tally


async def test_large_messages_go_compressed_and_small_ones_as_they_are(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(VOICEBOT_WS_COMPRESSION="true", VOICEBOT_WS_COMPRESSION_MIN_BYTES="1024")
    alice, bob = LiveClient(server, "Alice"), LiveClient(server, "Bob")
    receiving, wire = await join_counting(server, bob, "squeeze")
    await alice.join("squeeze")
    assert json.loads(await receiving.recv())["type"] == "peer_joined"
    negotiated = receiving.response.headers["Sec-WebSocket-Extensions"]
    assert "permessage-deflate" in negotiated and "server_no_context_takeover" in negotiated

    await alice.send({"type": "offer", "to": bob.id, "sdp": SDP})
    offer = await receiving.recv()
    offer_bytes = wire.bytes_received
    await alice.send({"type": "ice", "to": bob.id, "candidate": CANDIDATE})
    ice = await receiving.recv()
    ice_bytes = wire.bytes_received - offer_bytes

    assert json.loads(offer)["sdp"] == SDP
    assert offer_bytes < 0.6 * len(offer.encode())
    assert json.loads(ice)["candidate"] == CANDIDATE
    assert ice_bytes >= len(ice.encode())
    await alice.close()
    await receiving.close()


async def test_no_compression_when_switched_off(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server(VOICEBOT_WS_COMPRESSION="false")
    bob = LiveClient(server, "Bob")
    receiving, _ = await join_counting(server, bob, "plain")

    assert "Sec-WebSocket-Extensions" not in receiving.response.headers
    await receiving.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("channel_layer")
async def test_an_idle_connection_keeps_no_handshake_and_only_small_queues(alice: Person) -> None:
    config = uvicorn.Config(application, host="127.0.0.1", port=free_port(), ws=WebSocketProtocol, lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with websockets.connect(f"ws://127.0.0.1:{config.port}/ws/lobby/idle/?token={alice.token}") as socket:
            assert json.loads(await socket.recv())["type"] == "welcome"
            [connection] = server.server_state.connections

            assert connection.request is None and connection.response is None
            assert isinstance(connection.queue, OneReaderQueue) and connection.queue.items is None
            layer = get_channel_layer()
            if hasattr(layer, "_get_layer"):  # the Redis layer; the in-memory one keeps its own queues
                queues = [queue for queue in layer._get_layer().channels.values() if not isinstance(queue, Inbox)]
                assert queues and all(isinstance(queue, OneReaderQueue) for queue in queues)
            # and it still serves its client
            await socket.send(json.dumps({"type": "ping"}))
            assert json.loads(await socket.recv()) == {"type": "pong"}
    finally:
        server.should_exit = True
        await serving


def test_the_application_freezes_what_starting_made() -> None:
    """Full garbage collections skip it: they paused the event loop for
    57-74 ms under load while they walked it."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import gc; import voicebot.asgi; print(gc.get_freeze_count())"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60, check=True,
    )
    assert int(loaded.stdout) > 50_000
