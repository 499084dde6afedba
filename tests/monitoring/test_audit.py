"""The security audit log: every audited action leaves an AuditEvent saying who,
from where and when, and a line on the voicebot.audit logger; staff read them in
the admin, filtered by action and date; old ones are pruned."""

import datetime
import json
import logging
from urllib.parse import urlencode

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.test import Client
from django.utils import timezone

from bots.models import Bot, Provider
from lobbies import services
from lobbies.models import Lobby, Membership, Session
from monitoring.models import AuditEvent
from monitoring.services import audit_record, monitoring_prune
from tests.conftest import Person
from tests.lobbies.test_consumers import Client as LobbyClient
from voicebot.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

ADMIN_ADDRESS = "203.0.113.7"
VISITOR_ADDRESS = "198.51.100.23"
HOSTILE_NAME = "<img src=x onerror=window.__xss=1>"


@pytest.fixture
def admin_user(transactional_db: None) -> AbstractBaseUser:
    return get_user_model().objects.create_superuser("root", "root@example.com", "root-password")


@pytest.fixture
def staff(admin_user: AbstractBaseUser) -> Client:
    client = Client(REMOTE_ADDR=ADMIN_ADDRESS)
    client.force_login(admin_user)
    return client


@pytest.fixture(autouse=True)
def quick_hashing(settings) -> None:
    # Lobby passwords are hashed with Django's real hasher otherwise, half a second each.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def lobby_socket(lobby: str, *, token: str = "", password: str = "", origin: str = "") -> LobbyClient:
    """A lobby WebSocket from VISITOR_ADDRESS, as uvicorn describes a connection in its scope."""
    query = urlencode({name: value for name, value in [("token", token), ("password", password)] if value})
    headers = [(b"origin", origin.encode())] if origin else []
    client = LobbyClient(application, f"/ws/lobby/{lobby}/" + (f"?{query}" if query else ""), headers=headers)
    client.scope["client"] = (VISITOR_ADDRESS, 50123)
    return client


def only_event(action: str) -> AuditEvent:
    events = list(AuditEvent.objects.filter(action=action))
    assert len(events) == 1, [(event.action, event.actor) for event in AuditEvent.objects.all()]
    return events[0]


def assert_recent(event: AuditEvent) -> None:
    assert timezone.now() - datetime.timedelta(seconds=30) < event.created_at <= timezone.now()


def test_an_administrators_lobby_action_records_who_from_where_and_when(staff: Client, admin_user, alice: Person) -> None:
    creator = Session.objects.get(pk=alice.id)
    lobby = services.lobby_create(name="room", private=False, max_participants=4, created_by=creator)

    response = staff.post("/admin/lobbies/lobby/", {"action": "close_lobbies", "_selected_action": [lobby.pk]})

    assert response.status_code == 302
    event = only_event("lobby_close")
    assert (event.user, event.actor, event.ip, event.lobby) == (admin_user, "root", ADMIN_ADDRESS, "room")
    assert event.detail == {"lobby_id": lobby.pk, "session_ids": []}
    assert_recent(event)


@pytest.mark.usefixtures("channel_layer")
async def test_a_kick_records_the_administrator_and_the_kicked_session(admin_user, alice: Person) -> None:
    inside = lobby_socket("room", token=alice.token)
    assert (await inside.connect(timeout=3))[0]
    assert (await inside.receive())["type"] == "welcome"
    membership = await Membership.objects.aget(session_id=alice.id, left_at__isnull=True)
    admin = Client(REMOTE_ADDR=ADMIN_ADDRESS)
    await database_sync_to_async(admin.force_login)(admin_user)

    response = await database_sync_to_async(admin.post)(
        "/admin/lobbies/membership/", {"action": "kick", "_selected_action": [str(membership.pk)]}
    )

    assert response.status_code == 302
    await inside.expect_error("kicked")
    event = await database_sync_to_async(only_event)("membership_kick")
    assert (event.user_id, event.actor, event.ip, event.lobby) == (admin_user.pk, "root", ADMIN_ADDRESS, "room")
    assert event.detail["session_ids"] == [alice.id]
    assert_recent(event)
    await inside.disconnect()


