"""Chat is stored before anyone receives it: the sender's own copy, with its
id, is the acknowledgement, and whoever missed messages (dropped, reconnecting,
or the server restarted) fetches them with chat_history."""

import io
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.core.management import call_command
from django.db import connection
from django.test import Client as HttpClient
from django.utils import timezone

from lobbies import services
from lobbies.models import ChatMessage, Lobby, Membership, Session
from lobbies.presence import Presence
from lobbies.protocol import CHAT_HISTORY_LIMIT, MAX_SAFE_INTEGER
from tests.conftest import LiveClient, LiveServer, Person
from tests.lobbies.test_consumers import Client

pytestmark = pytest.mark.django_db(transaction=True)
over_both_layers = pytest.mark.usefixtures("channel_layer")

Connect = Callable[..., Awaitable[Client]]


async def next_frame(client: Client | LiveClient, frame_type: str) -> dict:
    """The next frame of this type; news of who is in the room, which comes meanwhile, is passed over."""
    while (frame := await client.receive())["type"] != frame_type:
        assert frame["type"] in ("peer_joined", "peer_left", "peer_updated"), frame
    return frame


async def chat(client: Client, text: str) -> dict:
    """Send a chat message and wait for its acknowledgement: our own copy back."""
    await client.send_json_to({"type": "chat", "text": text})
    frame = await next_frame(client, "chat")
    assert frame["text"] == text
    return frame


async def history(client: Client, after: int | None) -> dict:
    await client.send_json_to({"type": "chat_history", "after": after})
    return await next_frame(client, "chat_history")


@over_both_layers
async def test_a_message_sent_while_bob_was_away_is_fetched_after_he_resumes(
    connect: Connect, alice: Person, bob: Person
) -> None:
    sender = await connect(alice)
    away = await connect(bob)
    seen = await chat(sender, "before")
    assert (await next_frame(away, "chat"))["id"] == seen["id"]

    await away.disconnect(code=1006)
    missed = await chat(sender, "while you were away")
    back = await connect(bob)

    assert back.welcome["last_chat_id"] == missed["id"]
    assert await history(back, after=seen["id"]) == {"type": "chat_history", "messages": [missed], "more": False}
    # Nothing else arrives: the missed message came once, in the history.
    assert await back.receive_nothing(timeout=0.2)


@over_both_layers
async def test_the_senders_own_copy_is_the_acknowledgement_and_carries_the_stored_id(
    connect: Connect, alice: Person, bob: Person
) -> None:
    sender = await connect(alice)
    other = await connect(bob)

    first = await chat(sender, "one")
    second = await chat(sender, "two")

    assert first["from"] == second["from"] == alice.id
    assert second["id"] > first["id"]
    stored = [message async for message in ChatMessage.objects.order_by("id").values_list("id", "text", "author_name")]
    assert stored == [(first["id"], "one", "Alice"), (second["id"], "two", "Alice")]
    # Everyone got the same frames, and the history gives them back as they were sent.
    assert [await next_frame(other, "chat"), await next_frame(other, "chat")] == [first, second]
    assert (await history(other, after=None))["messages"] == [first, second]


@over_both_layers
async def test_a_newcomer_learns_where_the_chat_is_from_its_welcome(connect: Connect, alice: Person, bob: Person) -> None:
    sender = await connect(alice)
    assert sender.welcome["last_chat_id"] is None
    last = await chat(sender, "hello")

    newcomer = await connect(bob)

    assert newcomer.welcome["last_chat_id"] == last["id"]
    assert await history(newcomer, after=last["id"]) == {"type": "chat_history", "messages": [], "more": False}


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
@over_both_layers
async def test_history_comes_in_pages_of_at_most_100_oldest_first(connect: Connect, alice: Person, bob: Person) -> None:
    lobby = await Lobby.objects.acreate(name="busy")
    elsewhere = await Lobby.objects.acreate(name="elsewhere")
    author = await Session.objects.aget(pk=bob.id)
    await ChatMessage.objects.abulk_create(
        [ChatMessage(lobby=lobby, session=author, author_name="Bob", text=f"message {n}") for n in range(150)]
        + [ChatMessage(lobby=elsewhere, session=author, author_name="Bob", text="not here")]
    )
    reader = await connect(alice, "busy")

    first = await history(reader, after=None)
    second = await history(reader, after=first["messages"][-1]["id"])

    assert CHAT_HISTORY_LIMIT == 100
    assert first["more"] is True and second["more"] is False
    texts = [message["text"] for message in first["messages"] + second["messages"]]
    assert texts == [f"message {n}" for n in range(150)]
    ids = [message["id"] for message in first["messages"] + second["messages"]]
    assert ids == sorted(ids) and len(first["messages"]) == 100


