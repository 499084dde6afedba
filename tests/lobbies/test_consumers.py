"""The lobby WebSocket protocol, message by message, over the Redis and the in-memory channel layer."""

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlencode

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from lobbies.models import ChatMessage, Lobby, Membership
from lobbies.protocol import MAX_MESSAGE_BYTES
from lobbies.services import lobby_group
from tests.conftest import Person, set_channel_capacity
from voicebot.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer")]

Connect = Callable[..., Awaitable[WebsocketCommunicator]]


class Client(WebsocketCommunicator):
    async def receive(self, timeout: float = 3) -> dict:
        return await self.receive_json_from(timeout=timeout)

    async def expect_error(self, code: str) -> dict:
        frame = await self.receive()
        assert frame["type"] == "error", frame
        assert frame["code"] == code, frame
        assert frame["message"]
        return frame

    async def still_works(self) -> None:
        """The connection is open and answering."""
        await self.send_json_to({"type": "ping"})
        assert await self.receive() == {"type": "pong"}

    async def closed_with(self, code: int) -> None:
        message = await self.receive_output(timeout=3)
        assert message == {"type": "websocket.close", "code": code}


def open_client(
    lobby: str, *, token: str = "", cookie: str = "", origin: str | None = None, password: str = ""
) -> Client:
    headers = []
    if cookie:
        headers.append((b"cookie", f"voicebot_token={cookie}".encode()))
    if origin:
        headers.append((b"origin", origin.encode()))
    query = urlencode({name: value for name, value in [("token", token), ("password", password)] if value})
    return Client(application, f"/ws/lobby/{lobby}/" + (f"?{query}" if query else ""), headers=headers)


