"""Rate limits: message budgets per WebSocket connection, and per-minute limits
per client address and per session, shared by every server process."""

import asyncio
import http.client
import json
import logging
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import websockets
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client, RequestFactory

from lobbies import ratelimit
from monitoring.models import AuditEvent
from tests.conftest import LiveServer, Person, make_person, set_channel_capacity
from voicebot.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

CANDIDATES_PER_PEER = 40
SDP = ("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n" + "a=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host\r\n" * 70)[:4000]


def candidate(number: int) -> dict:
    return {"candidate": f"candidate:{number} 1 udp 2122260223 192.0.2.1 {50000 + number} typ host", "sdpMid": "0"}


# --- message budgets, per connection ---------------------------------------------


class Peer(WebsocketCommunicator):
    async def receive(self, timeout: float = 3) -> dict:
        return await self.receive_json_from(timeout=timeout)

    async def frames_until_closed(self) -> tuple[list[dict], int]:
        """Every frame the server sent, and the close code it ended with."""
        frames = []
        while True:
            output = await self.receive_output(timeout=3)
            if output["type"] == "websocket.close":
                return frames, output["code"]
            frames.append(json.loads(output["text"]))


Join = Callable[[Person], Awaitable[Peer]]


@pytest.fixture
async def join(channel_layer: str, settings) -> AsyncIterator[Join]:
    """Joins people to the lobby "room"; each returned peer has its welcome read."""
    # The join burst below queues hundreds of messages for one connection.
    set_channel_capacity(settings, 10_000)
    peers: list[Peer] = []

    async def connect(person: Person) -> Peer:
        peer = Peer(application, f"/ws/lobby/room/?token={person.token}")
        connected, _ = await peer.connect(timeout=3)
        assert connected
        peer.welcome = await peer.receive()
        assert peer.welcome["type"] == "welcome", peer.welcome
        peers.append(peer)
        return peer

    yield connect
    for peer in peers:
        await peer.disconnect()


async def test_a_chat_flood_is_refused_while_the_room_still_signals(
    join: Join, settings, alice: Person, bob: Person
) -> None:
    settings.RATE_LIMIT_CHAT_BURST = 3
    settings.RATE_LIMIT_CHAT_PER_SECOND = 1
    listener = await join(alice)
    flooder = await join(bob)
    assert (await listener.receive())["type"] == "peer_joined"

    for number in range(10):
        await flooder.send_json_to({"type": "chat", "text": f"spam {number}"})
    answers = [await flooder.receive() for _ in range(10)]

    kinds = Counter(frame["type"] for frame in answers)
    refused = [frame for frame in answers if frame["type"] == "error"]
    # The burst of 3 passes (a fourth if a token came back meanwhile); the rest are dropped.
    assert 3 <= kinds["chat"] <= 4 and kinds["chat"] + len(refused) == 10
    assert all(frame["code"] == "rate_limited" and frame["message"] for frame in refused)
    # Signaling has a budget of its own, and the listener got only what passed.
    await flooder.send_json_to({"type": "offer", "to": alice.id, "sdp": "v=0 offer"})
    heard = [await listener.receive() for _ in range(kinds["chat"] + 1)]
    assert [frame["text"] for frame in heard if frame["type"] == "chat"] == [f"spam {n}" for n in range(kinds["chat"])]
    assert {"type": "offer", "to": alice.id, "sdp": "v=0 offer", "from": bob.id} in heard
    assert await listener.receive_nothing(timeout=0.3)
    # The listener's own budgets are untouched.
    await listener.send_json_to({"type": "chat", "text": "calm down"})
    assert (await flooder.receive())["text"] == "calm down"


