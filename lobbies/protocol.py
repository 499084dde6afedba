"""The lobby WebSocket protocol: one schema per client message type, and the
errors a client receives. docs/protocol.md describes the same contract."""

import json
import math
from typing import Annotated, Any, Literal, NoReturn, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

MAX_MESSAGE_BYTES = 64 * 1024
MAX_CHAT_LENGTH = 2000
# Chat messages in one chat_history reply; a client pages for more.
CHAT_HISTORY_LIMIT = 100
# Browser SDPs are 3 to 5 KB; a bot's, which carries its candidates, a little more.
MAX_SDP_LENGTH = 16 * 1024
MAX_CANDIDATE_LENGTH = 1024
# sdpMid and usernameFragment (RFC 8839 bounds an ICE ufrag at 256 characters).
MAX_ICE_TOKEN_LENGTH = 256
# Extra fields are relayed as sent, so they are bounded like the rest.
MAX_EXTRA_FIELDS = 16
MAX_EXTRA_DEPTH = 8
MAX_EXTRA_VALUES = 256
MAX_EXTRA_CHARACTERS = 4096
# Numbers beyond this are read inexactly by JavaScript, the peers' language.
MAX_SAFE_INTEGER = 2**53 - 1
# JSON lets a string hold a lone surrogate escape ("\ud800"), which is no
# character: UTF-8 cannot encode it, and a peer or bot may choke on it.
# pydantic refuses one in the fields it validates (and in the message's keys).
LONE_SURROGATE = "holds a lone surrogate (\\uD800-\\uDFFF), which is not text"

PeerId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Sdp = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SDP_LENGTH)]
IceToken = Annotated[str, StringConstraints(max_length=MAX_ICE_TOKEN_LENGTH)]


class ClientMessage(BaseModel):
    # Strict: `"muted": "yes"` is a bad field, not True. Unknown fields are kept
    # so that relayed messages reach the peer exactly as sent.
    model_config = ConfigDict(strict=True, extra="allow")


class Offer(ClientMessage):
    type: Literal["offer"]
    to: PeerId
    sdp: Sdp


class Answer(ClientMessage):
    type: Literal["answer"]
    to: PeerId
    sdp: Sdp


class IceCandidateInit(BaseModel):
    """What RTCIceCandidate.toJSON() gives, with the WebIDL defaults; nothing else."""

    model_config = ConfigDict(strict=True, extra="forbid")

    candidate: Annotated[str, StringConstraints(max_length=MAX_CANDIDATE_LENGTH)] = ""
    sdpMid: IceToken | None = None
    sdpMLineIndex: Annotated[int, Field(ge=0, le=65535)] | None = None
    usernameFragment: IceToken | None = None


class Ice(ClientMessage):
    type: Literal["ice"]
    to: PeerId
    # null is the end of candidates.
    candidate: IceCandidateInit | None


class Chat(ClientMessage):
    type: Literal["chat"]
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_CHAT_LENGTH)]


class ChatHistory(ClientMessage):
    type: Literal["chat_history"]
    # The id of the last chat message the client has; null (or absent) for the oldest kept.
    after: Annotated[int, Field(ge=0, le=MAX_SAFE_INTEGER)] | None = None


class Mute(ClientMessage):
    type: Literal["mute"]
    muted: bool


class Ping(ClientMessage):
    type: Literal["ping"]


SIGNALING_TYPES = frozenset({"offer", "answer", "ice"})

client_message = TypeAdapter(
    Annotated[Union[Offer, Answer, Ice, Chat, ChatHistory, Mute, Ping], Field(discriminator="type")]
)


