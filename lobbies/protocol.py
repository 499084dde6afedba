"""The lobby WebSocket protocol: one schema per client message type, and the
errors a client receives. docs/protocol.md describes the same contract."""

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

MAX_MESSAGE_BYTES = 64 * 1024
MAX_CHAT_LENGTH = 2000

PeerId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Sdp = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_BYTES)]


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


class Ice(ClientMessage):
    type: Literal["ice"]
    to: PeerId
    # An RTCIceCandidateInit, or null for the end of candidates.
    candidate: dict[str, Any] | None


class Chat(ClientMessage):
    type: Literal["chat"]
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_CHAT_LENGTH)]


class Mute(ClientMessage):
    type: Literal["mute"]
    muted: bool


class Ping(ClientMessage):
    type: Literal["ping"]


SIGNALING_TYPES = frozenset({"offer", "answer", "ice"})

client_message = TypeAdapter(
    Annotated[Union[Offer, Answer, Ice, Chat, Mute, Ping], Field(discriminator="type")]
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


def parse_client_message(text: str | None, binary: bytes | None) -> tuple[dict[str, Any], ClientMessage]:
    """Decode and validate one WebSocket frame.

    Returns the decoded object (relayed as is) and its validated model, or
    raises ProtocolError.
    """
    if text is None:
        raise ProtocolError("bad_json", "Binary frames are not supported; send JSON text.")
    if len(text) > MAX_MESSAGE_BYTES or len(text.encode()) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"Messages may be at most {MAX_MESSAGE_BYTES} bytes.")
    try:
        data = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_json", "The message is not valid JSON.")
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", "The message must be a JSON object.")
    try:
        return data, client_message.validate_python(data)
    except ValidationError as error:
        raise protocol_error_for(error, data)


def protocol_error_for(error: ValidationError, data: dict[str, Any]) -> ProtocolError:
    first = error.errors()[0]
    kind = first["type"]
    if kind == "union_tag_not_found":
        return ProtocolError("missing_field", "The message has no 'type'.")
    if kind == "union_tag_invalid":
        return ProtocolError("unknown_type", f"Unknown message type {str(data.get('type'))[:40]!r}.")
    # The first element of `loc` is the union member (the message type).
    field = ".".join(str(part) for part in first["loc"][1:]) or "type"
    if kind == "missing":
        return ProtocolError("missing_field", f"The field '{field}' is required.")
    return ProtocolError("bad_field", f"The field '{field}' is invalid: {first['msg']}.")