async def test_a_sustained_flood_closes_the_connection_with_4008(
    join: Join, settings, caplog: pytest.LogCaptureFixture, alice: Person, bob: Person
) -> None:
    settings.RATE_LIMIT_OTHER_BURST = 3
    settings.RATE_LIMIT_OTHER_PER_SECOND = 0  # no refill, however slow the machine
    settings.RATE_LIMIT_CLOSE_AFTER = 5
    listener = await join(alice)
    flooder = await join(bob)
    assert (await listener.receive())["type"] == "peer_joined"

    # Malformed messages spend the budget of "other" messages like pings do.
    with caplog.at_level(logging.INFO, logger="voicebot.audit"):
        for _ in range(50):
            await flooder.send_to(text_data="not json at all")
        frames, code = await flooder.frames_until_closed()

    assert code == 4008
    codes = [frame["code"] for frame in frames]
    # Three errors for what was within budget, then five refusals, the last with the close.
    assert codes[:3] == ["bad_json"] * 3 and codes[3:] == ["rate_limited"] * 5, codes
    assert await listener.receive() == {"type": "peer_left", "peer_id": bob.id}
    await listener.send_json_to({"type": "ping"})
    assert await listener.receive() == {"type": "pong"}
    [record] = [record for record in caplog.records if record.name == "voicebot.audit"]
    assert (record.action, record.session_id, record.lobby) == ("rate_limit_close", bob.id, "room")
    recorded = AuditEvent.objects.filter(action="rate_limit_close", session_id=bob.id, lobby="room").exists
    assert await database_sync_to_async(recorded)()


async def test_joining_a_ten_person_room_is_never_rate_limited(join: Join) -> None:
    """The newcomer sends an offer and dozens of ICE candidates to each of nine
    peers at once, and they all answer at once: nothing may be refused."""
    people = [await database_sync_to_async(make_person)(f"Person {number}") for number in range(10)]
    *others, newcomer = people
    present = [await join(person) for person in others]
    arrived = await join(newcomer)

    for person in others:
        await arrived.send_json_to({"type": "offer", "to": person.id, "sdp": SDP})
        for number in range(CANDIDATES_PER_PEER):
            await arrived.send_json_to({"type": "ice", "to": person.id, "candidate": candidate(number)})
    for peer in present:
        signaling: Counter = Counter()
        # A peer that joined before others also hears of them joining.
        while sum(signaling.values()) < 1 + CANDIDATES_PER_PEER:
            frame = await peer.receive()
            if frame["type"] in ("offer", "ice", "error"):
                signaling[frame.get("code", frame["type"])] += 1
        assert signaling == {"offer": 1, "ice": CANDIDATES_PER_PEER}
    # Each answers once its offer is in, all of them at once.
    for peer in present:
        await peer.send_json_to({"type": "answer", "to": newcomer.id, "sdp": SDP})
        for number in range(CANDIDATES_PER_PEER):
            await peer.send_json_to({"type": "ice", "to": newcomer.id, "candidate": candidate(number)})

    heard = Counter()
    for _ in range(len(others) * (1 + CANDIDATES_PER_PEER)):
        frame = await arrived.receive()
        heard[frame.get("code", frame["type"])] += 1
    assert heard == {"answer": len(others), "ice": len(others) * CANDIDATES_PER_PEER}
    for peer in [*present, arrived]:
        assert await peer.receive_nothing(timeout=0.1)


def test_the_default_signaling_budget_covers_joining_the_largest_room(settings) -> None:
    """An offer or answer and 40 ICE candidates to each of the 49 others of a
    room of LOBBY_MAX_PARTICIPANTS_LIMIT, all at the same instant."""
    budget = ratelimit.MessageLimiter()
    others = settings.LOBBY_MAX_PARTICIPANTS_LIMIT - 1

    allowed = [budget.allow(kind) for _ in range(others) for kind in ["offer"] + ["ice"] * CANDIDATES_PER_PEER]

    assert all(allowed)


# --- per-minute limits in the shared cache -----------------------------------------


@pytest.fixture(params=["redis", "locmem"])
def cache_backend(request: pytest.FixtureRequest, settings) -> str:
    """Run over Redis (several processes) and the embedded default's local memory."""
    if request.param == "locmem":
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    return request.param


