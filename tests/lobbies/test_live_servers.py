"""Real server processes: the embedded default as the README starts it, and two
production processes sharing Postgres and Redis."""

import asyncio
import signal
import urllib.request
from collections.abc import Callable

import pytest
import websockets

from tests.conftest import LiveClient, LiveServer, negotiate


async def call_between(first: LiveClient, second: LiveClient) -> None:
    """Two people join one lobby, negotiate, chat and one leaves; both see it all."""
    await first.join("call")
    welcome = await second.join("call")
    assert [peer["name"] for peer in welcome["peers"]] == ["Alice"]
    joined = await first.receive()
    assert joined["type"] == "peer_joined" and joined["peer"]["peer_id"] == second.id

    await negotiate(second, first)

    await second.send({"type": "chat", "text": "can you hear me?"})
    for client in (first, second):
        chat = await client.receive()
        assert (chat["name"], chat["text"]) == ("Bob", "can you hear me?")

    await second.close()
    assert await first.receive() == {"type": "peer_left", "peer_id": second.id}
    await first.close()


async def test_the_embedded_default_serves_a_call(embedded_server: LiveServer) -> None:
    await call_between(LiveClient(embedded_server, "Alice"), LiveClient(embedded_server, "Bob"))


async def test_a_message_over_the_servers_frame_limit_closes_only_that_connection(
    embedded_server: LiveServer,
) -> None:
    """Up to 1 MiB a message gets `too_large`; past that daphne drops the connection."""
    alice, bob = LiveClient(embedded_server, "Alice"), LiveClient(embedded_server, "Bob")
    await alice.join("big")
    await bob.join("big")
    assert (await alice.receive())["type"] == "peer_joined"

    await bob.send({"type": "chat", "text": "x" * (1024 * 1024 + 1)})
    with pytest.raises(websockets.ConnectionClosedError) as closed:
        await bob.receive()

    assert closed.value.rcvd is None  # dropped without a close frame: 1006 for the client
    update = await alice.receive()
    assert (update["type"], update["peer"]["peer_id"], update["peer"]["state"]) == ("peer_updated", bob.id, "reconnecting")
    await alice.send({"type": "ping"})
    assert await alice.receive() == {"type": "pong"}
    await alice.close()


def test_the_embedded_default_serves_pages_and_static_files_without_debug(embedded_server: LiveServer) -> None:
    page = urllib.request.urlopen(f"{embedded_server.http}/lobby/demo/", timeout=5).read().decode()
    assert "/static/lobbies/room.js" in page

    script = urllib.request.urlopen(f"{embedded_server.http}/static/lobbies/room.js", timeout=5)
    assert script.status == 200
    assert "RTCPeerConnection" in script.read().decode()


async def test_two_processes_serve_one_room_together(production_servers: list[LiveServer]) -> None:
    one, two = production_servers

    await call_between(LiveClient(one, "Alice"), LiveClient(two, "Bob"))


async def test_an_idle_connection_stays_open_for_over_a_minute(production_servers: list[LiveServer]) -> None:
    one, two = production_servers
    alice, bob = LiveClient(one, "Alice"), LiveClient(two, "Bob")
    await alice.join("quiet-room")
    await bob.join("quiet-room")
    assert (await alice.receive())["type"] == "peer_joined"

    await asyncio.sleep(65)

    await bob.send({"type": "chat", "text": "still there?"})
    assert (await alice.receive())["text"] == "still there?"
    await alice.close()
    await bob.close()


async def test_a_server_stops_promptly_on_sigterm_while_people_leave(production_servers: list[LiveServer]) -> None:
    server = production_servers[0]
    clients = [LiveClient(server, name) for name in ("Alice", "Bob", "Carol")]
    for client in clients:
        await client.join("closing-time")

    for client in clients:
        await client.close()
    server.process.terminate()

    exit_code = await asyncio.to_thread(server.process.wait, 10)
    # uvicorn shuts down, then ends by the signal it received, as the default handler would.
    assert exit_code == -signal.SIGTERM
    log = server.log.read_text()
    assert "Finished server process" in log and "Traceback" not in log


async def restart(start: Callable[..., LiveServer], servers: list[LiveServer]) -> list[LiveServer]:
    for server in servers:
        server.stop()
    return [start() for _ in servers]


async def test_a_restart_of_every_process_loses_no_session_and_no_lobby(
    start_production_server: Callable[..., LiveServer],
) -> None:
    servers = [start_production_server(), start_production_server()]
    alice, bob = LiveClient(servers[0], "Alice"), LiveClient(servers[1], "Bob")
    await alice.join("sturdy")
    await bob.join("sturdy")
    assert (await alice.receive())["type"] == "peer_joined"

    servers = await restart(start_production_server, servers)

    # Each comes back on the other process.
    alice_back = await alice.join("sturdy", server=servers[1])
    assert alice_back["peer_id"] == alice.id
    # The stopping server ended Bob's connection as a drop: his place waits for him.
    assert [(peer["peer_id"], peer["state"]) for peer in alice_back["peers"]] == [(bob.id, "reconnecting")]
    bob_back = await bob.join("sturdy", server=servers[0])
    assert bob_back["peer_id"] == bob.id
    assert [peer["peer_id"] for peer in bob_back["peers"]] == [alice.id]
    assert (await alice.receive())["peer"] == {**alice_back["peers"][0], "state": "connected"}

    await alice.send({"type": "offer", "to": bob.id, "sdp": "v=0 after the restart"})
    assert (await bob.receive())["sdp"] == "v=0 after the restart"
    await alice.close()
    await bob.close()


async def test_a_killed_process_loses_its_people_to_the_other_one(
    start_production_server: Callable[..., LiveServer],
) -> None:
    quick = {"LOBBY_RESUME_GRACE_SECONDS": "2", "PRESENCE_INTERVAL_SECONDS": "1"}
    doomed, survivor = start_production_server(**quick), start_production_server(**quick)
    alice, bob, carol = LiveClient(doomed, "Alice"), LiveClient(survivor, "Bob"), LiveClient(doomed, "Carol")
    for client in (alice, bob, carol):
        await client.join("fragile")
    assert (await bob.receive())["peer"]["name"] == "Carol"

    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    back = await alice.join("fragile", server=survivor)

    assert back["peer_id"] == alice.id
    assert [(await bob.receive())["peer"]["state"] for _ in range(2)] == ["reconnecting", "connected"]
    await bob.send({"type": "chat", "text": "welcome back"})
    for client in (alice, bob):
        assert (await client.receive())["text"] == "welcome back"
    # Carol never comes back: once her row goes stale the survivor marks her
    # reconnecting, and ends her stay after the grace period.
    update = await bob.receive(timeout=15)
    assert (update["type"], update["peer"]["peer_id"], update["peer"]["state"]) == ("peer_updated", carol.id, "reconnecting")
    assert await bob.receive(timeout=15) == {"type": "peer_left", "peer_id": carol.id}
    await alice.close()
    await bob.close()
