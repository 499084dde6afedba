import asyncio
import contextvars
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull, StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http.cookie import parse_cookie
from opentelemetry.trace import SpanKind

from lobbies import metrics, ratelimit, services
from lobbies.cache import invalidation_listener
from lobbies.models import LOBBY_NAME_PATTERN, ChatMessage
from lobbies.presence import presence
from lobbies.protocol import (
    CHAT_HISTORY_LIMIT,
    SIGNALING_TYPES,
    Chat,
    ChatHistory,
    Mute,
    Ping,
    ProtocolError,
    error_frame,
    parse_client_message,
)
from lobbies.publisher import publisher
from lobbies.selectors import asession_for_token, member_chat_history, member_roster
from monitoring.services import audit_record
from voicebot import logcontext
from voicebot.logcontext import DATABASE_UNAVAILABLE
from voicebot.tracing import tracer

logger = logging.getLogger(__name__)
Request = TypeVar("Request")
Outcome = TypeVar("Outcome")

# Application close codes (daphne, the development server, only sends 1000
# and 3000-4999; every server sends these).
CLOSE_BAD_LOBBY_NAME = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_LOBBY_FULL = 4403
CLOSE_BAD_PASSWORD = 4403
CLOSE_REPLACED = 4409
CLOSE_LOBBY_CLOSED = 4410
# The twin of 1008 (policy violation), which daphne will not send.
CLOSE_KICKED = 4008
# Kept sending over its message rate limits: a policy violation too.
CLOSE_FLOODING = 4008
# Too many connects from the client's address, like HTTP 429.
CLOSE_RATE_LIMITED = 4029
# The database cannot be reached (restart, failover), like HTTP 503.
CLOSE_UNAVAILABLE = 4503

# How many joins, leaves or chat messages one transaction takes at most (see Batches).
BATCH_LIMIT = 100
# The threads of joins and leaves, and of chat, which live as long as the
# process, not as long as one event loop. Chat has its own, so that a
# reconnect storm's joins do not hold up a room's chat, nor chat the joins.
ROSTER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roster")
CHAT_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat")

LOBBY_CLOSED_MESSAGE = "An administrator closed this lobby."
NOT_IN_LOBBY_MESSAGE = "This connection no longer holds a place in the lobby; reconnect to rejoin."
UNAVAILABLE_MESSAGE = "The service is temporarily unavailable; try again in a few seconds."
# How many ids of chat messages sent to a connection it remembers, so that a
# catch-up after a Redis outage sends none twice.
CHAT_IDS_REMEMBERED = 200


