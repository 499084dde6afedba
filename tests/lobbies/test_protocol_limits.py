"""Size and shape limits on what a client sends: WebSocket messages, display
names, lobby names and the lobby list. Each refused input shows the error the
client gets, and that the connection and the others in the room carry on."""

import json
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import pytest
import websockets
from django.test import Client as HttpClient

from lobbies.protocol import (
    MAX_CANDIDATE_LENGTH,
    MAX_EXTRA_CHARACTERS,
    MAX_EXTRA_DEPTH,
    MAX_EXTRA_FIELDS,
    MAX_EXTRA_VALUES,
    MAX_SAFE_INTEGER,
    MAX_SDP_LENGTH,
)
from lobbies.views import MAX_NAME_LENGTH
from tests.conftest import LiveClient, LiveServer, Person, make_person
from tests.lobbies.test_consumers import Client, joined

pytestmark = [pytest.mark.django_db(transaction=True)]

TO = "{to}"  # replaced by the receiver's peer id
# Parsing does not depend on the layer; the relay afterwards runs on the production one.
ON_REDIS = pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)


def nested(depth: int) -> object:
    """`depth` arrays, one inside the other, around a 1."""
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def message(**fields: object) -> str:
    return json.dumps(fields)


class Room:
    """Alice and Bob in one lobby, each having seen the other."""

    def __init__(self, sender: Client, receiver: Client, receiver_id: str, sender_id: str) -> None:
        self.sender = sender
        self.receiver = receiver
        self.receiver_id = receiver_id
        self.sender_id = sender_id

    async def carries_on(self) -> None:
        """Nothing reached Bob; Alice's connection answers, and her next offer reaches him."""
        assert await self.receiver.receive_nothing(timeout=0.2)
        await self.sender.still_works()
        offer = {"type": "offer", "to": self.receiver_id, "sdp": "v=0\r\n"}
        await self.sender.send_json_to(offer)
        assert await self.receiver.receive() == {**offer, "from": self.sender_id}


@pytest.fixture
async def room(channel_layer: str, alice: Person, bob: Person) -> AsyncIterator[Room]:
    sender = await joined(alice)
    receiver = await joined(bob)
    assert (await sender.receive())["type"] == "peer_joined"
    yield Room(sender, receiver, bob.id, alice.id)
    await sender.disconnect()
    await receiver.disconnect()


