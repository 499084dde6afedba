"""GET /api/lobbies/<name>/."""

import pytest
from django.test import Client

from lobbies.models import Lobby, Membership
from tests.conftest import Person

pytestmark = pytest.mark.django_db


def test_detail_lists_the_participants(alice: Person, bob: Person) -> None:
    lobby = Lobby.objects.create(name="detail", max_participants=5)
    Membership.objects.create(session_id=alice.id, lobby=lobby, channel_name="a", muted=True)
    Membership.objects.create(session_id=bob.id, lobby=lobby, channel_name="b", left_at="2026-01-01T00:00Z")

    response = Client().get("/api/lobbies/detail/")

    assert response.status_code == 200
    assert response.json() == {
        "name": "detail",
        "private": False,
        "max_participants": 5,
        "participant_count": 1,
        "has_password": False,
        "participants": [{"peer_id": alice.id, "name": "Alice", "bot": False, "muted": True, "state": "connected"}],
    }


def test_unicode_names_resolve() -> None:
    Lobby.objects.create(name="café")

    assert Client().get("/api/lobbies/caf%C3%A9/").json()["name"] == "café"


def test_an_unknown_lobby_is_404() -> None:
    response = Client().get("/api/lobbies/nowhere/")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.fixture
def vault() -> Lobby:
    lobby = Lobby(name="vault")
    lobby.set_password("open sesame")
    lobby.save()
    return lobby


def detail(name: str, password: str | None = None):
    headers = {"X-Lobby-Password": password} if password is not None else {}
    return Client().get(f"/api/lobbies/{name}/", headers=headers)


@pytest.mark.parametrize("password", [None, "", "open sesame!"], ids=["no-header", "empty", "wrong"])
def test_a_password_lobby_without_its_password_looks_like_no_lobby_at_all(vault: Lobby, password: str | None) -> None:
    response = detail("vault", password)

    assert response.status_code == 404
    assert response.json() == detail("no-such-vault", password).json()


def test_the_right_password_shows_a_password_lobby(vault: Lobby) -> None:
    response = detail("vault", "open sesame")

    assert response.status_code == 200
    assert response.json()["name"] == "vault"
    assert response.json()["has_password"] is True