class ProtocolError(Exception):
    """A message the server cannot act on; the client receives it as an `error` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def frame(self) -> dict[str, str]:
        return error_frame(self.code, self.message)


def error_frame(code: str, message: str) -> dict[str, str]:
    return {"type": "error", "code": code, "message": message}


def refuse_constant(name: str) -> NoReturn:
    raise ProtocolError("bad_json", f"{name} is not a JSON number.")


def finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ProtocolError("bad_json", "Numbers must be finite.")
    return value


def safe_int(literal: str) -> int:
    # Checked by length first, so a long literal is never converted.
    if len(literal.lstrip("-")) > 16 or abs(value := int(literal)) > MAX_SAFE_INTEGER:
        raise ProtocolError("bad_json", f"Integers must be within ±{MAX_SAFE_INTEGER}.")
    return value


# The hooks only run for numbers and for NaN/Infinity, which signaling rarely
# or never holds, so the C decoder does the rest at full speed.
decoder = json.JSONDecoder(parse_constant=refuse_constant, parse_float=finite_float, parse_int=safe_int)


def parse_client_message(text: str | None, binary: bytes | None) -> tuple[dict[str, Any], ClientMessage]:
    """Decode and validate one WebSocket frame.

    Returns the decoded object (relayed as is) and its validated model, or
    raises ProtocolError.
    """
    if text is None:
        raise ProtocolError("bad_json", "Binary frames are not supported; send JSON text.")
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"Messages may be at most {MAX_MESSAGE_BYTES} bytes.")
    if not text.isascii():
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise ProtocolError("bad_json", "The message is not valid UTF-8 text.")
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError("too_large", f"Messages may be at most {MAX_MESSAGE_BYTES} bytes.")
    try:
        data = decoder.decode(text)
    except ValueError:
        raise ProtocolError("bad_json", "The message is not valid JSON.")
    except RecursionError:
        raise ProtocolError("bad_json", "The message is nested too deeply.")
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", "The message must be a JSON object.")
    try:
        message = client_message.validate_python(data)
    except ValidationError as error:
        raise protocol_error_for(error, data)
    if message.model_extra:
        check_extra_fields(message.model_extra)
    return data, message


def check_extra_fields(extra: dict[str, Any]) -> None:
    """Bound what a client adds to a message: it is relayed as sent, and the peer parses it.

    Walked without recursion, as the decoder allows nesting deeper than a
    recursive walk could go."""
    if len(extra) > MAX_EXTRA_FIELDS:
        raise ProtocolError("bad_field", f"A message may have at most {MAX_EXTRA_FIELDS} extra fields.")
    values = 0
    characters = 0
    for name, top in extra.items():
        field = name[:40]
        characters += text_length(name, field)
        pending: list[tuple[Any, int]] = [(top, 0)]
        while pending:
            value, depth = pending.pop()
            values += 1
            if isinstance(value, str):
                characters += text_length(value, field)
            elif isinstance(value, dict | list):
                if depth == MAX_EXTRA_DEPTH:
                    raise ProtocolError(
                        "bad_field",
                        f"The field '{field}' is nested too deeply: "
                        f"at most {MAX_EXTRA_DEPTH} levels of objects and arrays.",
                    )
                if isinstance(value, dict):
                    characters += sum(text_length(key, field) for key in value)
                    value = value.values()
                pending.extend((child, depth + 1) for child in value)
            if values + len(pending) > MAX_EXTRA_VALUES or characters > MAX_EXTRA_CHARACTERS:
                raise ProtocolError(
                    "bad_field",
                    f"The extra fields are too large: at most {MAX_EXTRA_VALUES} values "
                    f"and {MAX_EXTRA_CHARACTERS} characters of text in all.",
                )


def text_length(text: str, field: str) -> int:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ProtocolError("bad_field", f"The field '{field}' {LONE_SURROGATE}.")
    return len(text)


def protocol_error_for(error: ValidationError, data: dict[str, Any]) -> ProtocolError:
    first = error.errors(include_url=False, include_input=False)[0]
    kind = first["type"]
    if kind == "union_tag_not_found":
        return ProtocolError("missing_field", "The message has no 'type'.")
    if kind == "union_tag_invalid":
        tag = data["type"]
        if not isinstance(tag, str):
            return ProtocolError("unknown_type", "The field 'type' must be a string.")
        return ProtocolError("unknown_type", f"Unknown message type {tag[:40]!r}.")
    # The first element of `loc` is the union member (the message type); the
    # rest may name a key the client chose, so it is cut short.
    field = ".".join(str(part) for part in first["loc"][1:])[:80]
    if kind == "missing":
        return ProtocolError("missing_field", f"The field '{field}' is required.")
    if kind == "string_unicode":
        # With no field, it is a key of the message itself.
        return ProtocolError("bad_field", f"The field '{field}' {LONE_SURROGATE}." if field else f"A field name {LONE_SURROGATE}.")
    return ProtocolError("bad_field", f"The field '{field or 'type'}' is invalid: {first['msg']}.")
