"""Prometheus metrics of the lobby WebSocket server, updated on the hot path.

Every label value here comes from a fixed set (message types of the protocol,
error codes, close codes), so no lobby name or session id ever becomes a
label. docs/metrics.md describes each metric.
"""

import time

from prometheus_client import Counter, Gauge, Histogram

from lobbies.protocol import MAX_MESSAGE_BYTES

# The client message types of lobbies/protocol.py, and the server's own frames
# that go through lobby_deliver (chat is both).
MESSAGE_TYPES = frozenset({"offer", "answer", "ice", "chat", "chat_history", "mute", "ping"})

# Every error code the server sends (lobbies/protocol.py and lobbies/consumers.py).
ERROR_CODES = frozenset(
    {
        "bad_json",
        "too_large",
        "missing_field",
        "unknown_type",
        "bad_field",
        "unknown_peer",
        "delivery_failed",
        "unauthenticated",
        "lobby_full",
        "bad_password",
        "lobby_closed",
        "kicked",
        "replaced",
        "rate_limited",
        "not_in_lobby",
        "chat_failed",
        "chat_history_failed",
    }
)

# Standard WebSocket codes a client or daphne may close with, plus the
# application codes of lobbies/consumers.py. Anything else counts as "other".
CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 4008, 4029, 4400, 4401, 4403, 4409, 4410}
)

# Latency buckets for work that should take milliseconds.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, MAX_MESSAGE_BYTES)

connections_open = Gauge(
    "voicebot_websocket_connections_open", "Lobby WebSocket connections this process holds open."
)
connections_opened = Counter(
    "voicebot_websocket_connections_opened_total", "Lobby WebSocket connections accepted by this process."
)
connections_closed = Counter(
    "voicebot_websocket_connections_closed_total",
    "Lobby WebSocket connections closed, by close code (unlisted codes as \"other\").",
    ["code"],
)
messages_received = Counter(
    "voicebot_signaling_messages_received_total", "Valid client messages received, by type.", ["type"]
)
messages_delivered = Counter(
    "voicebot_signaling_messages_delivered_total",
    "Relayed messages (offer, answer, ice, chat) handed to a receiving connection, by type.",
    ["type"],
)
errors_sent = Counter(
    "voicebot_signaling_errors_total", "Error frames sent to clients, by error code.", ["code"]
)
message_size = Histogram(
    "voicebot_signaling_message_size_bytes",
    "Size of the text frames clients send (characters, which is bytes for ASCII JSON).",
    buckets=SIZE_BUCKETS,
)
relay_latency = Histogram(
    "voicebot_signaling_relay_latency_seconds",
    "From receipt of a message by the sender's connection to handing it to the receiver's connection.",
    ["type"],
    buckets=FAST_BUCKETS,
)
layer_send_latency = Histogram(
    "voicebot_channel_layer_send_seconds",
    "Time for one channel layer send or group_send, by operation.",
    ["operation"],
    buckets=FAST_BUCKETS,
)
layer_send_failures = Counter(
    "voicebot_channel_layer_send_failures_total",
    "Channel layer sends that failed, by operation and reason (full or error).",
    ["operation", "reason"],
)
join_batch_size = Histogram(
    "voicebot_join_batch_size",
    "Joins decided together in one database transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100),
)
leave_batch_size = Histogram(
    "voicebot_leave_batch_size",
    "Leaves and drops recorded together in one database transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100),
)
chat_batch_size = Histogram(
    "voicebot_chat_batch_size",
    "Chat messages stored together in one database transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100),
)

# Pre-create the label sets, so every series is exported as 0 from the start
# (rate() then sees the first increment) and the hot path skips label lookups.
_received = {kind: messages_received.labels(kind) for kind in MESSAGE_TYPES}
_delivered = {kind: messages_delivered.labels(kind) for kind in MESSAGE_TYPES}
_relay = {kind: relay_latency.labels(kind) for kind in MESSAGE_TYPES}
_errors = {code: errors_sent.labels(code) for code in ERROR_CODES | {"other"}}
_closed = {str(code): connections_closed.labels(str(code)) for code in CLOSE_CODES | {"other"}}
for _operation in ("send", "group_send"):
    layer_send_latency.labels(_operation)
    for _reason in ("full", "error"):
        layer_send_failures.labels(_operation, _reason)


def connection_opened() -> None:
    connections_opened.inc()
    connections_open.inc()


def connection_closed(code: int | None) -> None:
    connections_open.dec()
    _closed.get(str(code), _closed["other"]).inc()


def message_received(kind: str, size: int) -> None:
    message_size.observe(size)
    counter = _received.get(kind)
    if counter is not None:
        counter.inc()


def error_sent(code: str) -> None:
    _errors.get(code, _errors["other"]).inc()


def message_delivered(kind: str, received_at: float | None) -> None:
    """`received_at` is the sender's time.time() at receipt (None for events
    that were not relayed); wall-clock because sender and receiver may be
    different processes."""
    counter = _delivered.get(kind)
    if counter is None or received_at is None:
        return
    counter.inc()
    _relay[kind].observe(max(0.0, time.time() - received_at))


def layer_sent(operation: str, seconds: float) -> None:
    layer_send_latency.labels(operation).observe(seconds)


def layer_failed(operation: str, reason: str) -> None:
    layer_send_failures.labels(operation, reason).inc()


def join_batch_done(size: int) -> None:
    join_batch_size.observe(size)


def leave_batch_done(size: int) -> None:
    leave_batch_size.observe(size)


def chat_batch_done(size: int) -> None:
    chat_batch_size.observe(size)