def test_the_sliding_minute_refuses_a_burst_across_a_minute_turn(cache_backend: str, settings) -> None:
    settings.RATE_LIMIT_SESSIONS_PER_MINUTE = 3
    key = uuid.uuid4().hex
    minute = 60 * 28_000_000

    allowed = [ratelimit.hit(ratelimit.SESSIONS, key, now=minute + 59) for _ in range(3)]
    # A fixed window would start afresh here and let three more through.
    refused = ratelimit.hit(ratelimit.SESSIONS, key, now=minute + 61)

    assert allowed == [None, None, None]
    assert refused is not None and 1 <= refused <= 60


def test_retry_after_says_when_the_next_attempt_is_allowed(cache_backend: str, settings) -> None:
    settings.RATE_LIMIT_SESSIONS_PER_MINUTE = 3
    key = uuid.uuid4().hex
    start = 60 * 28_000_000 + 50

    for _ in range(3):
        assert ratelimit.hit(ratelimit.SESSIONS, key, now=start) is None
    wait = ratelimit.hit(ratelimit.SESSIONS, key, now=start)

    # Four counted in the last 10 s of a minute: in the next one they weigh 4 × (1 - elapsed / 60).
    assert wait == 40
    assert ratelimit.hit(ratelimit.SESSIONS, key, now=start + wait) is None


def test_a_cache_that_cannot_be_reached_limits_no_one(settings, caplog: pytest.LogCaptureFixture) -> None:
    settings.RATE_LIMIT_SESSIONS_PER_MINUTE = 1
    # Nothing listens on port 1.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
    ratelimit.counters.last_warning = ratelimit.counters.resume_at = 0.0

    with caplog.at_level(logging.WARNING, logger="lobbies.ratelimit"):
        results = [ratelimit.hit(ratelimit.SESSIONS, "someone") for _ in range(3)]
    # After a failure the counters pause; later tests count again at once.
    ratelimit.counters.resume_at = 0.0

    assert results == [None, None, None]
    assert "Rate limit counters unavailable" in caplog.text


def create_lobby(person: Person, name: str):
    return Client().post(
        "/api/lobbies/", json.dumps({"name": name}), content_type="application/json",
        headers={"Authorization": f"Bearer {person.token}"},
    )


def test_new_lobbies_are_limited_per_session(settings, alice: Person, bob: Person) -> None:
    settings.RATE_LIMIT_LOBBIES_PER_MINUTE = 2
    assert [create_lobby(alice, f"alice-{number}").status_code for number in range(2)] == [201, 201]

    refused = create_lobby(alice, "alice-2")

    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited" and refused.json()["message"]
    assert 1 <= int(refused["Retry-After"]) <= 120
    assert create_lobby(bob, "bob-0").status_code == 201


# --- the client's address ------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, forwarded, expected",
    [
        # An untrusted peer's header is its own say.
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),
        # Each proxy appends what it saw: the rightmost untrusted address is the client.
        ("10.0.0.5", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.5", "192.0.2.66, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.5", "198.51.100.1, 10.0.0.7", "198.51.100.1"),
        ("10.0.0.5", "198.51.100.1:52000", "198.51.100.1"),
        ("10.0.0.5", "[2001:db8::1]:443", "2001:db8::1"),
        # Garbage stops the walk at the last real address.
        ("10.0.0.5", "not-an-address", "10.0.0.5"),
        ("10.0.0.5", "", "10.0.0.5"),
        # A dual-stack socket's form of an IPv4 peer.
        ("::ffff:10.0.0.5", "198.51.100.1", "198.51.100.1"),
        ("2001:db8::7", "", "2001:db8::7"),
    ],
)
def test_client_ip_believes_x_forwarded_for_only_from_trusted_proxies(
    settings, peer: str, forwarded: str, expected: str
) -> None:
    settings.VOICEBOT_TRUSTED_PROXIES = ["10.0.0.0/8"]
    scope = {"type": "websocket", "client": (peer, 40000), "headers": [(b"x-forwarded-for", forwarded.encode())]}
    request = RequestFactory().get("/", REMOTE_ADDR=peer, HTTP_X_FORWARDED_FOR=forwarded)

    assert ratelimit.client_ip(scope) == ratelimit.client_ip(request) == expected


