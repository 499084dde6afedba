"""Fuzzing what clients send, with Hypothesis: WebSocket frames to a
participant in a lobby with someone else in it, and requests to the JSON API.

The examples are fixed (derandomize) so a run is repeatable and quick; a
failure that turns up is kept as a regular test in test_protocol_limits.py.
"""

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from django.test import Client as HttpClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lobbies.protocol import MAX_MESSAGE_BYTES
from tests.conftest import Person, make_person
from tests.lobbies.test_consumers import Client, joined

pytestmark = [pytest.mark.django_db(transaction=True)]

# The error codes of docs/protocol.md that a message (not a connect) can get.
MESSAGE_ERRORS = {"bad_json", "unknown_type", "missing_field", "bad_field", "unknown_peer", "too_large"}
# The API error codes of docs/protocol.md ("HTTP errors").
API_ERRORS = {
    "bad_json", "missing_field", "bad_field", "unauthenticated", "csrf_failed", "not_found",
    "method_not_allowed", "name_taken", "too_large", "bad_content_type",
}

fuzz_settings = hypothesis_settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    # One room (or one set of sessions) serves every example: that it keeps
    # working from one example to the next is part of what is tested.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Any code point, lone surrogates included (what a "\ud800" escape decodes to).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
numbers = (
    st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | any_text,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(any_text, children, max_size=6),
    max_leaves=40,
)
MESSAGE_TYPES = ["offer", "answer", "ice", "chat", "mute", "ping"]
FIELDS = ["to", "sdp", "candidate", "text", "muted", "from"]


@st.composite
def messages(draw: st.DrawFn, receiver_id: str) -> str:
    """A JSON text shaped more or less like a client message."""
    message: dict[Any, Any] = {}
    if draw(st.integers(0, 9)):
        message["type"] = draw(st.sampled_from(MESSAGE_TYPES) | json_values)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        message[field] = draw(
            st.just(receiver_id)
            | json_values
            | st.fixed_dictionaries(
                {},
                optional={
                    "candidate": json_values,
                    "sdpMid": json_values,
                    "sdpMLineIndex": json_values,
                    "usernameFragment": json_values,
                },
            )
        )
    message.update(draw(st.dictionaries(any_text, json_values, max_size=4)))
    return json.dumps(message, ensure_ascii=draw(st.booleans()))


def deeply_nested(depth: int) -> str:
    return '{"type": "ping", "x": %s%s}' % ("[" * depth, "]" * depth)


