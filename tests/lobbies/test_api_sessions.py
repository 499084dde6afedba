"""POST /api/sessions/ and POST /api/sessions/resume/."""

import json
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from lobbies.models import Lobby, Session
from lobbies.selectors import cache_session, token_hash
from monitoring.models import AuditEvent
from tests.conftest import Person, leave_unused

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


# --- tokens expire after SESSION_IDLE_DAYS without use ------------------------


def test_a_token_unused_for_longer_than_the_idle_limit_is_refused_like_an_unknown_one(alice: Person) -> None:
    leave_unused(alice, days=31)
    bearer = {"Authorization": f"Bearer {alice.token}"}

    resumed = post(Client(), "/api/sessions/resume/", {}, **bearer)
    created = post(Client(), "/api/lobbies/", {"name": "too-late"}, **bearer)

    assert resumed.status_code == 401 and resumed.json()["code"] == "unauthenticated"
    assert created.status_code == 401 and created.json()["code"] == "unauthenticated"
    assert AuditEvent.objects.filter(action="token_rejected").count() == 1  # as for an unknown token
    assert not Lobby.objects.exists()


def test_a_use_within_the_idle_limit_keeps_the_token_working_for_another_period(alice: Person) -> None:
    bearer = {"Authorization": f"Bearer {alice.token}"}
    leave_unused(alice, days=29)

    assert post(Client(), "/api/sessions/resume/", {}, **bearer).status_code == 200
    leave_unused(alice, days=2)  # 31 days since it was created, 2 since it was used

    assert post(Client(), "/api/sessions/resume/", {}, **bearer).status_code == 200


def test_a_use_is_recorded_at_most_once_an_hour(alice: Person, django_assert_num_queries) -> None:
    leave_unused(alice, days=2)
    bearer = {"Authorization": f"Bearer {alice.token}"}

    with django_assert_num_queries(2):  # read the session, record the use
        assert post(Client(), "/api/sessions/resume/", {}, **bearer).status_code == 200
    with django_assert_num_queries(0):
        assert post(Client(), "/api/sessions/resume/", {}, **bearer).status_code == 200

    assert timezone.now() - Session.objects.get(pk=alice.id).last_seen_at < timedelta(minutes=1)


def test_a_cached_copy_does_not_keep_an_expired_session_alive(alice: Person) -> None:
    session = Session.objects.get(pk=alice.id)
    session.last_seen_at = timezone.now() - timedelta(days=31)
    Session.objects.filter(pk=alice.id).update(last_seen_at=session.last_seen_at)
    # A copy cached when it was last used, still within the cache's TTL.
    cache_session(session)

    response = post(Client(), "/api/sessions/resume/", {}, Authorization=f"Bearer {alice.token}")

    assert response.status_code == 401


def test_a_session_kept_fresh_elsewhere_is_not_refused_for_a_stale_cached_copy(alice: Person) -> None:
    session = Session.objects.get(pk=alice.id)
    # The cached copy is old; the row was refreshed since (by the presence beat of a call, say).
    session.last_seen_at = timezone.now() - timedelta(days=31)
    cache_session(session)

    response = post(Client(), "/api/sessions/resume/", {}, Authorization=f"Bearer {alice.token}")

    assert response.status_code == 200