@over_both_layers
async def test_a_connection_that_lost_its_place_can_neither_read_nor_write_the_chat(
    connect: Connect, alice: Person, bob: Person
) -> None:
    member = await connect(alice)
    outsider = await connect(bob)
    await chat(member, "members only")
    await next_frame(outsider, "chat")
    # Its stay ended behind the connection's back, as when another server
    # process expired it while this one was stalled.
    await Membership.objects.filter(session_id=bob.id).aupdate(left_at=timezone.now(), state=Membership.State.LEFT)

    await outsider.send_json_to({"type": "chat_history", "after": None})
    await outsider.expect_error("not_in_lobby")
    await outsider.send_json_to({"type": "chat", "text": "can you hear me?"})
    await outsider.expect_error("not_in_lobby")

    assert await member.receive_nothing(timeout=0.2)
    assert not await ChatMessage.objects.filter(session_id=bob.id).aexists()
    assert [message["text"] for message in (await history(member, after=None))["messages"]] == ["members only"]


@over_both_layers
async def test_another_lobby_shows_none_of_this_lobbys_chat(connect: Connect, alice: Person, bob: Person) -> None:
    await chat(await connect(alice, "room"), "only for room")

    elsewhere = await connect(bob, "elsewhere")

    assert elsewhere.welcome["last_chat_id"] is None
    assert await history(elsewhere, after=None) == {"type": "chat_history", "messages": [], "more": False}


@pytest.mark.parametrize(
    "raw, code",
    [
        (json.dumps({"type": "chat_history", "after": "5"}), "bad_field"),
        (json.dumps({"type": "chat_history", "after": -1}), "bad_field"),
        (json.dumps({"type": "chat_history", "after": 1.5}), "bad_field"),
        (json.dumps({"type": "chat_history", "after": True}), "bad_field"),
        (json.dumps({"type": "chat_history", "after": [1]}), "bad_field"),
        (json.dumps({"type": "chat_history", "after": {"id": 1}}), "bad_field"),
        (json.dumps({"type": "chat_history", "after": MAX_SAFE_INTEGER + 1}), "bad_json"),
        (json.dumps({"type": "chat_history", "after": 10**400}), "bad_json"),
        ('{"type": "chat_history", "after": 1e400}', "bad_json"),
    ],
)
@over_both_layers
async def test_a_malformed_history_request_gets_an_error_and_the_room_carries_on(
    connect: Connect, alice: Person, bob: Person, raw: str, code: str
) -> None:
    asker = await connect(alice)
    other = await connect(bob)
    await next_frame(asker, "peer_joined")

    await asker.send_to(text_data=raw)

    await asker.expect_error(code)
    assert await other.receive_nothing(timeout=0.2)
    await asker.still_works()
    said = await chat(asker, "still here")
    assert await next_frame(other, "chat") == said
    assert (await history(asker, after=None))["messages"] == [said]


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
@over_both_layers
async def test_a_chat_with_a_nul_character_is_refused_on_every_database(
    connect: Connect, alice: Person, bob: Person
) -> None:
    sender = await connect(alice)
    other = await connect(bob)
    await next_frame(sender, "peer_joined")

    await sender.send_json_to({"type": "chat", "text": "a\u0000b"})

    frame = await sender.expect_error("bad_field")
    assert "NUL" in frame["message"]
    assert await other.receive_nothing(timeout=0.2)
    said = await chat(sender, "ab")
    assert await next_frame(other, "chat") == said
    assert [text async for text in ChatMessage.objects.values_list("text", flat=True)] == ["ab"]


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
@over_both_layers
async def test_the_largest_cursor_is_valid_and_finds_nothing_after_it(connect: Connect, alice: Person) -> None:
    asker = await connect(alice)
    await chat(asker, "hello")

    assert await history(asker, after=MAX_SAFE_INTEGER) == {"type": "chat_history", "messages": [], "more": False}