async def joined(person: Person, lobby: str = "room") -> Client:
    """A client of `person` in `lobby`, its welcome read (and kept as `.welcome`)."""
    client = open_client(lobby, token=person.token)
    connected, _ = await client.connect(timeout=3)
    assert connected
    client.welcome = await client.receive()
    assert client.welcome["type"] == "welcome", client.welcome
    return client


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Join a lobby as a person; returns the connected client, its welcome already read."""
    clients: list[Client] = []

    async def join(person: Person, lobby: str = "room") -> Client:
        client = await joined(person, lobby)
        clients.append(client)
        return client

    yield join
    for client in clients:
        await client.disconnect()


async def test_welcome_describes_the_lobby_and_the_others(connect: Connect, alice: Person, bob: Person) -> None:
    await connect(alice)
    client = await connect(bob)

    assert client.welcome == {
        "type": "welcome",
        "peer_id": bob.id,
        "name": "Bob",
        "muted": False,
        "lobby": {"name": "room", "max_participants": 12},
        "peers": [{"peer_id": alice.id, "name": "Alice", "bot": False, "muted": False, "state": "connected"}],
        "ice_servers": [],
        "last_chat_id": None,
    }


async def test_the_others_see_a_newcomer_join(connect: Connect, alice: Person, bob: Person) -> None:
    first = await connect(alice)
    await connect(bob)

    assert await first.receive() == {
        "type": "peer_joined",
        "peer": {"peer_id": bob.id, "name": "Bob", "bot": False, "muted": False, "state": "connected"},
    }


async def test_the_others_see_a_leaver_leave(connect: Connect, alice: Person, bob: Person) -> None:
    first = await connect(alice)
    second = await connect(bob)
    await first.receive()  # peer_joined

    await second.disconnect()

    assert await first.receive() == {"type": "peer_left", "peer_id": bob.id}
    assert not await Membership.objects.filter(left_at__isnull=True, session_id=bob.id).aexists()


async def test_joining_an_unknown_name_creates_a_public_lobby(connect: Connect, alice: Person) -> None:
    await connect(alice, "brand-new")

    lobby = await Lobby.objects.aget(name="brand-new")
    assert lobby.private is False
    assert str(lobby.created_by_id) == alice.id


async def test_cookie_authenticates_a_browser_from_an_allowed_origin(alice: Person) -> None:
    client = open_client("room", cookie=alice.token, origin="http://127.0.0.1:8000")
    connected, _ = await client.connect(timeout=3)
    assert connected
    assert (await client.receive())["peer_id"] == alice.id
    await client.disconnect()


async def test_other_cookies_do_not_hide_the_session_cookie(alice: Person) -> None:
    client = Client(
        application,
        "/ws/lobby/room/",
        headers=[(b"cookie", f'prefs={{"a": 1}}; odd=a b; voicebot_token={alice.token}'.encode())],
    )
    connected, _ = await client.connect(timeout=3)
    assert connected
    assert (await client.receive())["peer_id"] == alice.id
    await client.disconnect()


async def test_a_page_from_another_site_is_refused(alice: Person) -> None:
    client = open_client("room", cookie=alice.token, origin="https://evil.example")
    connected, _ = await client.connect(timeout=3)
    assert not connected


async def test_no_session_is_closed_with_4401_unseen_by_the_others(connect: Connect, alice: Person) -> None:
    first = await connect(alice)
    stranger = open_client("room", token="not-a-real-token")
    connected, _ = await stranger.connect(timeout=3)
    assert connected  # accepted, so that a browser can see the close code

    await stranger.expect_error("unauthenticated")
    await stranger.closed_with(4401)
    assert await first.receive_nothing(timeout=0.3)


async def test_a_bad_lobby_name_is_closed_with_4400(alice: Person) -> None:
    client = open_client("no%20spaces", token=alice.token)
    await client.connect(timeout=3)

    await client.expect_error("bad_field")
    await client.closed_with(4400)


@override_settings(LOBBY_DEFAULT_MAX_PARTICIPANTS=1)
async def test_a_full_lobby_refuses_with_4403_unseen_by_the_others(
    connect: Connect, alice: Person, bob: Person
) -> None:
    await Lobby.objects.acreate(name="small", max_participants=1)
    first = await connect(alice, "small")
    late = open_client("small", token=bob.token)
    await late.connect(timeout=3)

    await late.expect_error("lobby_full")
    await late.closed_with(4403)
    assert await first.receive_nothing(timeout=0.3)
    await first.still_works()


async def test_joining_again_replaces_the_older_connection(
    connect: Connect, alice: Person, bob: Person
) -> None:
    watcher = await connect(alice)
    old = await connect(bob)
    await watcher.receive()  # Bob joined

    new = await connect(bob)

    await old.expect_error("replaced")
    await old.closed_with(4409)
    assert [(await watcher.receive())["peer"]["state"] for _ in range(2)] == ["reconnecting", "connected"]
    assert new.welcome["peer_id"] == bob.id
    await new.send_json_to({"type": "offer", "to": alice.id, "sdp": "v=0"})
    assert (await watcher.receive())["from"] == bob.id
    await alice_sends_offer_to(watcher, bob, new)


async def alice_sends_offer_to(sender: Client, person: Person, receiver: Client) -> None:
    await sender.send_json_to({"type": "offer", "to": person.id, "sdp": "v=0 to the new connection"})
    assert (await receiver.receive())["sdp"] == "v=0 to the new connection"


async def test_a_peer_seen_again_on_a_new_connection_is_left_then_joined(
    connect: Connect, alice: Person, bob: Person
) -> None:
    watcher = await connect(alice)
    await connect(bob)
    bob_peer = (await watcher.receive())["peer"]

    # As when the peer_left of Bob's old connection was lost with its server.
    await get_channel_layer().group_send(
        lobby_group("room"), {"type": "lobby.peer_joined", "peer": bob_peer, "channel": "specific.new!1"}
    )

    assert await watcher.receive() == {"type": "peer_left", "peer_id": bob.id}
    assert await watcher.receive() == {"type": "peer_joined", "peer": bob_peer}


@pytest.mark.parametrize(
    "signal",
    [
        {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"},
        {"type": "answer", "sdp": "v=0\r\no=- 3 4 IN IP4 127.0.0.1\r\n"},
        {"type": "ice", "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0"}},
        {"type": "ice", "candidate": None},
    ],
    ids=["offer", "answer", "ice", "end-of-candidates"],
)
async def test_signaling_reaches_only_the_addressed_peer(
    connect: Connect, alice: Person, bob: Person, carol: Person, signal: dict
) -> None:
    sender = await connect(alice)
    receiver = await connect(bob)
    bystander = await connect(carol)
    for client in (sender, sender, receiver):
        assert (await client.receive())["type"] == "peer_joined"

    await sender.send_json_to({**signal, "to": bob.id})

    assert await receiver.receive() == {**signal, "to": bob.id, "from": alice.id}
    assert await bystander.receive_nothing(timeout=0.3)


async def test_signaling_arrives_as_sent_with_extra_fields_and_the_true_sender(
    connect: Connect, alice: Person, bob: Person
) -> None:
    """The message is relayed as the client wrote it (unknown fields, key order,
    non-ASCII text), and a "from" of the client's own cannot name someone else."""
    sender = await connect(alice)
    receiver = await connect(bob)
    assert (await sender.receive())["type"] == "peer_joined"

    text = '{"to": "%s", "type": "offer", "sdp": "v=0 \u00e9t\u00e9", "x-trace": [1, {"é": null}]}  ' % bob.id
    await sender.send_to(text_data=text)
    assert await receiver.receive_from() == text.rstrip()[:-1] + f', "from": "{alice.id}"}}'

    await sender.send_json_to({"type": "ice", "to": bob.id, "candidate": None, "from": "someone-else"})
    assert await receiver.receive() == {"type": "ice", "to": bob.id, "candidate": None, "from": alice.id}