REFUSED = [
    # SDP and ICE candidates
    ("sdp-too-long", message(type="offer", to=TO, sdp="v" * (MAX_SDP_LENGTH + 1)), "bad_field", "'sdp'"),
    ("answer-sdp-too-long", message(type="answer", to=TO, sdp="v" * (MAX_SDP_LENGTH + 1)), "bad_field", "'sdp'"),
    (
        "candidate-too-long",
        message(type="ice", to=TO, candidate={"candidate": "c" * (MAX_CANDIDATE_LENGTH + 1)}),
        "bad_field",
        "'candidate.candidate'",
    ),
    (
        "candidate-unknown-key",
        message(type="ice", to=TO, candidate={"candidate": "candidate:1", "sdpMid": "0", "payload": "x"}),
        "bad_field",
        "'candidate.payload'",
    ),
    ("candidate-is-a-string", message(type="ice", to=TO, candidate="candidate:1"), "bad_field", "'candidate'"),
    ("candidate-is-a-list", message(type="ice", to=TO, candidate=[]), "bad_field", "'candidate'"),
    ("candidate-not-a-string", message(type="ice", to=TO, candidate={"candidate": 1}), "bad_field", "candidate"),
    ("sdpmid-a-number", message(type="ice", to=TO, candidate={"sdpMid": 0}), "bad_field", "'candidate.sdpMid'"),
    ("sdpmid-too-long", message(type="ice", to=TO, candidate={"sdpMid": "m" * 257}), "bad_field", "sdpMid"),
    ("mline-a-string", message(type="ice", to=TO, candidate={"sdpMLineIndex": "0"}), "bad_field", "sdpMLineIndex"),
    ("mline-a-boolean", message(type="ice", to=TO, candidate={"sdpMLineIndex": True}), "bad_field", "sdpMLineIndex"),
    ("mline-negative", message(type="ice", to=TO, candidate={"sdpMLineIndex": -1}), "bad_field", "sdpMLineIndex"),
    ("mline-too-big", message(type="ice", to=TO, candidate={"sdpMLineIndex": 65536}), "bad_field", "sdpMLineIndex"),
    ("ufrag-too-long", message(type="ice", to=TO, candidate={"usernameFragment": "u" * 257}), "bad_field", "usernameFragment"),
    # Numbers JSON has no place for, or that a JavaScript peer would read wrongly
    ("nan", '{"type": "ping", "x": NaN}', "bad_json", "NaN"),
    ("infinity", '{"type": "offer", "to": "{to}", "sdp": "v=0", "x": Infinity}', "bad_json", "Infinity"),
    ("minus-infinity", '{"type": "ping", "x": [-Infinity]}', "bad_json", "Infinity"),
    ("overflowing-float", '{"type": "offer", "to": "{to}", "sdp": "v=0", "x": 1e400}', "bad_json", "finite"),
    ("unsafe-integer", message(type="offer", to=TO, sdp="v=0", x=MAX_SAFE_INTEGER + 1), "bad_json", "Integers"),
    ("negative-unsafe-integer", message(type="ping", x=-(MAX_SAFE_INTEGER + 1)), "bad_json", "Integers"),
    ("5000-digit-integer", '{"type": "ping", "x": %s}' % ("9" * 5000), "bad_json", "Integers"),
    ("huge-mline-index", message(type="ice", to=TO, candidate={"sdpMLineIndex": 10**30}), "bad_json", "Integers"),
    # Nesting: past what the decoder can follow, and past the relay's own bound
    ("nested-past-the-decoder", '{"type": "ping", "x": %s1%s}' % ("[" * 20000, "]" * 20000), "bad_json", "nested"),
    ("nested-objects", '{"type": "ping", "x": %s1%s}' % ('{"a":' * 5000, "}" * 5000), "bad_json", "nested"),
    ("extra-nested-too-deeply", message(type="offer", to=TO, sdp="v=0", x=nested(MAX_EXTRA_DEPTH + 1)), "bad_field", "'x'"),
    # Extra fields, relayed as sent, are bounded
    (
        "too-many-extra-fields",
        message(type="offer", to=TO, sdp="v=0", **{f"x{i}": i for i in range(MAX_EXTRA_FIELDS + 1)}),
        "bad_field",
        "extra fields",
    ),
    ("too-many-extra-values", message(type="ping", x=list(range(MAX_EXTRA_VALUES))), "bad_field", "too large"),
    (
        "too-much-extra-text",
        message(type="offer", to=TO, sdp="v=0", x="x" * (MAX_EXTRA_CHARACTERS + 1)),
        "bad_field",
        "too large",
    ),
    ("extra-text-in-keys", message(type="ping", x={"k" * (MAX_EXTRA_CHARACTERS + 1): 1}), "bad_field", "too large"),
    # Lone surrogates: valid JSON escapes that are no text
    ("lone-surrogate-in-chat", '{"type": "chat", "text": "hi \\ud800"}', "bad_field", "surrogate"),
    ("lone-surrogate-in-sdp", '{"type": "offer", "to": "{to}", "sdp": "v=0\\udc00"}', "bad_field", "surrogate"),
    ("lone-surrogate-in-to", '{"type": "offer", "to": "\\udbff", "sdp": "v=0"}', "bad_field", "surrogate"),
    ("lone-surrogate-in-extra", '{"type": "offer", "to": "{to}", "sdp": "v=0", "x": ["\\ud800"]}', "bad_field", "surrogate"),
    ("lone-surrogate-in-key", '{"type": "offer", "to": "{to}", "sdp": "v=0", "\\ud800": 1}', "bad_field", "surrogate"),
    ("lone-surrogate-in-nested-key", '{"type": "ping", "x": {"\\udfff": 1}}', "bad_field", "surrogate"),
    ("reversed-surrogate-pair", '{"type": "chat", "text": "\\ude00\\ud83d"}', "bad_field", "surrogate"),
    # What the union cannot tell apart
    ("type-a-list", message(type=[[["offer"]]]), "unknown_type", "string"),
    ("type-an-object", message(type={"offer": 1}), "unknown_type", "string"),
    ("type-null", message(type=None), "unknown_type", "string"),
]