@database_sync_to_async
def rename_chat_table(old: str, new: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {old} RENAME TO {new}")


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
@over_both_layers
async def test_a_message_that_cannot_be_stored_is_refused_and_reaches_no_one(
    connect: Connect, alice: Person, bob: Person
) -> None:
    sender = await connect(alice)
    other = await connect(bob)
    await next_frame(sender, "peer_joined")
    table = ChatMessage._meta.db_table
    # A real failure of the database: the table the message goes to is not there.
    await rename_chat_table(table, "chat_elsewhere")
    try:
        await sender.send_json_to({"type": "chat", "text": "lost?"})
        await sender.expect_error("chat_failed")
        await sender.send_json_to({"type": "chat_history", "after": None})
        await sender.expect_error("chat_history_failed")
    finally:
        await rename_chat_table("chat_elsewhere", table)

    assert await other.receive_nothing(timeout=0.2)
    said = await chat(sender, "sent again")
    assert await next_frame(other, "chat") == said
    assert [message["text"] for message in (await history(other, after=None))["messages"]] == ["sent again"]


async def test_history_survives_a_server_restart(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server()
    alice = LiveClient(server, "Alice")
    bob = LiveClient(server, "Bob")
    await alice.join("restart")
    await bob.join("restart")
    await alice.send({"type": "chat", "text": "remember this"})
    said = await next_frame(alice, "chat")
    assert await next_frame(bob, "chat") == said

    server.stop()
    restarted = start_production_server()
    welcome = await bob.join("restart", restarted)
    await bob.send({"type": "chat_history", "after": None})

    assert welcome["last_chat_id"] == said["id"]
    assert await next_frame(bob, "chat_history") == {"type": "chat_history", "messages": [said], "more": False}
    await bob.close()


def test_messages_past_the_retention_period_are_pruned(settings, alice: Person) -> None:
    settings.CHAT_RETENTION_DAYS = 30
    lobby = Lobby.objects.create(name="old")
    now = timezone.now()
    for days, text in [(31, "too old"), (29, "kept")]:
        ChatMessage.objects.create(
            lobby=lobby, session_id=alice.id, author_name="Alice", text=text, created_at=now - timedelta(days=days)
        )

    output = io.StringIO()
    call_command("prunechat", stdout=output)

    assert output.getvalue() == "Deleted 1 chat message(s).\n"

    assert list(ChatMessage.objects.values_list("text", flat=True)) == ["kept"]


def test_a_server_process_prunes_old_chat_by_itself_in_batches(settings, alice: Person) -> None:
    settings.CHAT_RETENTION_DAYS = 30
    lobby = Lobby.objects.create(name="aging")
    now = timezone.now()
    ChatMessage.objects.bulk_create(
        ChatMessage(lobby=lobby, session_id=alice.id, author_name="Alice", text=text, created_at=now - timedelta(days=days))
        for days, text in [(40, "first"), (35, "second"), (31, "third"), (1, "kept")]
    )

    assert services.chat_prune(limit=2) == 2
    async_to_sync(Presence().beat)()

    assert list(ChatMessage.objects.values_list("text", flat=True)) == ["kept"]


def test_the_admin_lists_chat_as_text_and_changes_none_of_it(admin_client: HttpClient, alice: Person) -> None:
    lobby = Lobby.objects.create(name="shown")
    message = ChatMessage.objects.create(lobby=lobby, session_id=alice.id, author_name="<i>Al</i>", text="<b>bold</b>")

    listing = admin_client.get("/admin/lobbies/chatmessage/")

    assert listing.status_code == 200
    assert "&lt;b&gt;bold&lt;/b&gt;" in listing.text and "<b>bold</b>" not in listing.text
    assert "&lt;i&gt;Al&lt;/i&gt;" in listing.text
    assert admin_client.get("/admin/lobbies/chatmessage/add/").status_code == 403
    # The lobby's page links to its chat, and a lobby being added has none yet.
    lobby_page = admin_client.get(f"/admin/lobbies/lobby/{lobby.pk}/change/").text
    assert f'href="/admin/lobbies/chatmessage/?lobby__id__exact={lobby.pk}">1 messages</a>' in lobby_page
    assert admin_client.get("/admin/lobbies/lobby/add/").status_code == 200
    assert admin_client.post(f"/admin/lobbies/chatmessage/{message.pk}/delete/", {"post": "yes"}).status_code == 403
    assert ChatMessage.objects.filter(pk=message.pk).exists()
