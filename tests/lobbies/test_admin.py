"""The admin site: lobbies, sessions and who was where, and the actions that
act at once on the people in a lobby (close, reopen, kick, mute)."""

import asyncio
import http.cookiejar
import logging
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import timedelta

import pytest
import websockets
from channels.db import database_sync_to_async
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import Permission
from django.test import AsyncClient, Client as HttpClient
from django.utils import timezone

from lobbies import services
from lobbies.models import Lobby, LobbyBan, Membership
from tests.conftest import LiveClient, LiveServer, Person
from tests.lobbies.test_consumers import joined, open_client

pytestmark = pytest.mark.django_db(transaction=True)
# Over the Redis and the in-memory channel layer, as the other consumer tests.
over_both_layers = pytest.mark.usefixtures("channel_layer")

ADMIN_PASSWORD = "correct horse battery staple"


@pytest.fixture
def admin_user(transactional_db: None) -> AbstractBaseUser:
    return get_user_model().objects.create_superuser("root", "root@example.com", ADMIN_PASSWORD)


@pytest.fixture
async def admin(admin_user: AbstractBaseUser) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(admin_user)
    return client


async def act(admin: AsyncClient, model: str, action: str, *objects: Lobby | Membership) -> None:
    """Run an admin action on the list page, as an administrator ticking rows does."""
    selected = [str(obj.pk) for obj in objects]
    response = await admin.post(f"/admin/lobbies/{model}/", {"action": action, "_selected_action": selected})
    assert response.status_code == 302, response.content


async def refused(person: Person, code: str, close_code: int, lobby: str = "room") -> dict:
    client = open_client(lobby, token=person.token)
    await client.connect(timeout=3)
    frame = await client.expect_error(code)
    await client.closed_with(close_code)
    return frame


# Reads through database_sync_to_async, which closes the connection it used,
# so that none is left open to the test database when the test ends.


@database_sync_to_async
def live_membership(person: Person, lobby: str = "room") -> Membership:
    return Membership.objects.get(session_id=person.id, lobby__name=lobby, left_at__isnull=True)


@database_sync_to_async
def log_entry(obj: Lobby | Membership) -> LogEntry:
    """The admin log's one entry about `obj`."""
    entries = list(LogEntry.objects.filter(object_id=str(obj.pk)).select_related("user", "content_type"))
    assert len(entries) == 1, entries
    assert entries[0].content_type.model_class() is type(obj)
    return entries[0]


@database_sync_to_async
def stays_in(lobby: Lobby) -> list[Membership]:
    return list(Membership.objects.filter(lobby=lobby))


@database_sync_to_async
def lobby_named(name: str) -> Lobby:
    return Lobby.objects.get(name=name)


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "voicebot.audit"]


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="voicebot.audit")
    return caplog


@over_both_layers
async def test_closing_a_lobby_disconnects_everyone_and_keeps_newcomers_out(
    admin: AsyncClient, audit: pytest.LogCaptureFixture, alice: Person, bob: Person, carol: Person
) -> None:
    first = await joined(alice)
    second = await joined(bob)
    assert (await first.receive())["type"] == "peer_joined"
    lobby = await lobby_named("room")

    await act(admin, "lobby", "close_lobbies", lobby)

    for client in (first, second):
        await client.expect_error("lobby_closed")
        await client.closed_with(4410)
    await refused(carol, "lobby_closed", 4410)
    # Their stays ended, and are kept as history.
    stays = await stays_in(lobby)
    assert len(stays) == 2 and all(stay.left_at is not None and stay.state == "left" for stay in stays)
    entry = await log_entry(lobby)
    assert entry.user.username == "root"
    assert entry.get_change_message() == "Closed the lobby; 2 participant(s) disconnected."
    [record] = audit_records(audit)
    assert (record.action, record.admin_user, record.lobby) == ("lobby_close", "root", "room")
    assert sorted(record.session_ids) == sorted([alice.id, bob.id])


@over_both_layers
async def test_reopening_a_closed_lobby_lets_people_join_again(
    admin: AsyncClient, admin_user: AbstractBaseUser, audit: pytest.LogCaptureFixture, alice: Person
) -> None:
    lobby = await Lobby.objects.acreate(name="room")
    await database_sync_to_async(services.lobby_close)(lobby_name="room", by=admin_user)

    await act(admin, "lobby", "reopen_lobbies", lobby)

    client = await joined(alice)
    assert client.welcome["lobby"]["name"] == "room"
    assert (await log_entry(lobby)).get_change_message() == "Reopened the lobby."
    assert [record.action for record in audit_records(audit)] == ["lobby_close", "lobby_reopen"]
    await client.disconnect()


