"""Redis stops for 10 s under two live server processes and starts again: what
the people connected to them notice, and that nobody has to restart anything."""

import asyncio
import json
import time
from collections.abc import Callable

import pytest
import websockets

from tests.conftest import LiveClient, LiveServer, OwnRedis, negotiate
from tests.monitoring.conftest import wait_for_status

OUTAGE_SECONDS = 10
# A process tries to reconnect about once a second: a bound on the healing,
# with room for a slow machine.
RECOVERY_SECONDS = 8


async def chat(client: LiveClient, text: str, *others: LiveClient) -> int:
    """Sends a chat message; returns its id once the sender has its
    acknowledgement and each of `others` has received it."""
    await client.send({"type": "chat", "text": text})
    ack = await client.receive()
    assert (ack["type"], ack["from"], ack["text"]) == ("chat", client.id, text), ack
    for other in others:
        assert await other.receive() == ack
    return ack["id"]


async def nothing_else_for(client: LiveClient) -> None:
    """The next frame the client gets is the answer to its ping: nothing
    unexpected (an error, a duplicate) came before it."""
    await client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}


async def test_a_redis_outage_keeps_the_process_serving_and_heals_by_itself(
    own_redis: OwnRedis, start_production_server: Callable[..., LiveServer]
) -> None:
    one = start_production_server(REDIS_URL=own_redis.url)
    two = start_production_server(REDIS_URL=own_redis.url)
    pids = (one.process.pid, two.process.pid)
    alice, bob, carol = LiveClient(one, "Alice"), LiveClient(one, "Bob"), LiveClient(two, "Carol")
    await alice.join("outage")
    await bob.join("outage")
    assert (await alice.receive())["type"] == "peer_joined"
    await carol.join("outage")
    for client in (alice, bob):
        joined = await client.receive()
        assert (joined["type"], joined["peer"]["peer_id"]) == ("peer_joined", carol.id)
    before = await chat(alice, "before", bob, carol)

    own_redis.stop()
    stopped = time.monotonic()

    for server in (one, two):
        body = wait_for_status(f"{server.http}/readyz", 503, timeout=5)
        assert "channel_layer" in body["failing"], body
    # Alice and Bob share a process: signaling between them does not need Redis.
    await negotiate(bob, alice)
    # Chat is stored, acknowledged and delivered on the process; Carol's misses it for now.
    during = await chat(alice, "during", bob)
    await alice.send({"type": "mute", "muted": True})
    for client in (alice, bob):
        update = await client.receive()
        assert (update["type"], update["peer"]["peer_id"], update["peer"]["muted"]) == ("peer_updated", alice.id, True)
    # What cannot reach the other process fails at once, with an error, and
    # the connection stays usable.
    await alice.send({"type": "offer", "to": carol.id, "sdp": "v=0 offer"})
    error = await alice.receive()
    assert (error["type"], error["code"]) == ("error", "delivery_failed"), error
    for client in (alice, bob, carol):
        await nothing_else_for(client)
    # Bob leaves: Alice, on his process, sees it at once.
    await bob.close()
    assert await alice.receive() == {"type": "peer_left", "peer_id": bob.id}
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
    assert one.process.poll() is None and two.process.poll() is None

    own_redis.start()
    restarted = time.monotonic()

    for server in (one, two):
        assert wait_for_status(f"{server.http}/readyz", 200, timeout=RECOVERY_SECONDS)["status"] == "ok"
    # Carol's process tells her, unasked, what she missed: Bob left, Alice muted, and Alice's chat.
    assert await carol.receive(timeout=RECOVERY_SECONDS) == {"type": "peer_left", "peer_id": bob.id}
    update = await carol.receive()
    assert (update["type"], update["peer"]["peer_id"], update["peer"]["muted"]) == ("peer_updated", alice.id, True)
    missed = await carol.receive()
    assert (missed["type"], missed["id"], missed["text"], missed["from"]) == ("chat", during, "during", alice.id)
    # Signaling and chat cross between the processes again.
    await alice.send({"type": "offer", "to": carol.id, "sdp": "v=0 again"})
    assert await carol.receive() == {"type": "offer", "to": carol.id, "sdp": "v=0 again", "from": alice.id}
    await carol.send({"type": "answer", "to": alice.id, "sdp": "v=0 answer"})
    assert (await alice.receive())["sdp"] == "v=0 answer"
    after = await chat(alice, "after", carol)
    assert time.monotonic() - restarted < RECOVERY_SECONDS + 5
    # Nobody got a message twice, and everything acknowledged is stored.
    for client in (alice, carol):
        await nothing_else_for(client)
    await carol.send({"type": "chat_history", "after": before})
    history = await carol.receive()
    assert [(m["id"], m["text"]) for m in history["messages"]] == [(during, "during"), (after, "after")]

    assert (one.process.pid, two.process.pid) == pids
    assert one.process.poll() is None and two.process.poll() is None
    # The outage is in the logs as warnings, not as a traceback a second.
    for server in (one, two):
        log = server.log.read_text()
        assert "Traceback" not in log and "Reconnected to Redis" in log
    for client in (alice, carol):
        await client.close()


async def test_a_join_while_redis_is_away_is_refused_at_once_and_works_once_it_is_back(
    own_redis: OwnRedis, start_production_server: Callable[..., LiveServer]
) -> None:
    server = start_production_server(REDIS_URL=own_redis.url)
    dave = LiveClient(server, "Dave")
    own_redis.stop()

    started = time.monotonic()
    async with websockets.connect(f"{server.ws}/ws/lobby/outage/?token={dave.token}", open_timeout=5) as socket:
        error = json.loads(await asyncio.wait_for(socket.recv(), 5))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 5)

    assert (error["type"], error["code"]) == ("error", "unavailable"), error
    assert socket.close_code == 4503
    assert time.monotonic() - started < 2

    own_redis.start()
    wait_for_status(f"{server.http}/readyz", 200, timeout=RECOVERY_SECONDS)

    assert (await dave.join("outage"))["peers"] == []
    await nothing_else_for(dave)
    await dave.close()
