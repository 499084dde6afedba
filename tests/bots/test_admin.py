"""The bots' admin pages: providers whose keys are never shown, bots with their
analytics, adding to a lobby, the lobby's bots, and the conversation history."""

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client

from bots import services
from bots.models import Assignment, Bot, Provider
from lobbies import services as lobby_services
from lobbies.models import Lobby

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-live-do-not-show-4242"


@pytest.fixture
def provider(monkeypatch) -> Provider:
    monkeypatch.setenv("VOICEBOT_TEST_KEY", SECRET)
    return Provider.objects.create(name="openai", kind=Provider.Kind.OPENAI, api_key_env="VOICEBOT_TEST_KEY")


@pytest.fixture
def bot(provider: Provider) -> Bot:
    return Bot.objects.create(name="Ava", provider=provider, model_name="gpt-test", max_lobbies=1)


@pytest.fixture
def lobby() -> Lobby:
    creator, _ = lobby_services.session_create(name="Creator")
    return lobby_services.lobby_create(name="kitchen", private=False, max_participants=12, created_by=creator)


def test_a_providers_key_is_found_but_never_shown(staff_client: Client, provider: Provider, tmp_path) -> None:
    listing = staff_client.get("/admin/bots/provider/").content.decode()
    page = staff_client.get(f"/admin/bots/provider/{provider.pk}/change/").content.decode()

    assert "environment variable VOICEBOT_TEST_KEY (found here)" in listing
    assert SECRET not in listing and SECRET not in page

    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    Provider.objects.filter(pk=provider.pk).update(api_key_env="", api_key_file=str(key_file))
    assert Provider.objects.get(pk=provider.pk).settings().api_key == SECRET
    listing = staff_client.get("/admin/bots/provider/").content.decode()
    assert f"file {key_file} (found here)" in listing and SECRET not in listing


def test_a_provider_takes_its_key_from_one_place_only(staff_client: Client) -> None:
    response = staff_client.post(
        "/admin/bots/provider/add/",
        {"name": "both", "kind": "openai", "api_key_env": "A_KEY", "api_key_file": "/etc/key", "timeout_seconds": 10, "max_retries": 2},
    )
    assert b"either as an environment variable or as a file, not both" in response.content
    assert not Provider.objects.filter(name="both").exists()


def test_the_add_to_lobby_action_asks_for_the_lobby_then_adds(staff_client: Client, bot: Bot, lobby: Lobby) -> None:
    asked = staff_client.post("/admin/bots/bot/", {"action": "add_to_lobby", "_selected_action": [bot.pk]})
    assert asked.status_code == 200 and b"kitchen" in asked.content

    done = staff_client.post(
        "/admin/bots/bot/", {"action": "add_to_lobby", "_selected_action": [bot.pk], "lobby": lobby.pk}, follow=True
    )

    assert "Ava is joining kitchen." in done.content.decode()
    assignment = Assignment.objects.get(bot=bot, lobby=lobby, removed_at__isnull=True)
    assert assignment.added_by.username == "admin"
    assert LogEntry.objects.filter(object_id=str(bot.pk), change_message="Added to lobby kitchen.").exists()


def test_a_bot_at_its_limit_is_refused_with_the_reason(staff_client: Client, bot: Bot, lobby: Lobby) -> None:
    services.bot_add_to_lobby(bot=bot, lobby=lobby)
    other = lobby_services.lobby_create(name="hall", private=False, max_participants=12, created_by=lobby.created_by)

    response = staff_client.post(
        "/admin/bots/assignment/add/", {"bot": bot.pk, "lobby": other.pk}, follow=True
    )

    assert "Ava is already in 1 lobbies, its limit." in response.content.decode()
    assert not Assignment.objects.filter(lobby=other).exists()


def test_the_add_form_puts_a_bot_in_a_lobby(staff_client: Client, bot: Bot, lobby: Lobby) -> None:
    response = staff_client.post("/admin/bots/assignment/add/", {"bot": bot.pk, "lobby": lobby.pk}, follow=True)

    assert response.status_code == 200
    assert Assignment.objects.filter(bot=bot, lobby=lobby, removed_at__isnull=True).count() == 1


def test_the_lobby_page_shows_its_bots_and_their_status(staff_client: Client, bot: Bot, lobby: Lobby) -> None:
    assignment = services.bot_add_to_lobby(bot=bot, lobby=lobby)
    Assignment.objects.filter(pk=assignment.pk).update(status="error", last_error="openai: the provider answered HTTP 401")

    page = staff_client.get(f"/admin/lobbies/lobby/{lobby.pk}/change/").content.decode()

    assert "bots in this lobby" in page.lower()
    assert "Ava" in page and "openai: the provider answered HTTP 401" in page


def test_a_bots_page_shows_its_analytics_and_history_link(staff_client: Client, bot: Bot, lobby: Lobby) -> None:
    assignment = services.bot_add_to_lobby(bot=bot, lobby=lobby)
    for latency in (400.0, 600.0):
        services.turn_record(assignment_id=assignment.pk, source="voice", speaker_name="Alice", user_text="<script>alert(1)</script>", reply_text="Paris.", first_audio_ms=latency)

    page = staff_client.get(f"/admin/bots/bot/{bot.pk}/change/").content.decode()
    history = staff_client.get(f"/admin/bots/turn/?bot__id__exact={bot.pk}").content.decode()

    assert "2 turns, 0 with errors, 0 interrupted" in page
    assert "average 500 ms, p95 600 ms" in page
    assert "Paris." in history and "&lt;script&gt;alert(1)&lt;/script&gt;" in history
    assert "<script>alert(1)" not in history


def test_history_is_read_only(staff_client: Client, bot: Bot, lobby: Lobby) -> None:
    assignment = services.bot_add_to_lobby(bot=bot, lobby=lobby)
    turn = services.turn_record(assignment_id=assignment.pk, source="chat", user_text="hi", reply_text="hello")

    assert staff_client.get("/admin/bots/turn/add/").status_code == 403
    response = staff_client.post(f"/admin/bots/turn/{turn.pk}/change/", {"reply_text": "forged"})
    assert response.status_code == 403


def test_non_staff_cannot_reach_the_bots_admin(client: Client, django_user_model) -> None:
    user = django_user_model.objects.create_user("guest", password="guest-password")
    client.force_login(user)

    response = client.get("/admin/bots/bot/")

    assert response.status_code == 302 and "/admin/login/" in response["Location"]