def frames(receiver_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """What a WebSocket client can send, as the server hands it on: text (JSON
    or not) or bytes, empty ones included."""
    texts = (
        messages(receiver_id)
        | json_values.map(json.dumps)
        | any_text
        | st.text(max_size=200)
        | st.integers(2, 40000).map(deeply_nested)
        | st.integers(MAX_MESSAGE_BYTES - 100, MAX_MESSAGE_BYTES + 100).map(
            lambda size: json.dumps({"type": "chat", "text": "x" * size})
        )
    )
    return texts.map(lambda text: {"text": text}) | st.binary(max_size=200).map(lambda data: {"bytes": data})


def is_legitimate(frame: dict[str, Any], sender_id: str) -> bool:
    """A frame the receiving side may get while the sender fuzzes: what a
    valid message of the sender's sets off."""
    if frame["type"] in ("offer", "answer", "ice"):
        return frame["from"] == sender_id
    if frame["type"] == "chat":
        return frame["from"] == sender_id and isinstance(frame["text"], str)
    return frame["type"] == "peer_updated" and frame["peer"]["peer_id"] == sender_id


class Room:
    def __init__(self, sender: Client, receiver: Client, sender_id: str, receiver_id: str) -> None:
        self.sender = sender
        self.receiver = receiver
        self.sender_id = sender_id
        self.receiver_id = receiver_id


@pytest.fixture
async def room(settings, channel_layer: str, alice: Person, bob: Person) -> AsyncIterator[Room]:
    # Hundreds of messages in a few seconds are what the rate limits are for;
    # here every one of them must get its own answer.
    settings.RATE_LIMITS = False
    sender = await joined(alice, "fuzz")
    receiver = await joined(bob, "fuzz")
    assert (await sender.receive())["type"] == "peer_joined"
    yield Room(sender, receiver, alice.id, bob.id)
    await sender.disconnect()
    await receiver.disconnect()


@pytest.mark.parametrize("channel_layer", ["redis"], indirect=True)
@fuzz_settings
@given(data=st.data())
async def test_no_websocket_frame_breaks_the_connection_or_the_room(room: Room, data: st.DataObject) -> None:
    frame = data.draw(frames(room.receiver_id), label="frame")

    await room.sender.send_input({"type": "websocket.receive", **frame})

    # Messages are handled in order: whatever the frame set off for its
    # sender arrives before the pong (but for chat and mute news, which go
    # round through the lobby's group and may come later).
    await room.sender.send_json_to({"type": "ping"})
    while (reply := await room.sender.receive()) != {"type": "pong"}:
        if reply["type"] == "error":
            assert reply["code"] in MESSAGE_ERRORS, reply
            assert set(reply) == {"type", "code", "message"} and reply["message"], reply
        else:
            assert is_legitimate(reply, room.sender_id), reply
    # The other participant got nothing but legitimate relays, and still gets a valid offer.
    offer = {"type": "offer", "to": room.receiver_id, "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}
    await room.sender.send_json_to(offer)
    while (delivered := await room.receiver.receive()) != {**offer, "from": room.sender_id}:
        assert is_legitimate(delivered, room.sender_id), delivered


# --- HTTP ------------------------------------------------------------------------

ENDPOINTS = ["/api/sessions/", "/api/sessions/resume/", "/api/lobbies/", "/api/lobbies/{name}/"]
TAKEN = [("POST", "/api/sessions/"), ("POST", "/api/sessions/resume/"), ("GET", "/api/lobbies/"), ("POST", "/api/lobbies/"), ("GET", "/api/lobbies/{name}/")]
# The others all stop at the same 405, so they get a smaller share.
OTHER_METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
# Seeds, as a fuzzer's dictionary: characters that mean something to a URL,
# to HTML, to the database (NUL) or to a reader (bidi, zero-width).
NAME_CHARACTERS = "aZ9_-é東\x00\t <>%.?#\u202e\u200b"
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf-16",
    "application/json; charset=nonsense",
    "APPLICATION/JSON",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "",
]
# What a server hands Django: header values are ISO-8859-1 text without line breaks.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)


@st.composite
def requests(draw: st.DrawFn, token: str) -> dict[str, Any]:
    method, path = draw(
        st.sampled_from(TAKEN) | st.sampled_from(TAKEN) | st.tuples(st.sampled_from(OTHER_METHODS), st.sampled_from(ENDPOINTS))
    )
    # A name as a URL carries it: percent-encoded UTF-8, never a "/" (which would be another path).
    name = draw(
        st.text(st.sampled_from(NAME_CHARACTERS), min_size=1, max_size=80)
        | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/"), min_size=1, max_size=80)
    )
    path = path.replace("{name}", quote(name, safe=""))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["limit=", "limit=3", "limit=-1", "limit=99999999999999999999", "x=1"]))
    fields = st.fixed_dictionaries(
        {},
        optional={
            "name": st.just("fuzz-lobby") | json_values,
            "private": json_values,
            "max_participants": json_values,
            "password": json_values,
        },
    )
    body = draw(
        fields.map(lambda value: json.dumps(value).encode())
        | json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        | st.integers(2, 9000).map(lambda depth: ("[" * depth + "]" * depth).encode())
        | st.binary(max_size=300)
    )
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Authorization"] = draw(st.just(f"Bearer {token}") | st.just(f"bearer  {token} ") | header_text)
    if draw(st.booleans()):
        headers["Cookie"] = "voicebot_token=" + draw(st.just(token) | header_text.filter(lambda v: ";" not in v))
    if draw(st.booleans()):
        headers["X-Lobby-Password"] = draw(header_text)
    if draw(st.booleans()):
        headers["X-CSRFToken"] = draw(header_text)
    return {
        "method": method,
        "path": path,
        "data": body,
        "content_type": draw(st.sampled_from(CONTENT_TYPES) | header_text),
        "headers": headers,
    }


@pytest.fixture
def api_token(settings) -> str:
    settings.RATE_LIMITS = False
    return make_person("Fuzzer").token


@fuzz_settings
@given(data=st.data())
def test_no_api_request_gets_a_server_error_or_an_undocumented_answer(api_token: str, data: st.DataObject) -> None:
    request = data.draw(requests(api_token), label="request")

    response = HttpClient().generic(**request)

    assert response.status_code < 500, response.content
    assert response["Content-Type"] == "application/json", response.content
    if request["method"] == "HEAD":
        return
    body = response.json()
    assert isinstance(body, dict), body
    if response.status_code >= 400:
        assert body["code"] in API_ERRORS, body
        assert set(body) == {"code", "message"} and isinstance(body["message"], str) and body["message"], body
    else:
        assert "code" not in body, body