@over_both_layers
async def test_a_kicked_participant_is_closed_and_kept_out_while_the_others_see_it_leave(
    admin: AsyncClient, audit: pytest.LogCaptureFixture, alice: Person, bob: Person, carol: Person
) -> None:
    first = await joined(alice)
    kicked = await joined(bob)
    third = await joined(carol)
    assert (await first.receive())["type"] == "peer_joined"
    for client in (first, kicked):
        assert (await client.receive())["type"] == "peer_joined"
    membership = await live_membership(bob)

    await act(admin, "membership", "kick", membership)

    frame = await kicked.expect_error("kicked")
    assert "5 min" in frame["message"]
    await kicked.closed_with(4008)
    for client in (first, third):
        assert await client.receive() == {"type": "peer_left", "peer_id": bob.id}
    again = await refused(bob, "kicked", 4008)
    assert "5 min" in again["message"]
    elsewhere = await joined(bob, "elsewhere")  # the ban is for that one lobby
    ban = await LobbyBan.objects.select_related("created_by").aget(session_id=bob.id)
    assert ban.created_by.username == "root"
    assert timedelta(seconds=295) < ban.until - timezone.now() <= timedelta(seconds=300)
    assert "may not rejoin it before" in (await log_entry(membership)).get_change_message()
    [record] = audit_records(audit)
    assert (record.action, record.admin_user, record.lobby, record.session_ids) == (
        "membership_kick",
        "root",
        "room",
        [bob.id],
    )
    for client in (first, third, elsewhere):
        await client.disconnect()


@over_both_layers
async def test_a_kicked_participant_may_rejoin_once_the_ban_runs_out(
    settings, admin: AsyncClient, alice: Person, bob: Person
) -> None:
    settings.LOBBY_KICK_SECONDS = 1
    await joined(alice)
    kicked = await joined(bob)

    await act(admin, "membership", "kick", await live_membership(bob))
    await kicked.expect_error("kicked")
    assert "1 s" in (await refused(bob, "kicked", 4008))["message"]
    await asyncio.sleep(1.1)

    back = await joined(bob)
    assert back.welcome["peer_id"] == bob.id
    await back.disconnect()


@over_both_layers
async def test_muting_a_participant_tells_everyone_including_it(
    admin: AsyncClient, audit: pytest.LogCaptureFixture, alice: Person, bob: Person
) -> None:
    first = await joined(alice)
    muted = await joined(bob)
    assert (await first.receive())["type"] == "peer_joined"
    membership = await live_membership(bob)

    await act(admin, "membership", "mute", membership)

    expected = {
        "type": "peer_updated",
        "peer": {"peer_id": bob.id, "name": "Bob", "bot": False, "muted": True, "state": "connected"},
    }
    assert await first.receive() == expected
    assert await muted.receive() == expected
    assert (await log_entry(membership)).get_change_message() == "Muted in room."
    [record] = audit_records(audit)
    assert (record.action, record.session_ids) == ("membership_mute", [bob.id])
    await first.disconnect()
    await muted.disconnect()


@over_both_layers
async def test_staff_who_may_only_look_cannot_kick(alice: Person) -> None:
    viewer = await get_user_model().objects.acreate_user("viewer", password="x", is_staff=True)
    await viewer.user_permissions.aadd(await Permission.objects.aget(codename="view_membership"))
    client = AsyncClient()
    await client.aforce_login(viewer)
    inside = await joined(alice)
    membership = await live_membership(alice)

    await client.post("/admin/lobbies/membership/", {"action": "kick", "_selected_action": [str(membership.pk)]})

    assert await inside.receive_nothing(timeout=0.3)
    await inside.still_works()
    assert not await LobbyBan.objects.aexists()
    await inside.disconnect()


def test_the_lobby_list_shows_live_counts_and_filters_closed_lobbies(
    admin_user: AbstractBaseUser, alice: Person, bob: Person
) -> None:
    busy = Lobby.objects.create(name="busy")
    Lobby.objects.create(name="shut", closed_at=timezone.now())
    for person in (alice, bob):
        Membership.objects.create(session_id=person.id, lobby=busy, channel_name=person.id)
    client = HttpClient()
    client.force_login(admin_user)

    shown = {lobby.name: lobby.live_count for lobby in client.get("/admin/lobbies/lobby/").context["cl"].result_list}
    closed = [lobby.name for lobby in client.get("/admin/lobbies/lobby/?status=closed").context["cl"].result_list]

    assert shown == {"busy": 2, "shut": 0}
    assert closed == ["shut"]