def test_an_administrators_bot_action_records_who_from_where_and_when(staff: Client, admin_user, alice: Person) -> None:
    creator = Session.objects.get(pk=alice.id)
    lobby = services.lobby_create(name="kitchen", private=False, max_participants=4, created_by=creator)
    provider = Provider.objects.create(name="openai", kind=Provider.Kind.OPENAI, api_key_env="VOICEBOT_TEST_KEY")
    bot = Bot.objects.create(name="Ava", provider=provider, model_name="gpt-test", max_lobbies=1)

    staff.post("/admin/bots/bot/", {"action": "add_to_lobby", "_selected_action": [bot.pk], "lobby": lobby.pk})

    event = only_event("bot_add")
    assert (event.user, event.actor, event.ip, event.lobby) == (admin_user, "root", ADMIN_ADDRESS, "kitchen")
    assert event.detail["bot"] == "Ava"
    assert_recent(event)


@pytest.mark.usefixtures("channel_layer")
async def test_a_wrong_lobby_password_records_the_session_and_its_address(alice: Person, bob: Person) -> None:
    creator = await Session.objects.aget(pk=alice.id)
    await database_sync_to_async(services.lobby_create)(
        name="vault", private=True, max_participants=4, created_by=creator, password="open sesame"
    )
    # A page first tries without a password, then asks for one: that is not recorded.
    for password in ("", "guess"):
        client = lobby_socket("vault", token=bob.token, password=password)
        assert (await client.connect(timeout=3))[0]
        await client.expect_error("bad_password")
        await client.closed_with(4403)

    event = await database_sync_to_async(only_event)("lobby_password_failed")
    assert (str(event.session_id), event.actor, event.ip, event.lobby) == (bob.id, "Bob", VISITOR_ADDRESS, "vault")
    assert event.user_id is None
    assert "guess" not in json.dumps(event.detail)
    assert_recent(event)


@pytest.mark.usefixtures("channel_layer")
async def test_an_unknown_token_on_the_websocket_is_recorded_without_the_token() -> None:
    nobody = lobby_socket("room")
    assert (await nobody.connect(timeout=3))[0]
    await nobody.expect_error("unauthenticated")
    stranger = lobby_socket("room", token="not-a-real-token")
    assert (await stranger.connect(timeout=3))[0]

    await stranger.expect_error("unauthenticated")
    await stranger.closed_with(4401)

    event = await database_sync_to_async(only_event)("token_rejected")  # the one without a token is not
    assert (event.ip, event.lobby, event.session_id, event.actor) == (VISITOR_ADDRESS, "room", None, "")
    assert "not-a-real-token" not in json.dumps(event.detail)


@pytest.mark.usefixtures("channel_layer")
async def test_a_websocket_from_another_sites_page_is_refused_and_recorded(alice: Person) -> None:
    client = lobby_socket("room", token=alice.token, origin="https://evil.example")

    connected, _ = await client.connect(timeout=3)

    assert not connected
    event = await database_sync_to_async(only_event)("origin_rejected")
    assert event.ip == VISITOR_ADDRESS
    assert event.detail == {"origin": "https://evil.example", "path": "/ws/lobby/room/"}
    assert not await Lobby.objects.filter(name="room").aexists()


@pytest.mark.usefixtures("channel_layer")
async def test_a_malformed_origin_is_refused_and_the_server_carries_on(alice: Person) -> None:
    # urlparse raises on an unclosed IPv6 bracket; no browser sends one.
    client = lobby_socket("room", token=alice.token, origin="http://[::1")
    assert not (await client.connect(timeout=3))[0]

    still = lobby_socket("room", token=alice.token, origin="http://127.0.0.1:8000")
    assert (await still.connect(timeout=3))[0]
    assert (await still.receive())["type"] == "welcome"
    assert (await database_sync_to_async(only_event)("origin_rejected")).detail["origin"] == "http://[::1"
    await still.disconnect()


def test_an_unknown_bearer_token_and_a_cross_site_cookie_post_are_recorded(alice: Person) -> None:
    visitor = Client(REMOTE_ADDR=VISITOR_ADDRESS, enforce_csrf_checks=True)
    body = {"name": "new-lobby"}

    unknown = visitor.post(
        "/api/lobbies/", body, content_type="application/json", HTTP_AUTHORIZATION="Bearer not-a-real-token"
    )
    visitor.cookies["voicebot_token"] = alice.token
    forged = visitor.post("/api/lobbies/", body, content_type="application/json", HTTP_ORIGIN="https://evil.example")

    assert (unknown.status_code, unknown.json()["code"]) == (401, "unauthenticated")
    assert (forged.status_code, forged.json()["code"]) == (403, "csrf_failed")
    assert (only_event("token_rejected").ip, only_event("csrf_rejected").ip) == (VISITOR_ADDRESS, VISITOR_ADDRESS)
    assert only_event("csrf_rejected").detail == {"path": "/api/lobbies/"}
    assert not Lobby.objects.filter(name="new-lobby").exists()


