"""GET and POST /api/lobbies/."""

import json

import pytest
from django.contrib.auth.hashers import check_password
from django.test import Client
from django.utils import timezone

from lobbies import services
from lobbies.models import Lobby, Membership, Session
from tests.conftest import Person

pytestmark = pytest.mark.django_db


def create(client: Client, body: object, **headers: str):
    return client.post("/api/lobbies/", json.dumps(body), content_type="application/json", headers=headers)


def bearer(person: Person) -> dict[str, str]:
    return {"Authorization": f"Bearer {person.token}"}


def test_create_with_a_bearer_token_needs_no_csrf(alice: Person) -> None:
    client = Client(enforce_csrf_checks=True)

    response = create(client, {"name": "book-club", "private": False, "max_participants": 6}, **bearer(alice))

    assert response.status_code == 201
    assert response.json() == {
        "name": "book-club",
        "private": False,
        "max_participants": 6,
        "participant_count": 0,
        "has_password": False,
    }
    assert str(Lobby.objects.get(name="book-club").created_by_id) == alice.id


def test_defaults_apply_when_fields_are_left_out(alice: Person) -> None:
    response = create(Client(), {"name": "defaults"}, **bearer(alice))

    assert response.json() == {
        "name": "defaults",
        "private": False,
        "max_participants": 12,
        "participant_count": 0,
        "has_password": False,
    }


def test_a_cookie_authenticated_create_needs_the_csrf_token(alice: Person) -> None:
    client = Client(enforce_csrf_checks=True)
    client.cookies["voicebot_token"] = alice.token

    refused = create(client, {"name": "no-csrf"})
    assert refused.status_code == 403
    assert refused.json()["code"] == "csrf_failed"

    client.get("/")  # the page sets the csrftoken cookie
    allowed = create(client, {"name": "with-csrf"}, **{"X-CSRFToken": client.cookies["csrftoken"].value})
    assert allowed.status_code == 201
    assert not Lobby.objects.filter(name="no-csrf").exists()


def test_create_without_a_session_is_401() -> None:
    response = create(Client(), {"name": "anonymous"})

    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"


def test_a_taken_name_is_409(alice: Person, bob: Person) -> None:
    create(Client(), {"name": "taken"}, **bearer(alice))

    response = create(Client(), {"name": "taken"}, **bearer(bob))

    assert response.status_code == 409
    assert response.json()["code"] == "name_taken"


def test_a_name_taken_by_joining_is_409_too(alice: Person, bob: Person) -> None:
    services.lobby_join(lobby_name="joined-first", session=Session.objects.get(pk=alice.id), channel_name="c1")

    response = create(Client(), {"name": "joined-first"}, **bearer(bob))

    assert response.status_code == 409


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, "missing_field"),
        ({"name": ""}, "bad_field"),
        ({"name": "has space"}, "bad_field"),
        ({"name": "<script>"}, "bad_field"),
        ({"name": "x" * 65}, "bad_field"),
        ({"name": 12}, "bad_field"),
        ({"name": "ok", "private": "yes"}, "bad_field"),
        ({"name": "ok", "max_participants": 0}, "bad_field"),
        ({"name": "ok", "max_participants": 51}, "bad_field"),
        ({"name": "ok", "max_participants": True}, "bad_field"),
        ({"name": "ok", "max_participants": 2.5}, "bad_field"),
        ({"name": "ok", "password": ""}, "bad_field"),
        ({"name": "ok", "password": "x" * 129}, "bad_field"),
        ({"name": "ok", "password": 1234}, "bad_field"),
        ({"name": "ok", "password": None}, "bad_field"),
    ],
)
def test_bad_fields_say_what_is_wrong(alice: Person, body: dict, code: str) -> None:
    response = create(Client(), body, **bearer(alice))

    assert response.status_code == 400
    assert response.json()["code"] == code
    assert not Lobby.objects.exists()


def test_unicode_lobby_names_are_allowed(alice: Person) -> None:
    response = create(Client(), {"name": "café-Ω"}, **bearer(alice))

    assert response.status_code == 201


def test_list_shows_public_lobbies_busiest_first_with_counts(alice: Person, bob: Person) -> None:
    quiet = Lobby.objects.create(name="quiet")
    busy = Lobby.objects.create(name="busy", max_participants=4)
    for person in (alice, bob):
        Membership.objects.create(session_id=person.id, lobby=busy, channel_name=person.id)
    Membership.objects.create(session_id=alice.id, lobby=quiet, channel_name="gone", left_at="2026-01-01T00:00Z")

    response = Client().get("/api/lobbies/")

    assert response.status_code == 200
    assert response.json()["lobbies"] == [
        {"name": "busy", "private": False, "max_participants": 4, "participant_count": 2, "has_password": False},
        {"name": "quiet", "private": False, "max_participants": 12, "participant_count": 0, "has_password": False},
    ]


def test_private_lobbies_are_listed_only_to_their_creator(alice: Person, bob: Person) -> None:
    create(Client(), {"name": "secret", "private": True}, **bearer(alice))

    seen_by_alice = Client().get("/api/lobbies/", headers=bearer(alice)).json()["lobbies"]
    seen_by_bob = Client().get("/api/lobbies/", headers=bearer(bob)).json()["lobbies"]
    seen_by_anyone = Client().get("/api/lobbies/").json()["lobbies"]

    assert [lobby["name"] for lobby in seen_by_alice] == ["secret"]
    assert seen_by_alice[0]["private"] is True
    assert seen_by_bob == seen_by_anyone == []


def test_a_lobby_created_with_a_password_keeps_only_its_hash(alice: Person) -> None:
    response = create(Client(), {"name": "vault", "password": "open sesame"}, **bearer(alice))

    assert response.status_code == 201
    assert response.json()["has_password"] is True
    stored = Lobby.objects.get(name="vault").password_hash
    assert "open sesame" not in stored
    assert check_password("open sesame", stored)


def test_the_list_says_which_lobbies_need_a_password(alice: Person) -> None:
    create(Client(), {"name": "vault", "password": "open sesame"}, **bearer(alice))
    create(Client(), {"name": "open-door"}, **bearer(alice))

    listed = Client().get("/api/lobbies/").json()["lobbies"]

    assert {lobby["name"]: lobby["has_password"] for lobby in listed} == {"vault": True, "open-door": False}


def test_closed_lobbies_are_not_listed_and_their_names_stay_taken(alice: Person) -> None:
    Lobby.objects.create(name="shut", closed_at=timezone.now())
    Lobby.objects.create(name="open")

    listed = Client().get("/api/lobbies/").json()["lobbies"]
    again = create(Client(), {"name": "shut"}, **bearer(alice))

    assert [lobby["name"] for lobby in listed] == ["open"]
    assert again.status_code == 409
    assert again.json()["code"] == "name_taken"
