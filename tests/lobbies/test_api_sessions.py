"""POST /api/sessions/ and POST /api/sessions/resume/."""

import json

import pytest
from django.test import Client

from lobbies.models import Session
from lobbies.selectors import token_hash
from tests.conftest import Person

pytestmark = pytest.mark.django_db


def post(client: Client, path: str, body: object, **headers: str):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, data, content_type="application/json", headers=headers)


def test_create_returns_identity_and_token_and_sets_the_cookie() -> None:
    client = Client(enforce_csrf_checks=True)  # no CSRF token is needed

    response = post(client, "/api/sessions/", {"name": "  Alice   Liddell "})

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "name", "token"}
    assert body["name"] == "Alice Liddell"
    assert len(body["token"]) >= 40
    cookie = response.cookies["voicebot_token"]
    assert cookie.value == body["token"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"


def test_only_a_hash_of_the_token_is_stored() -> None:
    body = post(Client(), "/api/sessions/", {"name": "Alice"}).json()

    session = Session.objects.get(pk=body["id"])
    assert session.token_hash == token_hash(body["token"])
    assert body["token"] not in session.token_hash


def test_unicode_names_are_welcome() -> None:
    response = post(Client(), "/api/sessions/", {"name": "Zoë 王"})

    assert response.status_code == 201
    assert response.json()["name"] == "Zoë 王"


@pytest.mark.parametrize(
    "body, code",
    [
        ("not json", "bad_json"),
        ([1, 2], "bad_json"),
        ({}, "missing_field"),
        ({"name": "   "}, "missing_field"),
        ({"name": 42}, "bad_field"),
        ({"name": "x" * 65}, "bad_field"),
        ({"name": "bell\u0007"}, "bad_field"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: object, code: str) -> None:
    response = post(Client(), "/api/sessions/", body)

    assert response.status_code == 400
    assert response.json()["code"] == code
    assert Session.objects.count() == 0


def test_an_oversized_body_is_refused() -> None:
    response = post(Client(), "/api/sessions/", {"name": "A", "padding": "x" * 20_000})

    assert response.status_code == 413
    assert response.json()["code"] == "too_large"


def test_get_is_not_allowed() -> None:
    response = Client().get("/api/sessions/")

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert response["Allow"] == "POST"


def test_a_form_post_is_refused_so_other_sites_cannot_plant_a_session() -> None:
    response = Client().post("/api/sessions/", '{"name": "Mallory"}', content_type="text/plain")

    assert response.status_code == 415
    assert response.json()["code"] == "bad_content_type"
    assert Session.objects.count() == 0


def test_resume_points_the_cookie_at_the_bearer_session(alice: Person) -> None:
    client = Client(enforce_csrf_checks=True)

    response = post(client, "/api/sessions/resume/", {}, Authorization=f"Bearer {alice.token}")

    assert response.status_code == 200
    assert response.json() == {"id": alice.id, "name": "Alice"}
    assert response.cookies["voicebot_token"].value == alice.token


@pytest.mark.parametrize("authorization", ["", "Bearer not-a-token", "Basic abc"])
def test_resume_without_a_valid_token_is_401(authorization: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    response = post(Client(), "/api/sessions/resume/", {}, **headers)

    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert "voicebot_token" not in response.cookies
