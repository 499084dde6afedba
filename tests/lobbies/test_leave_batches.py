"""Leaves and drops recorded together (services.lobby_leave_many) come out
exactly as if made one at a time; a server process batches those that arrive
while one batch is in the database; the stays of a dead server's connections
are caught up a few lobbies at a time (services.memberships_expire)."""

import asyncio
from datetime import timedelta

import channels.consumer
import channels.generic.websocket
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import REGISTRY

from lobbies import selectors, services
from lobbies.models import Lobby, Membership, Session
from lobbies.services import LeaveRequest
from tests.conftest import Person, make_person
from tests.lobbies.test_consumers import open_client

pytestmark = pytest.mark.django_db(transaction=True)


def join(person: Person, lobby: str, channel: str) -> None:
    services.lobby_join(lobby_name=lobby, session=Session.objects.get(pk=person.id), channel_name=channel)


def leave(person: Person, lobby: str, channel: str, deliberate: bool) -> LeaveRequest:
    return LeaveRequest(lobby_name=lobby, session_id=person.id, channel_name=channel, deliberate=deliberate)


def states(lobby: str) -> dict[str, str]:
    """Each live member's state, by channel, as the cached roster says (what a joiner is told)."""
    roster = selectors.lobby_roster(Lobby.objects.get(name=lobby))
    return {entry["channel"]: entry["peer"]["state"] for entry in roster}


def test_leaves_and_drops_in_one_batch_end_as_if_made_one_by_one(alice: Person, bob: Person, carol: Person) -> None:
    dora = make_person("Dora")
    for person in (alice, bob, carol):
        join(person, "exit", f"c.{person.name}")
    join(dora, "other", "c.Dora")

    held = services.lobby_leave_many(
        requests=[
            leave(alice, "exit", "c.Alice", deliberate=True),
            leave(bob, "exit", "c.Bob", deliberate=False),
            # Not Carol's connection any more (replaced, say): her place stays.
            leave(carol, "exit", "c.stale", deliberate=True),
            leave(dora, "other", "c.Dora", deliberate=True),
        ]
    )

    assert held == [True, True, False, True]
    assert states("exit") == {"c.Bob": "reconnecting", "c.Carol": "connected"}
    assert states("other") == {}
    bob_row = Membership.objects.get(lobby__name="exit", session_id=bob.id)
    assert bob_row.left_at is None and bob_row.disconnected_at is not None
    assert Membership.objects.get(lobby__name="exit", session_id=alice.id).state == Membership.State.LEFT


def test_a_batch_of_leaves_costs_the_same_few_statements_however_many_leave() -> None:
    people = [make_person(f"P{number}") for number in range(40)]

    def statements(count: int, lobbies: list[str]) -> int:
        for name in lobbies:
            Lobby.objects.create(name=name, max_participants=50)
        requests = []
        for index, person in enumerate(people[:count]):
            lobby, channel = lobbies[index % len(lobbies)], f"c.{lobbies[0]}.{index}"
            join(person, lobby, channel)
            requests.append(leave(person, lobby, channel, deliberate=index % 3 == 0))
        with CaptureQueriesContext(connection) as captured:
            assert all(services.lobby_leave_many(requests=requests))
        return len(captured.captured_queries)

    assert statements(40, ["many-a", "many-b"]) == statements(2, ["few-a", "few-b"])
    assert statements(12, [f"spread-{number}" for number in range(12)]) == statements(2, ["pair-a", "pair-b"])


