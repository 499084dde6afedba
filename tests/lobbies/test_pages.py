"""The landing page and the room page."""

import pytest
from django.test import Client


@pytest.mark.django_db
def test_landing_page_offers_name_and_lobbies() -> None:
    response = Client().get("/")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "csrftoken" in response.cookies


@pytest.mark.django_db
def test_room_page_carries_the_lobby_name_safely() -> None:
    response = Client().get("/lobby/café-1/")

    assert response.status_code == 200
    assert "café-1" in response.content.decode()


@pytest.mark.parametrize("path", ["/lobby/%3Cscript%3E/", "/lobby/" + "x" * 65 + "/"])
def test_room_page_for_an_impossible_name_is_404(path: str) -> None:
    assert Client().get(path).status_code == 404


def test_favicon_ico_leads_to_the_icon(client) -> None:
    """Pages without an icon link (the admin's) make browsers ask for /favicon.ico."""
    response = client.get("/favicon.ico")
    assert response.status_code == 301
    assert response["Location"] == "/static/lobbies/favicon.svg"
