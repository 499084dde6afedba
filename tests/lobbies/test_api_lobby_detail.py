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
        "participants": [{"peer_id": alice.id, "name": "Alice", "bot": False, "muted": True, "state": "connected"}],
    }


def test_unicode_names_resolve() -> None:
    Lobby.objects.create(name="café")

    assert Client().get("/api/lobbies/caf%C3%A9/").json()["name"] == "café"


def test_an_unknown_lobby_is_404() -> None:
    response = Client().get("/api/lobbies/nowhere/")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