def make_stale(lobby: str, seconds_ago: float) -> None:
    """As if the server holding the lobby's connections had died `seconds_ago`."""
    Membership.objects.filter(lobby__name=lobby, left_at__isnull=True).update(
        last_seen_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def test_a_dead_servers_people_are_caught_up_a_few_lobbies_at_a_time() -> None:
    people = [make_person(f"P{number}") for number in range(30)]
    lobbies = [f"dead-{number}" for number in range(6)]
    for index, person in enumerate(people):
        join(person, lobbies[index % 6], f"c.{index}")
    silent = 2 * settings.PRESENCE_INTERVAL_SECONDS + 1
    for lobby in lobbies:
        make_stale(lobby, silent)

    assert services.memberships_expire(lobby_limit=4) == 4
    assert services.memberships_expire(lobby_limit=4) == 2
    assert services.memberships_expire(lobby_limit=4) == 0

    assert set(Membership.objects.filter(left_at__isnull=True).values_list("state", flat=True)) == {"reconnecting"}
    for lobby in lobbies:
        assert set(states(lobby).values()) == {"reconnecting"}
    # As if they had dropped when their server last refreshed them.
    dropped = Membership.objects.get(channel_name="c.0")
    assert dropped.disconnected_at == dropped.last_seen_at

    # Past the grace period, their stays end.
    make_gone(seconds_ago=settings.LOBBY_RESUME_GRACE_SECONDS + 1)
    assert services.memberships_expire(lobby_limit=4) == 4
    assert services.memberships_expire(lobby_limit=4) == 2
    assert not Membership.objects.filter(left_at__isnull=True).exists()
    assert all(states(lobby) == {} for lobby in lobbies)


def make_gone(seconds_ago: float) -> None:
    Membership.objects.filter(left_at__isnull=True).update(
        state=Membership.State.RECONNECTING, disconnected_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def test_catching_up_costs_the_same_few_statements_however_many_are_in_each_lobby() -> None:
    people = [make_person(f"P{number}") for number in range(24)]

    def statements(per_lobby: int, prefix: str) -> tuple[int, int]:
        """Statements to mark 4 lobbies' people reconnecting, then to end their stays."""
        for index, person in enumerate(people[: 4 * per_lobby]):
            join(person, f"{prefix}-{index % 4}", f"c.{prefix}.{index}")
        for number in range(4):
            make_stale(f"{prefix}-{number}", 2 * settings.PRESENCE_INTERVAL_SECONDS + 1)
        with CaptureQueriesContext(connection) as lost:
            assert services.memberships_expire(lobby_limit=4) == 4
        make_gone(seconds_ago=settings.LOBBY_RESUME_GRACE_SECONDS + 1)
        with CaptureQueriesContext(connection) as ended:
            assert services.memberships_expire(lobby_limit=4) == 4
        return len(lost.captured_queries), len(ended.captured_queries)

    assert statements(6, "crowded") == statements(1, "sparse")


@pytest.mark.usefixtures("channel_layer")
async def test_connections_dropping_at_once_leave_in_batches_and_the_one_left_hears_of_each() -> None:
    people = [await sync_to_async(make_person)(f"Guest {number}") for number in range(10)]
    clients = [open_client("crowd", token=person.token) for person in people]
    for client in clients:
        await client.connect(timeout=5)
        assert (await client.receive(timeout=5))["type"] == "welcome"
    stayer, leavers = clients[0], clients[1:]
    for _ in leavers:
        assert (await stayer.receive(timeout=5))["type"] == "peer_joined"
    before = REGISTRY.get_sample_value("voicebot_leave_batch_size_count")

    # 1006: the network went away, so each keeps its place for the grace period.
    await asyncio.gather(*(client.disconnect(code=1006) for client in leavers))

    news = [await stayer.receive(timeout=5) for _ in leavers]
    assert {(frame["type"], frame["peer"]["state"]) for frame in news} == {("peer_updated", "reconnecting")}
    assert {frame["peer"]["peer_id"] for frame in news} == {person.id for person in people[1:]}
    batches = REGISTRY.get_sample_value("voicebot_leave_batch_size_count") - before
    assert 1 <= batches < len(leavers)
    await stayer.disconnect()


@pytest.mark.usefixtures("channel_layer")
async def test_signaling_and_closing_make_no_thread_hop_to_clean_up_database_connections(
    alice: Person, bob: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channels makes one before every handler and on every close; the lobby
    consumer's database work cleans up itself (docs/performance.md)."""
    hops = []

    async def counted() -> None:
        hops.append(1)

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    monkeypatch.setattr(channels.generic.websocket, "aclose_old_connections", counted)
    stayer, leaver = open_client("quiet", token=alice.token), open_client("quiet", token=bob.token)
    for client in (stayer, leaver):
        await client.connect(timeout=5)
        assert (await client.receive(timeout=5))["type"] == "welcome"
    assert (await stayer.receive(timeout=5))["type"] == "peer_joined"

    await leaver.send_json_to({"type": "ping"})
    assert (await leaver.receive(timeout=5))["type"] == "pong"
    await leaver.disconnect()

    assert (await stayer.receive(timeout=5))["type"] == "peer_left"
    assert hops == []
    await stayer.disconnect()