def test_an_address_unknown_to_the_server_is_not_limited() -> None:
    assert ratelimit.client_key({"type": "websocket", "headers": []}) is None


def test_ipv6_clients_are_counted_per_64(settings) -> None:
    assert ratelimit.address_key("2001:db8:1:2:aaaa::1") == ratelimit.address_key("2001:db8:1:2:bbbb::9")
    assert ratelimit.address_key("2001:db8:1:3::1") != ratelimit.address_key("2001:db8:1:2::1")


# --- live servers: addresses as the server sees them ----------------------------------


def loopback_address() -> str:
    """A loopback address of its own for each simulated machine (all of 127/8 is
    loopback): counters left by other tests in Redis cannot touch it, and
    uvicorn, which itself trusts X-Forwarded-For from 127.0.0.1 only, leaves it be."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def documentation_address() -> str:
    return f"2001:db8:{random.randint(0, 0xFFFF):x}:{random.randint(0, 0xFFFF):x}::1"


def post_session(server: LiveServer, source: str, forwarded_for: str = "") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    headers = {"Content-Type": "application/json", **({"X-Forwarded-For": forwarded_for} if forwarded_for else {})}
    connection.request("POST", "/api/sessions/", body=json.dumps({"name": "Someone"}), headers=headers)
    response = connection.getresponse()
    response.body = json.loads(response.read())
    connection.close()
    return response


def test_new_sessions_are_limited_per_address_and_a_proxys_other_clients_are_not(
    start_production_server: Callable[..., LiveServer],
) -> None:
    proxy, client = loopback_address(), loopback_address()
    server = start_production_server(RATE_LIMIT_SESSIONS_PER_MINUTE="3", VOICEBOT_TRUSTED_PROXIES=f"{proxy}/32")
    assert [post_session(server, client).status for _ in range(3)] == [201, 201, 201]

    refused = post_session(server, client)

    assert refused.status == 429
    assert refused.body["code"] == "rate_limited" and refused.body["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 120
    # Someone else behind the trusted proxy is not held back...
    assert post_session(server, proxy, forwarded_for=documentation_address()).status == 201
    # ...but the same client through the proxy is.
    assert post_session(server, proxy, forwarded_for=client).status == 429


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    start_production_server: Callable[..., LiveServer],
) -> None:
    server = start_production_server(
        RATE_LIMIT_SESSIONS_PER_MINUTE="3", VOICEBOT_TRUSTED_PROXIES=f"{loopback_address()}/32"
    )
    client = loopback_address()

    statuses = [post_session(server, client, forwarded_for=documentation_address()).status for _ in range(4)]

    assert statuses == [201, 201, 201, 429]


async def connect_from(server: LiveServer, source: str, token: str) -> websockets.ClientConnection:
    return await websockets.connect(
        f"{server.ws}/ws/lobby/limits/?token={token}", open_timeout=10, local_addr=(source, 0)
    )


async def test_connects_from_one_address_are_counted_across_two_processes(
    start_production_server: Callable[..., LiveServer], alice: Person
) -> None:
    one, two = (start_production_server(RATE_LIMIT_CONNECTS_PER_MINUTE="3") for _ in range(2))
    address = loopback_address()
    for server in (one, two, one):
        socket = await connect_from(server, address, alice.token)
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["type"] == "welcome"
        await socket.close()

    refused = await connect_from(two, address, alice.token)

    frame = json.loads(await asyncio.wait_for(refused.recv(), 5))
    assert (frame["type"], frame["code"]) == ("error", "rate_limited") and frame["message"]
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(refused.recv(), 5)
    assert refused.close_code == 4029
    other = await connect_from(two, loopback_address(), alice.token)
    assert json.loads(await asyncio.wait_for(other.recv(), 5))["type"] == "welcome"
    await other.close()
