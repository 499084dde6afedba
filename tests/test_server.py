"""The production server's WebSocket compression (voicebot/server.py): large
messages go compressed to clients that offer permessage-deflate, small ones
as they are, and none when it is switched off."""

import json
from collections.abc import Callable

import websockets

from lobbies.loadtest.clients import SDP, CountingConnection, Tally
from tests.conftest import LiveClient, LiveServer

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