async def test_an_answer_reaches_a_peer_whose_offer_came_before_the_news_that_it_joined(
    connect: Connect, alice: Person
) -> None:
    """A newcomer's offer goes straight to its peer, its peer_joined through the
    lobby's group: the offer may arrive first, and the answer must still get back."""
    receiver = await connect(alice)
    layer = get_channel_layer()
    newcomer_channel = await layer.new_channel()
    membership = await Membership.objects.aget(session_id=alice.id, left_at__isnull=True)
    offer = '{"type": "offer", "to": "%s", "sdp": "v=0", "from": "newcomer"}' % alice.id
    await layer.send(
        membership.channel_name,
        {"type": "lobby.deliver", "kind": "offer", "text": offer, "from": "newcomer", "channel": newcomer_channel},
    )
    assert await receiver.receive_from() == offer

    await receiver.send_json_to({"type": "answer", "to": "newcomer", "sdp": "v=0 answer"})

    delivered = await asyncio.wait_for(layer.receive(newcomer_channel), 3)
    assert json.loads(delivered["text"]) == {"type": "answer", "to": "newcomer", "sdp": "v=0 answer", "from": alice.id}


async def test_signaling_to_someone_not_in_the_lobby_is_unknown_peer(
    connect: Connect, alice: Person, bob: Person
) -> None:
    sender = await connect(alice)
    await connect(bob, "elsewhere")

    await sender.send_json_to({"type": "offer", "to": bob.id, "sdp": "v=0"})

    await sender.expect_error("unknown_peer")
    await sender.still_works()


# Only the in-memory layer has a capacity; the Redis pub/sub layer queues without bound.
@pytest.mark.parametrize("channel_layer", ["memory"], indirect=True)
async def test_a_peer_that_cannot_take_more_gets_delivery_failed(
    connect: Connect, settings, alice: Person, bob: Person
) -> None:
    set_channel_capacity(settings, 1)
    lobby = await Lobby.objects.acreate(name="room")
    # A participant whose connection has stopped reading.
    await Membership.objects.acreate(session_id=bob.id, lobby=lobby, channel_name="specific.stalled!1")
    sender = await connect(alice)

    await sender.send_json_to({"type": "offer", "to": bob.id, "sdp": "v=0"})
    await sender.send_json_to({"type": "offer", "to": bob.id, "sdp": "v=0"})

    await sender.expect_error("delivery_failed")
    await sender.still_works()


