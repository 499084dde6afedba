"""Joining lobbies that have a password. Their details over HTTP are in test_api_lobby_detail.py."""

import pytest
from channels.db import database_sync_to_async

from lobbies import services
from lobbies.models import Lobby, Session
from tests.conftest import Person
from tests.lobbies.test_consumers import Client, open_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer")]


@pytest.fixture(autouse=True)
def quick_hashing(settings) -> None:
    # Django's real hasher takes half a second a password on purpose; what is
    # tested here is which password opens what, not the hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def vault(alice: Person) -> Lobby:
    creator = Session.objects.get(pk=alice.id)
    return services.lobby_create(
        name="vault", private=True, max_participants=4, created_by=creator, password="open sesame"
    )


async def joined(person: Person, lobby: str = "vault", password: str = "") -> Client:
    client = open_client(lobby, token=person.token, password=password)
    connected, _ = await client.connect(timeout=3)
    assert connected
    client.welcome = await client.receive()
    assert client.welcome["type"] == "welcome", client.welcome
    return client


async def refused(person: Person, lobby: str = "vault", password: str = "") -> dict:
    """Connect and expect bad_password and close 4403; returns the error frame."""
    client = open_client(lobby, token=person.token, password=password)
    connected, _ = await client.connect(timeout=3)
    assert connected
    frame = await client.expect_error("bad_password")
    await client.closed_with(4403)
    return frame


async def test_the_right_password_lets_people_in(vault: Lobby, alice: Person, bob: Person) -> None:
    first = await joined(alice, password="open sesame")
    second = await joined(bob, password="open sesame")

    assert [peer["peer_id"] for peer in second.welcome["peers"]] == [alice.id]
    assert (await first.receive())["type"] == "peer_joined"
    await first.disconnect()
    await second.disconnect()


@pytest.mark.parametrize("password", ["", "open sesame!", "OPEN SESAME"], ids=["missing", "wrong", "wrong-case"])
async def test_a_missing_or_wrong_password_is_refused_unseen_by_the_others(
    vault: Lobby, alice: Person, bob: Person, password: str
) -> None:
    inside = await joined(alice, password="open sesame")

    await refused(bob, password=password)

    assert await inside.receive_nothing(timeout=0.3)
    await inside.still_works()
    await inside.disconnect()


async def test_a_password_for_a_lobby_that_does_not_exist_gets_the_same_answer_and_creates_nothing(
    vault: Lobby, alice: Person
) -> None:
    wrong_password = await refused(alice, "vault", password="guess")
    no_such_lobby = await refused(alice, "no-such-vault", password="guess")

    assert no_such_lobby == wrong_password
    assert not await Lobby.objects.filter(name="no-such-vault").aexists()


async def test_a_participant_resumes_its_place_without_the_password(vault: Lobby, alice: Person, bob: Person) -> None:
    watcher = await joined(alice, password="open sesame")
    dropped = await joined(bob, password="open sesame")
    assert (await watcher.receive())["type"] == "peer_joined"
    await dropped.disconnect(code=1006)
    assert (await watcher.receive())["peer"]["state"] == "reconnecting"

    back = await joined(bob)

    assert back.welcome["peer_id"] == bob.id
    assert (await watcher.receive())["peer"]["state"] == "connected"
    await watcher.disconnect()
    await back.disconnect()


async def test_once_gone_a_participant_needs_the_password_again(vault: Lobby, alice: Person) -> None:
    client = await joined(alice, password="open sesame")
    await client.disconnect(code=1000)

    await refused(alice)


async def test_passwords_outside_ascii_work_percent_encoded(alice: Person, bob: Person) -> None:
    creator = await Session.objects.aget(pk=alice.id)
    await database_sync_to_async(services.lobby_create)(
        name="équipe", private=False, max_participants=4, created_by=creator, password="mot de passe: é€ & ?="
    )

    client = await joined(bob, "équipe", password="mot de passe: é€ & ?=")

    assert client.welcome["lobby"]["name"] == "équipe"
    await client.disconnect()


async def test_a_lobby_without_a_password_lets_in_someone_who_brings_one(alice: Person) -> None:
    await Lobby.objects.acreate(name="open-door")

    client = await joined(alice, "open-door", password="unneeded")

    assert client.welcome["lobby"]["name"] == "open-door"
    await client.disconnect()