def test_an_admin_sets_and_clears_a_lobby_password_without_ever_seeing_it(admin_user: AbstractBaseUser) -> None:
    lobby = Lobby.objects.create(name="vault")
    client = HttpClient()
    client.force_login(admin_user)
    url = f"/admin/lobbies/lobby/{lobby.pk}/change/"
    form = {
        "name": "vault",
        "max_participants": "12",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        # The bots shown on the lobby's page (bots.admin) are a formset too.
        "bot_assignments-TOTAL_FORMS": "0",
        "bot_assignments-INITIAL_FORMS": "0",
    }

    assert client.post(url, {**form, "new_password": "open sesame"}).status_code == 302
    lobby.refresh_from_db()
    assert lobby.password_matches("open sesame")
    page = client.get(url).content.decode()
    assert lobby.password_hash not in page and "open sesame" not in page

    assert client.post(url, {**form, "clear_password": "on"}).status_code == 302
    lobby.refresh_from_db()
    assert not lobby.has_password


def test_history_is_searched_by_session_or_lobby_name_and_filtered(
    admin_user: AbstractBaseUser, alice: Person, bob: Person
) -> None:
    standup = Lobby.objects.create(name="standup")
    retro = Lobby.objects.create(name="retro")
    Membership.objects.create(session_id=alice.id, lobby=standup, channel_name="a")
    Membership.objects.create(session_id=bob.id, lobby=retro, channel_name="b", left_at=timezone.now(), state="left")
    client = HttpClient()
    client.force_login(admin_user)

    def rows(query: str) -> list[str]:
        response = client.get(f"/admin/lobbies/membership/?{query}")
        return [str(membership) for membership in response.context["cl"].result_list]

    assert rows("q=Bob") == ["Bob in retro"]
    assert rows("q=standup") == ["Alice in standup"]
    assert rows(f"lobby__id__exact={retro.pk}") == ["Bob in retro"]
    assert rows("state__exact=connected") == ["Alice in standup"]
    assert client.get("/admin/lobbies/membership/add/").status_code == 403


class AdminBrowser:
    """An administrator's browser: a cookie jar, a log-in, and the CSRF token forms carry."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> str:
        with self.opener.open(self.server.http + path, timeout=10) as response:
            return response.read().decode()

    def post(self, path: str, fields: dict) -> str:
        csrf = next(cookie.value for cookie in self.jar if cookie.name == "csrftoken")
        body = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": csrf}, doseq=True).encode()
        with self.opener.open(urllib.request.Request(self.server.http + path, data=body), timeout=10) as response:
            return response.read().decode()

    def log_in(self, username: str, password: str) -> None:
        self.get("/admin/login/")
        page = self.post("/admin/login/?next=/admin/", {"username": username, "password": password, "next": "/admin/"})
        assert "Log out" in page, "the log-in failed"


async def closed_with(client: LiveClient, code: int) -> None:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.receive()
    assert closed.value.rcvd.code == code


async def test_admin_actions_reach_people_on_other_server_processes(
    start_production_server: Callable[..., LiveServer], admin_user: AbstractBaseUser
) -> None:
    """Under daphne the admin request runs in a worker thread of its process;
    its events reach connections held by the other processes through Redis."""
    one, two, admin_only = start_production_server(), start_production_server(), start_production_server()
    alice, bob = LiveClient(one, "Alice"), LiveClient(two, "Bob")
    await alice.join("live")
    await bob.join("live")
    assert (await alice.receive())["type"] == "peer_joined"
    browser = AdminBrowser(admin_only)
    await asyncio.to_thread(browser.log_in, "root", ADMIN_PASSWORD)
    bobs_stay = await live_membership(bob, "live")

    await asyncio.to_thread(
        browser.post, "/admin/lobbies/membership/", {"action": "kick", "_selected_action": [bobs_stay.pk]}
    )

    assert (await bob.receive())["code"] == "kicked"
    await closed_with(bob, 4008)
    assert await alice.receive() == {"type": "peer_left", "peer_id": bob.id}

    lobby = await lobby_named("live")
    await asyncio.to_thread(
        browser.post, "/admin/lobbies/lobby/", {"action": "close_lobbies", "_selected_action": [lobby.pk]}
    )

    assert (await alice.receive())["code"] == "lobby_closed"
    await closed_with(alice, 4410)