@pytest.fixture
def unlimited(settings) -> None:
    """Many refusals in a row from one connection: the rate limits would step in first."""
    settings.RATE_LIMITS = False


@ON_REDIS
async def test_an_input_past_a_limit_gets_its_error_and_the_room_carries_on(unlimited: None, room: Room) -> None:
    # One room for every case: each is followed by a check that the room carries on.
    for case, raw, code, mentions in REFUSED:
        await room.sender.send_to(text_data=raw.replace(TO, room.receiver_id))

        error = await room.sender.expect_error(code)
        assert mentions in error["message"], case
        await room.carries_on()


@ON_REDIS
async def test_text_that_is_not_utf8_is_bad_json(room: Room) -> None:
    """Servers decode frames as UTF-8 and drop a connection whose frame is not;
    text that still holds a surrogate gets the same error as invalid JSON."""
    await room.sender.send_to(text_data='{"type": "chat", "text": "\ud800"}')

    assert "UTF-8" in (await room.sender.expect_error("bad_json"))["message"]
    await room.carries_on()


ACCEPTED = [
    ("sdp-at-the-limit", {"type": "offer", "sdp": "v" * MAX_SDP_LENGTH}),
    (
        "a-browser-candidate",
        {
            "type": "ice",
            "candidate": {
                "candidate": "candidate:842163049 1 udp 1677729535 203.0.113.7 54321 typ srflx raddr 192.168.1.20 rport 54321",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
                "usernameFragment": "a1b2",
            },
        },
    ),
    ("candidate-at-the-limits", {"type": "ice", "candidate": {"candidate": "c" * MAX_CANDIDATE_LENGTH, "sdpMLineIndex": 65535}}),
    ("end-of-candidates-object", {"type": "ice", "candidate": {"candidate": "", "sdpMid": None, "sdpMLineIndex": None}}),
    ("candidate-with-defaults", {"type": "ice", "candidate": {}}),
    ("extra-at-the-depth", {"type": "offer", "sdp": "v=0", "x": nested(MAX_EXTRA_DEPTH)}),
    ("extra-fields-at-the-count", {"type": "offer", "sdp": "v=0", **{f"x{i}": None for i in range(MAX_EXTRA_FIELDS)}}),
    ("extra-values-at-the-count", {"type": "answer", "sdp": "v=0", "x": list(range(MAX_EXTRA_VALUES - 1))}),
    ("extra-text-at-the-limit", {"type": "answer", "sdp": "v=0", "x": "x" * (MAX_EXTRA_CHARACTERS - 1)}),
    ("safe-integers-and-floats", {"type": "offer", "sdp": "v=0", "x": [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 1.5e300, -0.0]}),
    ("surrogate-pair-escaped", {"type": "offer", "sdp": "v=0 \ud83d\ude00", "x": {"\u00e9": "\U0001f600"}}),
]


@ON_REDIS
async def test_signaling_within_the_limits_is_relayed_as_sent(unlimited: None, room: Room) -> None:
    for case, signal in ACCEPTED:
        # ensure_ascii: pairs go over the wire as \ud83d\ude00 escapes, as JavaScript's JSON.stringify may write them.
        text = json.dumps({**signal, "to": room.receiver_id})

        await room.sender.send_to(text_data=text)

        assert await room.receiver.receive_from() == text[:-1] + f', "from": "{room.sender_id}"}}', case


