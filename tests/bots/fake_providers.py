"""Stand-ins for remote AI providers: real HTTP servers on 127.0.0.1.

    with FakeOpenAI() as fake:
        fake.reply_text = "Hello there."
        fake.fail_next(2, status=503)
        ...  # point an SDK, a bot or a subprocess at fake.base_url
        assert fake.requests[-1].body["model"] == "gpt-test"

They speak the wire formats the official SDKs expect, streaming included, so
tests exercise the real SDK code. Standard library only: usable from tests,
plain scripts and subprocesses alike. Run this file to serve one by hand:

    python tests/bots/fake_providers.py openai --reply "Hi."
"""

import argparse
import array
import io
import json
import math
import re
import sys
import threading
import time
import wave
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

SPEECH_SAMPLE_RATE = 24000  # what OpenAI's /audio/speech returns for "pcm"
SPEECH_SECONDS_PER_WORD = 0.08
SPEECH_TONE_HZ = 440.0

# The Anthropic API version from which sampling parameters are refused.
ANTHROPIC_NO_SAMPLING_VERSION = "2026-10-21"
ANTHROPIC_SAMPLING_PARAMETERS = ("temperature", "top_p", "top_k")


@dataclass
class ReceivedRequest:
    """One request as the fake received it; headers are keyed in lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]  # the JSON body, or a multipart form's text fields
    files: dict[str, bytes] = field(default_factory=dict)  # a multipart form's files


class FakeProvider:
    """What both fakes share: the server, the recorded requests and the scriptable behaviour."""

    def __init__(self) -> None:
        self.reply_text = "The capital of France is Paris."
        self.delay_seconds = 0.0  # before answering any request
        self.stream_delay_seconds = 0.0  # between streamed chunks of text
        # When set, a stream waiting out stream_delay_seconds sends an SSE comment
        # this often, as proxies do to keep a connection open.
        self.keepalive_seconds: float | None = None
        self.api_key: str | None = None  # when set, requests with another key get 401
        self.requests: list[ReceivedRequest] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        handler = type("Handler", (RequestHandler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval makes stop() quick; the default would add half a second to every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name=type(self).__name__, daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers that are waiting out a delay
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail_next(self, count: int, status: int = 503) -> None:
        """The next `count` requests are answered with `status` and the API's error body."""
        with self._lock:
            self._failures.extend([status] * count)

    def pause(self, seconds: float) -> None:
        """Sleeps, but returns at once when the fake stops."""
        if seconds > 0:
            self._stopping.wait(seconds)

    def take_failure(self) -> int | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def handle(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        self.pause(self.delay_seconds)
        if self.api_key is not None and presented_key(received) != self.api_key:
            self.send_error(request, 401, f"Incorrect API key provided: {presented_key(received)}")
            return
        status = self.take_failure()
        if status is not None:
            self.send_error(request, status, f"Scripted failure with HTTP {status}")
            return
        self.route(request, received)

    def route(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        raise NotImplementedError

    def send_error(self, request: "RequestHandler", status: int, message: str) -> None:
        raise NotImplementedError

    def send_stream(self, request: "RequestHandler", head: list[bytes], pieces: list[bytes], tail: list[bytes]) -> None:
        """Server-sent events, each flushed at once: the head and the first piece of text
        straight away, then stream_delay_seconds before each next piece and before the tail."""
        request.send_response(200)
        request.send_header("Content-Type", "text/event-stream")
        request.send_header("Cache-Control", "no-cache")
        request.send_header("Connection", "close")
        request.end_headers()
        for index, event in enumerate(head + pieces + tail):
            if index > len(head):
                self.pause_streaming(request, self.stream_delay_seconds)
            request.wfile.write(event)
            request.wfile.flush()

    def pause_streaming(self, request: "RequestHandler", seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
            self.pause(min(left, self.keepalive_seconds or left))
            if self.keepalive_seconds and time.monotonic() < deadline:
                request.wfile.write(b": keep-alive\n\n")
                request.wfile.flush()


class FakeOpenAI(FakeProvider):
    """An OpenAI-compatible server: /v1/chat/completions, /v1/audio/transcriptions, /v1/audio/speech."""

    def __init__(self) -> None:
        super().__init__()
        self.transcription_text = "What is the capital of France?"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def route(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        routes = {
            "/v1/chat/completions": self.chat_completions,
            "/v1/audio/transcriptions": self.transcriptions,
            "/v1/audio/speech": self.speech,
        }
        answer = routes.get(received.path.split("?")[0])
        if answer is None or received.method != "POST":
            self.send_error(request, 404, f"Unknown endpoint {received.method} {received.path}")
        else:
            answer(request, received)

    def send_error(self, request: "RequestHandler", status: int, message: str) -> None:
        kind = "requests" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
        error = {"message": message, "type": kind, "param": None, "code": None}
        send_json(request, status, {"error": error})

    def chat_completions(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        model = received.body.get("model", "")
        created = int(time.time())
        if not received.body.get("stream"):
            message = {"role": "assistant", "content": self.reply_text}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            body = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage(received, self.reply_text),
            }
            send_json(request, 200, body)
            return

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        head = [chunk({"role": "assistant", "content": ""})]
        pieces = [chunk({"content": piece}) for piece in stream_pieces(self.reply_text)]
        self.send_stream(request, head, pieces, [chunk({}, "stop"), b"data: [DONE]\n\n"])

    def transcriptions(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        response_format = received.body.get("response_format", "json")
        if response_format == "text":
            send_bytes(request, 200, "text/plain; charset=utf-8", self.transcription_text.encode())
        elif response_format == "verbose_json":
            language = received.body.get("language", "english")
            body = {"task": "transcribe", "language": language, "duration": 1.0, "text": self.transcription_text}
            send_json(request, 200, {**body, "segments": []})
        else:
            send_json(request, 200, {"text": self.transcription_text})

    def speech(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        response_format = received.body.get("response_format", "mp3")
        words = len(str(received.body.get("input", "")).split())
        pcm = tone_pcm(max(1, words) * SPEECH_SECONDS_PER_WORD)
        if response_format == "pcm":
            send_bytes(request, 200, "audio/pcm", pcm)
        elif response_format == "wav":
            send_bytes(request, 200, "audio/wav", wav_file(pcm))
        else:
            self.send_error(request, 400, f"The fake serves response_format pcm and wav, not {response_format!r}")


class FakeAnthropic(FakeProvider):
    """An Anthropic Messages API server: /v1/messages, validating requests as the real one does."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        if received.method != "POST" or received.path.split("?")[0] != "/v1/messages":
            self.send_error(request, 404, f"Unknown endpoint {received.method} {received.path}")
            return
        problem = self.invalid(received)
        if problem:
            self.send_error(request, 400, problem)
        else:
            self.messages(request, received)

    def invalid(self, received: ReceivedRequest) -> str:
        """Why the real API would refuse the request with 400, or ""."""
        body = received.body
        version = received.headers.get("anthropic-version", "")
        if not version:
            return "anthropic-version: header is required"
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return f"{name}: Field required"
        if version >= ANTHROPIC_NO_SAMPLING_VERSION:
            for name in ANTHROPIC_SAMPLING_PARAMETERS:
                if name in body:
                    return f"{name}: Extra inputs are not permitted"
        roles = [message.get("role") for message in body["messages"]]
        if not roles or roles[0] != "user":
            return "messages: first message must use the \"user\" role"
        if any(a == b for a, b in zip(roles, roles[1:])):
            return "messages: roles must alternate between \"user\" and \"assistant\""
        return ""

    def send_error(self, request: "RequestHandler", status: int, message: str) -> None:
        kinds = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }
        error = {"type": kinds.get(status, "api_error"), "message": message}
        send_json(request, status, {"type": "error", "error": error, "request_id": "req_fake"})

    def messages(self, request: "RequestHandler", received: ReceivedRequest) -> None:
        model = received.body["model"]
        tokens = usage(received, self.reply_text)
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": tokens["prompt_tokens"], "output_tokens": 0},
        }
        if not received.body.get("stream"):
            message.update(content=[{"type": "text", "text": self.reply_text}], stop_reason="end_turn")
            message["usage"]["output_tokens"] = tokens["completion_tokens"]
            send_json(request, 200, message)
            return

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        head = [
            event("message_start", {"message": message}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            event("ping", {}),
        ]
        pieces = [
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            for piece in stream_pieces(self.reply_text)
        ]
        tail = [
            event("content_block_stop", {"index": 0}),
            event(
                "message_delta",
                {
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": tokens["completion_tokens"]},
                },
            ),
            event("message_stop", {}),
        ]
        self.send_stream(request, head, pieces, tail)


class RequestHandler(BaseHTTPRequestHandler):
    fake: FakeProvider  # set on the subclass each fake makes

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def answer(self) -> None:
        try:
            received = self.receive()
            self.fake.requests.append(received)
            self.fake.handle(self, received)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as clients with timeouts do

    def receive(self) -> ReceivedRequest:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        content_type = self.headers.get("Content-Type", "")
        headers = {name.lower(): value for name, value in self.headers.items()}
        if content_type.startswith("multipart/form-data"):
            fields, files = parse_multipart(content_type, data)
            return ReceivedRequest(self.command, self.path, headers, fields, files)
        body = json.loads(data) if data else {}
        return ReceivedRequest(self.command, self.path, headers, body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read fake.requests instead


def presented_key(received: ReceivedRequest) -> str:
    authorization = received.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[len("bearer ") :]
    return received.headers.get("x-api-key", "")


def parse_multipart(content_type: str, data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + data)
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = payload
        else:
            fields[name] = payload.decode()
    return fields, files


def send_json(request: RequestHandler, status: int, body: dict[str, Any]) -> None:
    send_bytes(request, status, "application/json", json.dumps(body).encode())


def send_bytes(request: RequestHandler, status: int, content_type: str, data: bytes) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(data)))
    request.send_header("Connection", "close")
    request.end_headers()
    request.wfile.write(data)


def stream_pieces(text: str) -> list[str]:
    """The text in word-sized pieces, each with its leading space, as models stream tokens."""
    return re.findall(r"\s*\S+", text) or [text]


def usage(received: ReceivedRequest, reply: str) -> dict[str, int]:
    prompt_words = sum(len(str(message.get("content", "")).split()) for message in received.body.get("messages", []))
    completion_words = len(reply.split())
    return {
        "prompt_tokens": prompt_words,
        "completion_tokens": completion_words,
        "total_tokens": prompt_words + completion_words,
    }


def tone_pcm(seconds: float) -> bytes:
    """A 440 Hz tone as mono signed 16-bit little-endian PCM at SPEECH_SAMPLE_RATE."""
    count = round(seconds * SPEECH_SAMPLE_RATE)
    step = 2 * math.pi * SPEECH_TONE_HZ / SPEECH_SAMPLE_RATE
    samples = array.array("h", (round(8000 * math.sin(step * n)) for n in range(count)))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


def wav_file(pcm: bytes) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SPEECH_SAMPLE_RATE)
        wav.writeframes(pcm)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake AI provider until interrupted.")
    parser.add_argument("kind", choices=["openai", "anthropic"])
    parser.add_argument("--reply", help="the text every chat reply says")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--stream-delay", type=float, default=0.0, help="seconds between streamed chunks")
    options = parser.parse_args()
    fake = FakeOpenAI() if options.kind == "openai" else FakeAnthropic()
    fake.reply_text = options.reply or fake.reply_text
    fake.delay_seconds = options.delay
    fake.stream_delay_seconds = options.stream_delay
    with fake:
        print(fake.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
