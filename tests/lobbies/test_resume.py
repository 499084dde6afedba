"""Coming back after a dropped connection, within the grace period or too late.

Restarts and dead server processes are in test_live_servers.py."""

import pytest
from channels.db import database_sync_to_async

from lobbies.models import Lobby, Membership
from monitoring.models import AuditEvent
from tests.conftest import Person, leave_unused
from tests.lobbies.test_consumers import joined, open_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer")]


async def test_a_dropped_peer_is_reconnecting_then_resumes_its_place(alice: Person, bob: Person) -> None:
    watcher = await joined(alice)
    dropped = await joined(bob)
    assert (await watcher.receive())["type"] == "peer_joined"

    await dropped.disconnect(code=1006)

    update = await watcher.receive()
    assert update == {"type": "peer_updated", "peer": {**update["peer"], "peer_id": bob.id, "state": "reconnecting"}}

    back = await joined(bob)

    assert back.welcome["peer_id"] == bob.id
    assert [peer["peer_id"] for peer in back.welcome["peers"]] == [alice.id]
    assert (await watcher.receive())["peer"]["state"] == "connected"
    await watcher.send_json_to({"type": "offer", "to": bob.id, "sdp": "v=0 renegotiate"})
    assert (await back.receive())["sdp"] == "v=0 renegotiate"
    assert await Membership.objects.filter(session_id=bob.id).acount() == 1
    await watcher.disconnect()
    await back.disconnect()


async def test_a_deliberate_close_leaves_at_once(alice: Person, bob: Person) -> None:
    watcher = await joined(alice)
    leaver = await joined(bob)
    await watcher.receive()  # peer_joined

    await leaver.disconnect(code=1000)

    assert await watcher.receive() == {"type": "peer_left", "peer_id": bob.id}
    await watcher.disconnect()


async def test_a_peer_that_does_not_come_back_leaves_after_the_grace_period(
    settings, alice: Person, bob: Person
) -> None:
    settings.LOBBY_RESUME_GRACE_SECONDS = 1
    settings.PRESENCE_INTERVAL_SECONDS = 0.2
    watcher = await joined(alice)
    dropped = await joined(bob)
    await watcher.receive()  # peer_joined
    await dropped.disconnect(code=1006)
    assert (await watcher.receive())["peer"]["state"] == "reconnecting"

    assert await watcher.receive(timeout=5) == {"type": "peer_left", "peer_id": bob.id}
    membership = await Membership.objects.aget(session_id=bob.id)
    assert membership.state == "left" and membership.left_at is not None
    await watcher.disconnect()


async def test_reconnecting_peers_still_hold_their_place_in_a_full_lobby(
    alice: Person, bob: Person, carol: Person
) -> None:
    await Lobby.objects.acreate(name="pair", max_participants=2)
    first = await joined(alice, "pair")
    dropped = await joined(bob, "pair")
    await dropped.disconnect(code=1006)

    late = open_client("pair", token=carol.token)
    await late.connect(timeout=3)
    await late.expect_error("lobby_full")

    back = await joined(bob, "pair")
    assert back.welcome["peer_id"] == bob.id
    await first.disconnect()
    await back.disconnect()


async def test_a_token_unused_for_longer_than_the_idle_limit_cannot_join(alice: Person) -> None:
    await database_sync_to_async(leave_unused)(alice, days=31)

    client = open_client("room", token=alice.token)
    await client.connect(timeout=3)

    await client.expect_error("unauthenticated")
    await client.closed_with(4401)
    assert await AuditEvent.objects.filter(action="token_rejected", lobby="room").aexists()


async def test_a_join_records_the_use_so_the_token_keeps_working(alice: Person) -> None:
    await database_sync_to_async(leave_unused)(alice, days=29)
    first = await joined(alice)
    await first.disconnect()
    await database_sync_to_async(leave_unused)(alice, days=2)  # 31 days since it was created

    again = await joined(alice)

    assert again.welcome["peer_id"] == alice.id
    await again.disconnect()