@ON_REDIS
async def test_a_chat_with_an_emoji_escaped_as_a_surrogate_pair_is_relayed(room: Room) -> None:
    await room.sender.send_to(text_data='{"type": "chat", "text": "hi \\ud83d\\ude00"}')

    assert (await room.receiver.receive())["text"] == "hi \U0001f600"


# --- HTTP: display names, lobby names, passwords, the lobby list -----------------


def post(client: HttpClient, path: str, body: object, **headers: str):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, data, content_type="application/json", headers=headers)


def refused(response, status: int, code: str, mentions: str = "") -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code, body
    assert mentions in body["message"], body


@pytest.mark.parametrize(
    "name, mentions",
    [
        ("Eve\u202egnp.exe", "bidi"),  # right-to-left override
        ("Mallory\u2066x\u2069", "bidi"),  # isolates
        ("Ad\u200bmin", "zero-width"),
        ("Ad\u200dmin", "zero-width"),
        ("\ufeffAlice", "zero-width"),
        ("Bell\x07", "control"),
        ("Esc\x1b[31mRed", "control"),
        ("Null\x00", "control"),
        ("<script>alert(1)</script>", "'<' or '>'"),
        ("a > b", "'<' or '>'"),
        ("Private\ue000", "private-use"),
        ("Unassigned\U000e0080", "unassigned"),
        ("x" * (MAX_NAME_LENGTH + 1), f"at most {MAX_NAME_LENGTH}"),
        ("\u3164", "blank"),  # Hangul filler: a name that shows as nothing
        ("Bob\u2800", "blank"),  # braille blank: looks like Bob
        ("\uffa0\u115f\u1160", "blank"),
    ],
    ids=[
        "rlo", "isolates", "zwsp", "zwj", "bom", "bell", "ansi-escape", "nul", "html", "angle",
        "private-use", "unassigned", "too-long", "hangul-filler", "braille-blank", "fillers",
    ],
)
def test_a_display_name_that_could_mislead_is_refused(name: str, mentions: str) -> None:
    refused(post(HttpClient(), "/api/sessions/", {"name": name}), 400, "bad_field", mentions)


def test_a_display_name_with_a_lone_surrogate_is_refused() -> None:
    response = post(HttpClient(), "/api/sessions/", '{"name": "Al\\ud800ice"}')

    refused(response, 400, "bad_field", "surrogate")


@pytest.mark.parametrize("name", ["Zoë", "李小龙", "Ольга", "José María", "محمد", "Ärger & Söhne", "x" * MAX_NAME_LENGTH])
def test_display_names_in_any_script_are_accepted(name: str) -> None:
    response = post(HttpClient(), "/api/sessions/", {"name": name})

    assert response.status_code == 201, response.content
    assert response.json()["name"] == name


@pytest.fixture
def creator(transactional_db: None) -> Person:
    return make_person("Creator")


@pytest.mark.parametrize(
    "name",
    ["evil\u202eroom", "zero\u200bwidth", "bell\x07", "<b>room</b>", "a>b", "x" * 65, "tab\troom", "\ud800", "\u3164"],
    ids=["rlo", "zwsp", "control", "html", "angle", "too-long", "tab", "lone-surrogate", "hangul-filler"],
)
def test_a_lobby_name_that_could_mislead_is_refused(creator: Person, name: str) -> None:
    response = post(HttpClient(), "/api/lobbies/", {"name": name}, Authorization=f"Bearer {creator.token}")

    refused(response, 400, "bad_field", "'name'")


def test_a_lobby_name_in_any_script_is_accepted(creator: Person) -> None:
    response = post(HttpClient(), "/api/lobbies/", {"name": "équipe_東京-1"}, Authorization=f"Bearer {creator.token}")

    assert response.status_code == 201, response.content


def test_a_lobby_password_with_a_lone_surrogate_is_refused(creator: Person) -> None:
    body = '{"name": "vault", "password": "open \\udead sesame"}'
    response = post(HttpClient(), "/api/lobbies/", body, Authorization=f"Bearer {creator.token}")

    refused(response, 400, "bad_field", "'password'")
    assert post(HttpClient(), "/api/lobbies/", {"name": "vault"}, Authorization=f"Bearer {creator.token}").status_code == 201