def test_listing_lobbies_with_a_stale_token_is_not_recorded() -> None:
    # The landing page polls the list with whatever token its tab kept.
    response = Client().get("/api/lobbies/", HTTP_AUTHORIZATION="Bearer stale-token")

    assert response.status_code == 200
    assert not AuditEvent.objects.exists()


def test_audit_record_logs_the_event_on_the_audit_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voicebot.audit")

    event = audit_record(
        action="rate_limit_close", actor="Mallory", ip="2001:DB8::1", lobby="room", detail={"name": "x", "limit": 20}
    )

    [record] = [record for record in caplog.records if record.name == "voicebot.audit"]
    assert record.getMessage() == "rate_limit_close: Mallory from 2001:db8::1 in lobby room"
    assert (record.action, record.actor, record.ip, record.lobby, record.limit) == (
        "rate_limit_close", "Mallory", "2001:db8::1", "room", 20,
    )
    # "name" is a log record's own attribute: it goes out prefixed, the row keeps it as given.
    assert record.name == "voicebot.audit" and record.detail_name == "x"
    assert AuditEvent.objects.get() == event and event.detail == {"name": "x", "limit": 20}


def test_an_address_that_is_not_an_ip_is_stored_as_unknown() -> None:
    event = audit_record(action="token_rejected", ip="unix:/run/voicebot.sock")

    event.refresh_from_db()
    assert event.ip is None


def test_staff_filter_the_log_by_action_and_search_it_by_address(staff: Client) -> None:
    audit_record(action="token_rejected", ip="192.0.2.1", lobby="first")
    audit_record(action="origin_rejected", ip="192.0.2.2", lobby="second")
    audit_record(action="token_rejected", ip="192.0.2.3", lobby="third")

    by_action = staff.get("/admin/monitoring/auditevent/", {"action": "token_rejected"}).content.decode()
    by_address = staff.get("/admin/monitoring/auditevent/", {"q": "192.0.2.2"}).content.decode()
    today = timezone.now()
    by_date = staff.get(
        "/admin/monitoring/auditevent/",
        {"created_at__gte": today.strftime("%Y-%m-%d 00:00:00+00:00"), "action": "origin_rejected"},
    ).content.decode()

    assert "192.0.2.1" in by_action and "192.0.2.3" in by_action and "192.0.2.2" not in by_action
    assert "192.0.2.2" in by_address and "192.0.2.1" not in by_address
    assert "192.0.2.2" in by_date and "192.0.2.1" not in by_date


def test_the_log_is_read_only_even_for_superusers(staff: Client) -> None:
    event = audit_record(action="token_rejected", ip="192.0.2.1")

    assert staff.get("/admin/monitoring/auditevent/add/").status_code == 403
    assert staff.post(f"/admin/monitoring/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    page = staff.get(f"/admin/monitoring/auditevent/{event.pk}/change/").content.decode()
    assert "192.0.2.1" in page and 'name="_save"' not in page
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_others_cannot_read_the_log(django_user_model) -> None:
    visitor = Client()
    visitor.force_login(django_user_model.objects.create_user("visitor", password="x"))

    response = visitor.get("/admin/monitoring/auditevent/")

    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_names_from_users_are_shown_as_text_in_the_list(staff: Client) -> None:
    audit_record(action="lobby_password_failed", actor=HOSTILE_NAME, ip="192.0.2.1", detail={"note": HOSTILE_NAME})

    page = staff.get("/admin/monitoring/auditevent/").content.decode()

    assert "&lt;img src=x onerror=window.__xss=1&gt;" in page
    assert HOSTILE_NAME not in page


def test_retention_prunes_events_older_than_audit_retention_days(settings) -> None:
    settings.AUDIT_RETENTION_DAYS = 7
    now = timezone.now()
    old = audit_record(action="token_rejected", ip="192.0.2.1")
    recent = audit_record(action="token_rejected", ip="192.0.2.2")
    AuditEvent.objects.filter(pk=old.pk).update(created_at=now - datetime.timedelta(days=7, seconds=1))
    AuditEvent.objects.filter(pk=recent.pk).update(created_at=now - datetime.timedelta(days=6, hours=23))

    monitoring_prune(now=now)

    assert list(AuditEvent.objects.values_list("ip", flat=True)) == ["192.0.2.2"]