async def test_chat_reaches_everyone_including_the_sender(connect: Connect, alice: Person, bob: Person) -> None:
    sender = await connect(alice)
    other = await connect(bob)
    await sender.receive()  # peer_joined

    await sender.send_json_to({"type": "chat", "text": "  hello there  "})

    frames = [await client.receive() for client in (sender, other)]
    stored = await ChatMessage.objects.aget()
    for frame in frames:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", frame.pop("ts"))
        assert frame == {"type": "chat", "id": stored.pk, "from": alice.id, "name": "Alice", "text": "hello there"}


async def test_mute_is_seen_by_everyone_and_kept(connect: Connect, alice: Person, bob: Person) -> None:
    muter = await connect(alice)
    other = await connect(bob)
    await muter.receive()  # peer_joined

    await muter.send_json_to({"type": "mute", "muted": True})

    expected = {"type": "peer_updated", "peer": {"peer_id": alice.id, "name": "Alice", "bot": False, "muted": True, "state": "connected"}}
    assert await other.receive() == expected
    assert await muter.receive() == expected
    assert await Membership.objects.filter(session_id=alice.id, left_at__isnull=True, muted=True).aexists()


async def test_ping_gets_pong(connect: Connect, alice: Person) -> None:
    client = await connect(alice)
    await client.still_works()


@pytest.mark.parametrize(
    "raw, code",
    [
        ("this is not json", "bad_json"),
        ("[1, 2, 3]", "bad_json"),
        ('"just a string"', "bad_json"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"type": 7}), "unknown_type"),
        (json.dumps({"text": "no type"}), "missing_field"),
        (json.dumps({"type": "offer", "to": "x"}), "missing_field"),
        (json.dumps({"type": "ice", "to": "x"}), "missing_field"),
        (json.dumps({"type": "mute"}), "missing_field"),
        (json.dumps({"type": "chat"}), "missing_field"),
        (json.dumps({"type": "mute", "muted": "yes"}), "bad_field"),
        (json.dumps({"type": "offer", "to": 5, "sdp": "v=0"}), "bad_field"),
        (json.dumps({"type": "offer", "to": "x", "sdp": ""}), "bad_field"),
        (json.dumps({"type": "ice", "to": "x", "candidate": "candidate:1"}), "bad_field"),
        (json.dumps({"type": "chat", "text": "   "}), "bad_field"),
        (json.dumps({"type": "chat", "text": "x" * 2001}), "bad_field"),
        (json.dumps({"type": "chat", "text": ["<script>"]}), "bad_field"),
        ("x" * (MAX_MESSAGE_BYTES + 1), "too_large"),
        (json.dumps({"type": "chat", "text": "é" * (MAX_MESSAGE_BYTES // 2)}), "too_large"),
    ],
)
async def test_a_bad_message_gets_an_error_and_disturbs_no_one(
    connect: Connect, alice: Person, bob: Person, raw: str, code: str
) -> None:
    sender = await connect(alice)
    other = await connect(bob)
    await sender.receive()  # peer_joined

    await sender.send_to(text_data=raw)

    await sender.expect_error(code)
    assert await other.receive_nothing(timeout=0.2)
    await sender.still_works()
    await sender.send_json_to({"type": "chat", "text": "still here"})
    assert (await other.receive())["text"] == "still here"


async def test_a_binary_frame_is_bad_json(connect: Connect, alice: Person) -> None:
    client = await connect(alice)

    await client.send_to(bytes_data=b"\x00\x01binary")

    await client.expect_error("bad_json")
    await client.still_works()