@pytest.mark.parametrize("path", ["/api/sessions/", "/api/lobbies/"])
def test_a_body_nested_past_the_decoder_is_bad_json(creator: Person, path: str) -> None:
    body = "[" * 8000 + "]" * 8000

    response = post(HttpClient(), path, body, Authorization=f"Bearer {creator.token}")

    refused(response, 400, "bad_json", "nested")


@pytest.mark.parametrize("name", ["a\x00b", "x" * 65, "<b>", "tab\troom"], ids=["nul", "too-long", "html", "tab"])
def test_the_details_of_a_name_no_lobby_can_have_are_not_found(name: str) -> None:
    """Found by the fuzzer: the database refused a NUL in the name, a 500."""
    response = HttpClient().get(f"/api/lobbies/{quote(name, safe='')}/")

    refused(response, 404, "not_found")


@pytest.fixture
def five_lobbies(creator: Person, settings) -> list[str]:
    settings.LOBBY_LIST_LIMIT = 4
    names = [f"lobby-{i}" for i in range(5)]
    for name in names:
        assert post(HttpClient(), "/api/lobbies/", {"name": name}, Authorization=f"Bearer {creator.token}").status_code == 201
    return names


def listed(query: str = "") -> list[str]:
    response = HttpClient().get("/api/lobbies/" + query)
    assert response.status_code == 200, response.content
    return [lobby["name"] for lobby in response.json()["lobbies"]]


def test_the_lobby_list_is_capped_by_default(five_lobbies: list[str]) -> None:
    assert len(listed()) == 4


@pytest.mark.parametrize("query, count", [("?limit=2", 2), ("?limit=1", 1), ("?limit=4", 4), ("?limit=5", 4), ("?limit=007", 4), ("?limit=" + "9" * 50, 4)])
def test_the_lobby_list_takes_a_limit_up_to_the_cap(five_lobbies: list[str], query: str, count: int) -> None:
    assert listed(query) == listed()[:count]


@pytest.mark.parametrize("query", ["?limit=0", "?limit=000", "?limit=-1", "?limit=", "?limit=two", "?limit=1.5", "?limit=%D9%A3", "?limit=+3"])
def test_a_lobby_list_limit_that_is_not_a_count_is_refused(five_lobbies: list[str], query: str) -> None:
    refused(HttpClient().get("/api/lobbies/" + query), 400, "bad_field", "'limit'")


# --- A real server ---------------------------------------------------------------


async def test_on_the_production_server_hostile_frames_end_only_the_sender_that_broke_the_standard(
    start_production_server: Callable[..., LiveServer],
) -> None:
    """Nesting past the decoder gets bad_json and the connection carries on; a
    text frame that is not UTF-8 breaks the WebSocket standard, which requires
    the server to end that connection (1007). The room carries on either way."""
    server = start_production_server()
    alice, bob = LiveClient(server, "Alice"), LiveClient(server, "Bob")
    await alice.join("hostile")
    await bob.join("hostile")
    assert (await alice.receive())["type"] == "peer_joined"

    await bob.socket.send('{"type": "ping", "x": %s1%s}' % ("[" * 30000, "]" * 30000))
    assert (await bob.receive())["code"] == "bad_json"
    await bob.send({"type": "offer", "to": alice.id, "sdp": "v=0"})
    assert await alice.receive() == {"type": "offer", "to": alice.id, "sdp": "v=0", "from": bob.id}

    await bob.socket.send(b'{"type": "chat", "text": "\xff"}', text=True)
    with pytest.raises(websockets.ConnectionClosedError) as closed:
        await bob.receive()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    update = await alice.receive()
    assert (update["type"], update["peer"]["peer_id"], update["peer"]["state"]) == ("peer_updated", bob.id, "reconnecting")
    await alice.send({"type": "ping"})
    assert await alice.receive() == {"type": "pong"}
    await alice.close()
