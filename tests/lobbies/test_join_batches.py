"""Joins decided together, in one transaction (services.lobby_join_many),
come out exactly as if they had been made one after the other; a server
process batches the joins that arrive while one batch is in the database."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import REGISTRY

from lobbies import services
from lobbies.models import Lobby, LobbyBan, Membership, Session
from lobbies.services import BadPassword, JoinRequest, JoinResult, LobbyClosed, LobbyFull, SessionKicked
from tests.conftest import Person, make_person
from tests.lobbies.test_consumers import open_client

pytestmark = pytest.mark.django_db(transaction=True)


def request(person: Person, lobby: str, channel: str, password: str = "") -> JoinRequest:
    session = Session.objects.get(pk=person.id)
    return JoinRequest(lobby_name=lobby, session=session, channel_name=channel, password=password)


def batch_totals() -> tuple[float, float]:
    """Joins and batches so far, from the voicebot_join_batch_size histogram."""
    return (
        REGISTRY.get_sample_value("voicebot_join_batch_size_sum"),
        REGISTRY.get_sample_value("voicebot_join_batch_size_count"),
    )


def peer_ids(result: JoinResult) -> list[str]:
    return [peer["peer_id"] for peer, _ in result.peers]


def test_the_last_places_go_to_the_first_in_the_batch(alice: Person, bob: Person, carol: Person) -> None:
    services.lobby_create(name="pair", private=False, max_participants=2, created_by=Session.objects.get(pk=alice.id))

    first, second, third = services.lobby_join_many(
        requests=[request(alice, "pair", "c.alice"), request(bob, "pair", "c.bob"), request(carol, "pair", "c.carol")]
    )

    assert isinstance(third, LobbyFull)
    # Each is told of everyone in the lobby once the batch is in.
    assert (peer_ids(first), peer_ids(second)) == ([bob.id], [alice.id])
    live = Membership.objects.filter(lobby__name="pair", left_at__isnull=True)
    assert sorted(live.values_list("channel_name", flat=True)) == ["c.alice", "c.bob"]
    assert first.membership_id != second.membership_id


def test_a_batch_costs_the_same_few_statements_however_many_join() -> None:
    people = [make_person(f"P{number}") for number in range(40)]

    def statements(count: int, lobbies: list[str]) -> int:
        # Made beforehand, so that the batch does not create them.
        for name in lobbies:
            Lobby.objects.create(name=name, max_participants=50)
        requests = [request(person, lobbies[index % 2], f"c.{index}") for index, person in enumerate(people[:count])]
        with CaptureQueriesContext(connection) as captured:
            results = services.lobby_join_many(requests=requests)
        assert all(isinstance(result, JoinResult) for result in results)
        return len(captured.captured_queries)

    assert statements(40, ["many-a", "many-b"]) == statements(2, ["few-a", "few-b"])


def test_a_batch_costs_the_same_few_statements_however_many_lobbies_it_creates_and_joins() -> None:
    people = [make_person(f"P{number}") for number in range(24)]

    def statements(lobbies: int, prefix: str) -> int:
        """Two people into each of `lobbies` lobbies that do not exist yet."""
        requests = [request(person, f"{prefix}-{index % lobbies}", f"c.{prefix}.{index}")
                    for index, person in enumerate(people[: 2 * lobbies])]
        with CaptureQueriesContext(connection) as captured:
            results = services.lobby_join_many(requests=requests)
        assert all(isinstance(result, JoinResult) for result in results)
        return len(captured.captured_queries)

    assert statements(12, "many") == statements(1, "one")
    assert Lobby.objects.filter(name__startswith="many-").count() == 12
    # Each newcomer was told of the other one in its lobby.
    assert Membership.objects.filter(lobby__name="many-11", left_at__isnull=True).count() == 2


def test_a_membership_deleted_behind_the_services_back_does_not_block_joins(alice: Person, bob: Person) -> None:
    services.lobby_join(lobby_name="purged", session=Session.objects.get(pk=alice.id), channel_name="c.old")
    Membership.objects.filter(lobby__name="purged").delete()

    back, other = services.lobby_join_many(
        requests=[request(alice, "purged", "c.new"), request(bob, "purged", "c.bob")]
    )

    assert (peer_ids(back), peer_ids(other)) == ([bob.id], [alice.id])
    assert Membership.objects.filter(lobby__name="purged", left_at__isnull=True).count() == 2


def test_refusals_in_a_batch_leave_the_others_joined(alice: Person, bob: Person, carol: Person) -> None:
    owner = Session.objects.get(pk=alice.id)
    services.lobby_create(name="vault", private=True, max_participants=8, created_by=owner, password="s3cret")
    closed = services.lobby_create(name="shut", private=False, max_participants=8, created_by=owner)
    Lobby.objects.filter(pk=closed.pk).update(closed_at=timezone.now())
    kicked_from = services.lobby_create(name="strict", private=False, max_participants=8, created_by=owner)
    LobbyBan.objects.create(lobby=kicked_from, session_id=carol.id, until=timezone.now() + timedelta(minutes=5))
    dora = make_person("Dora")

    outcomes = services.lobby_join_many(
        requests=[
            request(alice, "vault", "c.1", password="s3cret"),
            request(bob, "vault", "c.2", password="wrong"),
            request(carol, "vault", "c.3"),
            request(bob, "shut", "c.4"),
            request(carol, "strict", "c.5"),
            request(dora, "nowhere", "c.6", password="s3cret"),
            request(dora, "open", "c.7"),
        ]
    )

    kinds = [type(outcome) for outcome in outcomes]
    assert kinds == [JoinResult, BadPassword, BadPassword, LobbyClosed, SessionKicked, BadPassword, JoinResult]
    assert not Lobby.objects.filter(name="nowhere").exists()
    assert set(Membership.objects.filter(left_at__isnull=True).values_list("channel_name", flat=True)) == {"c.1", "c.7"}


def test_one_session_twice_in_a_batch_keeps_one_place(alice: Person, bob: Person) -> None:
    first, again, other = services.lobby_join_many(
        requests=[request(alice, "twice", "c.tab1"), request(alice, "twice", "c.tab2"), request(bob, "twice", "c.bob")]
    )

    assert first.membership_id == again.membership_id
    assert peer_ids(again) == [bob.id] and peer_ids(other) == [alice.id]
    live = Membership.objects.get(lobby__name="twice", session_id=alice.id, left_at__isnull=True)
    assert (live.channel_name, live.state) == ("c.tab2", Membership.State.CONNECTED)


def test_sessions_in_the_lobby_resume_their_places_together(alice: Person, bob: Person, carol: Person) -> None:
    for person in (alice, bob, carol):
        services.lobby_join(
            lobby_name="storm", session=Session.objects.get(pk=person.id), channel_name=f"old.{person.name}"
        )
        services.lobby_disconnect(lobby_name="storm", session_id=person.id, channel_name=f"old.{person.name}")

    results = services.lobby_join_many(
        requests=[request(person, "storm", f"new.{person.name}") for person in (carol, alice, bob)]
    )

    for result in results:
        assert [peer["state"] for peer, _ in result.peers] == ["connected", "connected"]
    assert [channel for _, channel in results[0].peers] == ["new.Alice", "new.Bob"]
    live = Membership.objects.filter(lobby__name="storm", left_at__isnull=True)
    assert sorted(live.values_list("channel_name", "state")) == [
        ("new.Alice", "connected"),
        ("new.Bob", "connected"),
        ("new.Carol", "connected"),
    ]


@pytest.mark.usefixtures("channel_layer")
async def test_connects_at_once_are_joined_in_batches_and_the_lobby_fills_exactly() -> None:
    people = [await sync_to_async(make_person)(f"Guest {number}") for number in range(12)]
    await Lobby.objects.acreate(name="rush", max_participants=8)
    before = batch_totals()
    clients = [open_client("rush", token=person.token) for person in people]

    await asyncio.gather(*(client.connect(timeout=5) for client in clients))
    frames = await asyncio.gather(*(client.receive(timeout=5) for client in clients))

    kinds = sorted(frame.get("code", frame["type"]) for frame in frames)
    assert kinds == ["lobby_full"] * 4 + ["welcome"] * 8
    # Whoever got in is told of all the others, by its welcome or after it.
    for client, frame in zip(clients, frames):
        if frame["type"] == "welcome":
            known = {peer["peer_id"] for peer in frame["peers"]}
            while len(known) < 7:
                news = await client.receive(timeout=5)
                assert news["type"] == "peer_joined", news
                known.add(news["peer"]["peer_id"])
    joins, batches = (total - earlier for total, earlier in zip(batch_totals(), before))
    assert joins == 12 and batches < 12
    for client in clients:
        await client.disconnect()