class Batches(Generic[Request, Outcome]):
    """Runs one batch service (services.lobby_join_many, lobby_leave_many,
    chat_send_many) for the connections of this process in batches, one
    transaction each, on `thread`.

    A join, a leave or a chat message waits on Postgres more than it runs
    Python: those that arrive while a batch is in the database go together in
    the next one, so a reconnect storm, or a busy room's chat, costs a few
    round trips per batch instead of several per connection or message.
    """

    def __init__(
        self,
        service: Callable[..., list[Outcome | Exception]],
        batch_done: Callable[[int], None],
        thread: ThreadPoolExecutor,
    ) -> None:
        self.service = service
        self.batch_done = batch_done
        self.thread = thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: list[tuple[Request, asyncio.Future[Outcome]]] = []
        self.running: asyncio.Task[None] | None = None

    async def run(self, request: Request) -> Outcome:
        """The service's outcome for `request`; raises the exception that refused it."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self.waiting, self.running = loop, [], None
        done = loop.create_future()
        self.waiting.append((request, done))
        if self.running is None or self.running.done():
            # In a context of its own: it must not carry the first caller's log fields.
            self.running = loop.create_task(self.run_batches(), context=contextvars.Context())
        return await done

    async def run_batches(self) -> None:
        service = database_sync_to_async(self.service, thread_sensitive=False, executor=self.thread)
        while self.waiting:
            batch, self.waiting = self.waiting[:BATCH_LIMIT], self.waiting[BATCH_LIMIT:]
            try:
                outcomes = await service(requests=[request for request, _ in batch])
            except Exception as error:
                outcomes = [error] * len(batch)
            self.batch_done(len(batch))
            for (_, done), outcome in zip(batch, outcomes):
                if done.done():  # its connection is gone
                    continue
                if isinstance(outcome, Exception):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)


join_batches: Batches[services.JoinRequest, services.JoinResult] = Batches(
    services.lobby_join_many, metrics.join_batch_done, ROSTER_THREAD
)
leave_batches: Batches[services.LeaveRequest, bool] = Batches(
    services.lobby_leave_many, metrics.leave_batch_done, ROSTER_THREAD
)
chat_batches: Batches[services.ChatRequest, ChatMessage] = Batches(
    services.chat_send_many, metrics.chat_batch_done, CHAT_THREAD
)


def connection_token(scope: dict[str, Any]) -> str:
    """The resume token from `?token=`, or else from the session cookie."""
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    if query.get("token"):
        return query["token"][0]
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            return parse_cookie(value.decode("latin1")).get(settings.VOICEBOT_TOKEN_COOKIE, "")
    return ""


def connection_password(scope: dict[str, Any]) -> str:
    """The lobby password from `?password=` (percent-encoded UTF-8), or ""."""
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    return query.get("password", [""])[0]


def relayed_text(text: str, data: dict[str, Any], sender: str) -> str:
    """The client's message as it arrived, with "from" added: the receiver gets
    exactly what was sent, and the server encodes nothing per message. The text
    is a JSON object that parsed, so it ends with "}"; a client's own "from"
    would be a duplicate key, so that (unusual) message is encoded afresh."""
    if "from" in data:
        return json.dumps({**data, "from": sender})
    return f'{text.rstrip()[:-1]}, "from": {json.dumps(sender)}}}'


def kicked_message(seconds: int) -> str:
    wait = f"{math.ceil(seconds / 60)} min" if seconds >= 60 else f"{seconds} s"
    return f"An administrator removed you from this lobby; you may join it again in {wait}."


class LobbyConsumer(AsyncWebsocketConsumer):
    """One participant's connection to one lobby.

    Signaling is relayed straight to the addressed peer's channel; the
    consumer keeps its own copy of the roster (peer id -> channel), filled from
    the join and kept current by the lobby's peer_joined/peer_left events, so
    relaying needs no database work.
    """

    lobby_name: str
    group: str
    # Set once the join has succeeded, cleared when the connection is replaced;
    # events and messages are ignored while it is None.
    peer_id: str | None = None
    name: str
    # Whether the open-connections gauge counts this connection.
    counted_open = False
    # time.time() when the message being handled arrived, for the relay latency.
    received_at = 0.0
    client_ip: str | None = None
    message_limits: ratelimit.MessageLimiter
    # Every chat message up to chat_floor, and those in chat_ids above it, reached the client.
    chat_floor = 0
    chat_ids: set[int]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as error:
            if hasattr(self, "channel_name"):
                raise
            # The channel layer could not give this connection a channel (Redis
            # is away): say so, as for any other refused join, not with an HTTP 500.
            logger.warning("Channel layer unavailable, refusing a join: %r", error)
            metrics.error_sent("unavailable")
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "text": json.dumps(error_frame("unavailable", UNAVAILABLE_MESSAGE))})
                await send({"type": "websocket.close", "code": CLOSE_UNAVAILABLE})

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every handler, a
        # thread hop per relayed message. Database work here only happens in
        # database_sync_to_async calls, which do that cleanup themselves.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        """Join the lobby, traced; the span names the lobby and the outcome, never the token."""
        lobby_name = self.scope["url_route"]["kwargs"]["lobby_name"]
        with tracer.start_as_current_span(
            "websocket.connect", kind=SpanKind.SERVER, attributes={"voicebot.lobby": lobby_name}
        ) as span:
            await self.join()
            outcome = "joined" if self.peer_id is not None else getattr(self, "refused_with", "closed")
            context = {f"voicebot.{name}": value for name, value in logcontext.current().items()}
            span.set_attributes({**context, "voicebot.outcome": outcome})
        logger.info("WebSocket connect to lobby %s: %s", lobby_name, outcome)

    async def join(self) -> None:
        # Accept first: a refused handshake is invisible to browsers, a close code is not.
        await self.accept()
        self.counted_open = True
        metrics.connection_opened()
        publisher.attach()
        presence.attach()
        await invalidation_listener.attach()
        self.peer_channels: dict[str, str] = {}
        # What the client was last told of each peer (name, mute, state).
        self.peers_told: dict[str, dict[str, Any]] = {}
        self.lobby_name = self.scope["url_route"]["kwargs"]["lobby_name"]
        # Bound after the process-wide tasks above have started, so they do not
        # inherit it. It lasts for the connection: channels runs all of a
        # consumer's handlers in one task, and database_sync_to_async copies it.
        logcontext.bind(**logcontext.connection_fields(self.scope), lobby=self.lobby_name)
        self.client_ip = ratelimit.client_ip(self.scope)
        # Counted before any database work, which is what a flood of connects costs.
        retry_after = await ratelimit.ahit(ratelimit.CONNECTS, ratelimit.client_key(self.scope))
        if retry_after is not None:
            message = f"{ratelimit.CONNECTS.refusal}; try again in {retry_after} s."
            await self.reject("rate_limited", message, CLOSE_RATE_LIMITED)
            return
        self.message_limits = ratelimit.MessageLimiter()
        if not re.match(LOBBY_NAME_PATTERN, self.lobby_name):
            await self.reject("bad_field", "Lobby names use letters, digits, '-' and '_' only.", CLOSE_BAD_LOBBY_NAME)
            return
        token = connection_token(self.scope)
        try:
            session = await asession_for_token(token)
        except DATABASE_UNAVAILABLE as error:
            # Not "unauthenticated": the token may well be good.
            logger.warning("Database unavailable, refusing a join: %s", error)
            await self.reject("unavailable", UNAVAILABLE_MESSAGE, CLOSE_UNAVAILABLE)
            return
        if session is None:
            await self.reject("unauthenticated", "No valid session; create one first.", CLOSE_UNAUTHENTICATED)
            if token:  # a token that names no session, not merely none
                await database_sync_to_async(audit_record)(
                    action="token_rejected", ip=self.client_ip, lobby=self.lobby_name
                )
            return
        logcontext.bind(session_id=session.id)

        self.group = services.lobby_group(self.lobby_name)
        # Join the group before the roster is read, so no join in between is missed.
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception as error:
            logger.warning("Channel layer unavailable, refusing a join: %r", error)
            await self.refuse("unavailable", UNAVAILABLE_MESSAGE, CLOSE_UNAVAILABLE)
            return
        try:
            joined = await join_batches.run(
                services.JoinRequest(
                    lobby_name=self.lobby_name,
                    session=session,
                    channel_name=self.channel_name,
                    password=connection_password(self.scope),
                )
            )
        except services.LobbyFull:
            await self.refuse("lobby_full", "This lobby is full.", CLOSE_LOBBY_FULL)
            return
        except services.BadPassword:
            # Worded the same whether or not the lobby exists.
            await self.refuse("bad_password", "The password is missing or wrong.", CLOSE_BAD_PASSWORD)
            # Pages try without a password before they ask for one: only a wrong one is recorded.
            if connection_password(self.scope):
                await database_sync_to_async(audit_record)(
                    action="lobby_password_failed",
                    session_id=session.id,
                    actor=session.name,
                    ip=self.client_ip,
                    lobby=self.lobby_name,
                )
            return
        except services.LobbyClosed:
            await self.refuse("lobby_closed", LOBBY_CLOSED_MESSAGE, CLOSE_LOBBY_CLOSED)
            return
        except services.SessionKicked as kicked:
            await self.refuse("kicked", kicked_message(kicked.seconds_left), CLOSE_KICKED)
            return
        except DATABASE_UNAVAILABLE as error:
            logger.warning("Database unavailable, refusing a join: %s", error)
            await self.refuse("unavailable", UNAVAILABLE_MESSAGE, CLOSE_UNAVAILABLE)
            return
        except BaseException:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            raise

        # The others hear of this join before this client hears its welcome, so
        # they know the newcomer when its first offer reaches them (the offer
        # goes to a peer's own channel, the news through the lobby's group).
        await publisher.flush()
        self.peer_id = joined.peer["peer_id"]
        self.name = session.name
        presence.add(self.channel_name, joined.membership_id)
        self.peer_channels = {peer["peer_id"]: channel for peer, channel in joined.peers}
        self.peers_told = {peer["peer_id"]: peer for peer, _ in joined.peers}
        self.chat_floor, self.chat_ids = joined.last_chat_id or 0, set()
        await self.send_frame(
            {
                "type": "welcome",
                "peer_id": self.peer_id,
                "name": self.name,
                # Kept across a resume, and possibly set by an administrator meanwhile.
                "muted": joined.peer["muted"],
                "lobby": {"name": joined.lobby.name, "max_participants": joined.lobby.max_participants},
                "peers": [peer for peer, _ in joined.peers],
                "ice_servers": settings.VOICEBOT_ICE_SERVERS,
                # Where the chat is: a resuming client asks chat_history for what came after its last id.
                "last_chat_id": joined.last_chat_id,
            }
        )

    async def refuse(self, code: str, message: str, close_code: int) -> None:
        """Turn away a connection that joined the lobby's group but got no place."""
        await self.channel_layer.group_discard(self.group, self.channel_name)
        await self.reject(code, message, close_code)

    async def reject(self, code: str, message: str, close_code: int) -> None:
        self.refused_with = code  # the connect span's outcome
        metrics.error_sent(code)
        await self.send_frame(error_frame(code, message))
        await self.close(code=close_code)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        # As in dispatch(): Channels would close stale database connections
        # here, a thread hop per closing connection (7% of a reconnect storm's
        # CPU); the database work of a disconnect cleans up itself. This
        # consumer joins its lobby's group itself, so `groups` is empty.
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def disconnect(self, close_code: int) -> None:
        if self.counted_open:
            self.counted_open = False
            metrics.connection_closed(close_code)
        logger.info("WebSocket closed with code %s", close_code)
        presence.discard(self.channel_name)
        if self.peer_id is None:
            return
        await self.channel_layer.group_discard(self.group, self.channel_name)
        # 1000 is a deliberate leave; anything else is a drop, and the place is
        # kept for the session to resume.
        try:
            await leave_batches.run(
                services.LeaveRequest(
                    lobby_name=self.lobby_name,
                    session_id=self.peer_id,
                    channel_name=self.channel_name,
                    deliberate=close_code == 1000,
                )
            )
        except DATABASE_UNAVAILABLE as error:
            # Its row is no longer refreshed: once the database is back, the
            # presence beat marks it reconnecting and ends it after the grace period.
            logger.warning("Database unavailable, could not record a leave: %s", error)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.peer_id is None:
            return
        self.received_at = time.time()
        message_type = None  # until the message parses
        try:
            data, message = parse_client_message(text_data, bytes_data)
            message_type = data["type"]
            if not self.message_limits.allow(message_type):
                await self.rate_limited()
                return
            metrics.message_received(message_type, len(text_data))
            await self.handle(text_data, data, message)
        except DATABASE_UNAVAILABLE as error:
            logger.warning("Database unavailable, refusing a %s message: %s", message_type, error)
            metrics.error_sent("unavailable")
            await self.send_frame(error_frame("unavailable", UNAVAILABLE_MESSAGE))
        except ProtocolError as error:
            # A message that does not parse spends the budget of "other" messages.
            if message_type is None and not self.message_limits.allow(None):
                await self.rate_limited()
                return
            metrics.error_sent(error.code)
            await self.send_frame(error.frame())

    async def rate_limited(self) -> None:
        """Drop a message over its budget; end the stay of a connection that keeps at it."""
        if not self.message_limits.refuse():
            metrics.error_sent("rate_limited")
            await self.send_frame(error_frame("rate_limited", "Too many messages; this one was dropped."))
            return
        await database_sync_to_async(audit_record)(
            action="rate_limit_close", session_id=self.peer_id, actor=self.name, ip=self.client_ip, lobby=self.lobby_name
        )
        # As on a kick, the others see it leave at once.
        await leave_batches.run(
            services.LeaveRequest(
                lobby_name=self.lobby_name, session_id=self.peer_id, channel_name=self.channel_name, deliberate=True
            )
        )
        await self.end_with_error("rate_limited", "Too many messages over the rate limits; closing.", CLOSE_FLOODING)

    async def handle(self, text: str, data: dict[str, Any], message: Any) -> None:
        if data["type"] in SIGNALING_TYPES:
            channel = self.peer_channels.get(message.to)
            if channel is None:
                raise ProtocolError("unknown_peer", "That peer is not in this lobby.")
            event = {
                "type": "lobby.deliver",
                "kind": data["type"],
                "text": relayed_text(text, data, self.peer_id),
                "from": self.peer_id,
                "channel": self.channel_name,
                "received_at": self.received_at,
            }
            await self.relay("send", self.channel_layer.send(channel, event))
        elif isinstance(message, Chat):
            if "\x00" in message.text:
                # Postgres cannot store it, and every backend must refuse the same messages.
                raise ProtocolError("bad_field", "The field 'text' holds a NUL character (U+0000), which chat cannot store.")
            # Stored first: everyone, the sender too, receives it from the service once it is.
            try:
                await chat_batches.run(
                    services.ChatRequest(
                        lobby_name=self.lobby_name,
                        session_id=self.peer_id,
                        channel_name=self.channel_name,
                        text=message.text,
                        received_at=self.received_at,
                    )
                )
            except services.NotInLobby:
                raise ProtocolError("not_in_lobby", NOT_IN_LOBBY_MESSAGE)
            except Exception:
                logger.exception("Could not store a chat message in lobby %s", self.lobby_name)
                raise ProtocolError("chat_failed", "Your message could not be stored, so no one got it; send it again.")
        elif isinstance(message, ChatHistory):
            try:
                page = await database_sync_to_async(member_chat_history)(
                    lobby_name=self.lobby_name,
                    session_id=self.peer_id,
                    channel_name=self.channel_name,
                    after=message.after,
                    limit=CHAT_HISTORY_LIMIT,
                )
            except Exception:
                logger.exception("Could not read the chat history of lobby %s", self.lobby_name)
                raise ProtocolError("chat_history_failed", "The chat history could not be read; ask again.")
            if page is None:
                raise ProtocolError("not_in_lobby", NOT_IN_LOBBY_MESSAGE)
            messages, more = page
            await self.send_frame({"type": "chat_history", "messages": messages, "more": more})
        elif isinstance(message, Mute):
            await database_sync_to_async(services.membership_set_muted)(
                lobby_name=self.lobby_name,
                session_id=self.peer_id,
                channel_name=self.channel_name,
                muted=message.muted,
            )
        elif isinstance(message, Ping):
            await self.send_frame({"type": "pong"})

    async def relay(self, operation: str, sending: Awaitable[None]) -> None:
        """Hand a message to the channel layer; a failure concerns this message only."""
        started = time.perf_counter()
        try:
            await sending
        except ChannelFull:
            metrics.layer_failed(operation, "full")
            raise ProtocolError("delivery_failed", "That peer cannot receive messages right now.")
        except Exception:
            metrics.layer_failed(operation, "error")
            logger.exception("Channel layer send failed in lobby %s", self.lobby_name)
            raise ProtocolError("delivery_failed", "The message could not be delivered; try again.")
        metrics.layer_sent(operation, time.perf_counter() - started)

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame))

    # Channel-layer events, published by lobbies.services or relayed by peers.

    async def lobby_deliver(self, event: dict[str, Any]) -> None:
        """A relayed message: signaling as text, ready to send; chat and the
        server's own frames as a dict."""
        if self.peer_id is None:
            return
        if "text" in event:
            # Signaling from a peer can overtake the news that it joined (the
            # one goes straight from its connection, the other through the
            # lobby's group), and come from a connection it resumed on: its
            # channel is taken from here too, so the reply is routed.
            self.peer_channels[event["from"]] = event["channel"]
            metrics.message_delivered(event["kind"], event.get("received_at"))
            await self.send(text_data=event["text"])
        else:
            frame = event["frame"]
            if frame["type"] == "chat" and not self.chat_unseen(frame["id"]):
                return  # already sent by a catch-up after a Redis outage
            metrics.message_delivered(frame["type"], event.get("received_at"))
            await self.send_frame(frame)

    def chat_unseen(self, chat_id: int) -> bool:
        """Whether the chat message is new to the client; it counts as seen from now on."""
        if chat_id <= self.chat_floor or chat_id in self.chat_ids:
            return False
        self.chat_ids.add(chat_id)
        if len(self.chat_ids) > CHAT_IDS_REMEMBERED:
            self.chat_floor = min(self.chat_ids)
            self.chat_ids.remove(self.chat_floor)
        return True

    async def layer_resubscribed(self, event: dict[str, Any]) -> None:
        """Back from a Redis outage, during which what other processes sent
        never reached this one: bring the client's roster and chat up to date
        from the database. Failing that, the client can still ask chat_history."""
        if self.peer_id is None:
            return
        try:
            await self.catch_up_roster()
            await self.catch_up_chat()
        except Exception:
            logger.exception("Could not catch up after a Redis outage in lobby %s", self.lobby_name)

    async def catch_up_roster(self) -> None:
        """Tells the client of those who left or joined meanwhile, and of those
        now on another connection, as the events it missed would have."""
        roster = await database_sync_to_async(member_roster)(
            lobby_name=self.lobby_name, session_id=self.peer_id, channel_name=self.channel_name
        )
        if roster is None or self.peer_id is None:
            return
        present = {entry["peer"]["peer_id"]: entry for entry in roster if entry["peer"]["peer_id"] != self.peer_id}
        for peer_id in [peer_id for peer_id in self.peer_channels if peer_id not in present]:
            del self.peer_channels[peer_id]
            self.peers_told.pop(peer_id, None)
            await self.send_frame({"type": "peer_left", "peer_id": peer_id})
        for peer_id, entry in present.items():
            known = self.peer_channels.get(peer_id)
            self.peer_channels[peer_id] = entry["channel"]
            if known is None:
                await self.send_frame({"type": "peer_joined", "peer": entry["peer"]})
            elif known != entry["channel"] or self.peers_told.get(peer_id) != entry["peer"]:
                await self.send_frame({"type": "peer_updated", "peer": entry["peer"]})
            self.peers_told[peer_id] = entry["peer"]

    async def catch_up_chat(self) -> None:
        """Sends the stored chat messages the client lacks, as the `chat` frames they were."""
        after = self.chat_floor
        while True:
            page = await database_sync_to_async(member_chat_history)(
                lobby_name=self.lobby_name,
                session_id=self.peer_id,
                channel_name=self.channel_name,
                after=after,
                limit=CHAT_HISTORY_LIMIT,
            )
            if page is None or self.peer_id is None:
                return
            messages, more = page
            for frame in messages:
                if self.chat_unseen(frame["id"]):
                    await self.send_frame(frame)
            if not more or not messages:
                return
            after = messages[-1]["id"]

    async def lobby_peer_joined(self, event: dict[str, Any]) -> None:
        peer_id = event["peer"]["peer_id"]
        if self.peer_id in (None, peer_id) or self.peer_channels.get(peer_id) == event["channel"]:
            return
        if peer_id in self.peer_channels:
            # Its old connection's peer_left never came (its server stopped):
            # tell the client, so it drops the dead peer connection first.
            await self.send_frame({"type": "peer_left", "peer_id": peer_id})
        self.peer_channels[peer_id] = event["channel"]
        self.peers_told[peer_id] = event["peer"]
        await self.send_frame({"type": "peer_joined", "peer": event["peer"]})

    async def lobby_peer_left(self, event: dict[str, Any]) -> None:
        peer_id = event["peer_id"]
        if self.peer_id is None or self.peer_channels.get(peer_id) != event["channel"]:
            return
        del self.peer_channels[peer_id]
        self.peers_told.pop(peer_id, None)
        await self.send_frame({"type": "peer_left", "peer_id": peer_id})

    async def lobby_peer_updated(self, event: dict[str, Any]) -> None:
        if self.peer_id is None:
            return
        peer_id = event["peer"]["peer_id"]
        if peer_id == self.peer_id:
            # Our own resume is told by the welcome; other news of us (mute) is passed on.
            if "channel" in event or event["peer"]["state"] != "connected":
                return
        else:
            if "channel" in event:
                # The peer resumed on a new connection.
                self.peer_channels[peer_id] = event["channel"]
            self.peers_told[peer_id] = event["peer"]
        await self.send_frame({"type": "peer_updated", "peer": event["peer"]})

    async def lobby_replaced(self, event: dict[str, Any]) -> None:
        await self.end_with_error("replaced", "You joined this lobby from another connection.", CLOSE_REPLACED)

    async def lobby_closed(self, event: dict[str, Any]) -> None:
        await self.end_with_error("lobby_closed", LOBBY_CLOSED_MESSAGE, CLOSE_LOBBY_CLOSED)

    async def lobby_kicked(self, event: dict[str, Any]) -> None:
        await self.end_with_error("kicked", kicked_message(event["seconds"]), CLOSE_KICKED)

    async def end_with_error(self, code: str, message: str, close_code: int) -> None:
        """This connection's place is gone (the service already ended or moved
        it): say why and close, without leaving the lobby a second time."""
        if self.peer_id is None:
            return
        presence.discard(self.channel_name)
        self.peer_id = None
        await self.refuse(code, message, close_code)
