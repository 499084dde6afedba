"""The production server: its command line (docs/deploying.md#run-the-server),
used as is by the test suite and the load test, and its WebSocket protocol,
which compresses large messages only (docs/performance.md#compression)."""

import sys
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.typing import ExtensionParameter

from voicebot.queues import OneReaderQueue

# --no-access-log: voicebot.access logs every request with its request ID.
# --ws-max-size: a message over 1 MiB ends the connection (1009); up to that,
#   the consumer answers too_large and the connection stays open.
# --ws: uvicorn's own WebSocket protocol, with the compression set up below.
UVICORN_OPTIONS = ["--no-access-log", "--ws-max-size", "1048576", "--ws", "voicebot.server:WebSocketProtocol"]

# Neither side keeps a compression context between messages: an idle
# connection then holds no zlib state (a context costs about 40 KiB), and
# signaling messages are too far apart for a shared context to pay.
DEFLATE_OPTIONS = {
    "server_no_context_takeover": True,
    "client_no_context_takeover": True,
    "server_max_window_bits": 12,
    "compress_settings": {"memLevel": 5},
}


def uvicorn_command(port: int, application: str = "voicebot.asgi:application", host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "uvicorn", application, "--host", host, "--port", str(port), *UVICORN_OPTIONS]


class ThresholdDeflate(PerMessageDeflate):
    """permessage-deflate that sends messages under `min_bytes` as they are
    (RFC 7692 lets a sender leave any message uncompressed): ICE candidates
    and chat shrink too little to pay for compressing them."""

    def __init__(self, *args: object, min_bytes: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.min_bytes = min_bytes

    def encode(self, frame: Frame) -> Frame:
        if frame.fin and frame.opcode in (Opcode.TEXT, Opcode.BINARY) and len(frame.data) < self.min_bytes:
            return frame
        return super().encode(frame)


class ThresholdDeflateFactory(ServerPerMessageDeflateFactory):
    def __init__(self, min_bytes: int) -> None:
        super().__init__(**DEFLATE_OPTIONS)
        self.min_bytes = min_bytes

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, negotiated = super().process_request_params(params, accepted_extensions)
        extension = ThresholdDeflate(
            negotiated.remote_no_context_takeover,
            negotiated.local_no_context_takeover,
            negotiated.remote_max_window_bits,
            negotiated.local_max_window_bits,
            negotiated.compress_settings,
            min_bytes=self.min_bytes,
        )
        return response, extension


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, compressing as VOICEBOT_WS_COMPRESSION says
    for clients that offer permessage-deflate, in less memory per connection:
    a small queue for what the client sends (voicebot.queues), and no copy of
    the handshake once it is done."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.queue = OneReaderQueue()
        if settings.VOICEBOT_WS_COMPRESSION:
            self.conn.available_extensions = [ThresholdDeflateFactory(settings.VOICEBOT_WS_COMPRESSION_MIN_BYTES)]
        else:
            self.conn.available_extensions = []

    async def send(self, message: Any) -> None:
        await super().send(message)
        # uvicorn keeps the handshake's request and response, headers and all
        # (about 3 KiB), for as long as the connection lasts, and so does
        # websockets' parser the request; nothing reads them once the
        # handshake is done.
        if self.handshake_complete and self.request is not None:
            self.request.headers.clear()
            self.request = self.response = None
