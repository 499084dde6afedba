"""The channel layer for Redis: channels-redis's pub/sub layer, delivering to
connections of this very process without a round trip through Redis.

A message to a channel of this process goes straight into that channel's
queue. A group message goes straight into the queues of the group's members
in this process, and out through Redis to the other processes; when Redis
brings it back here too, it is dropped, known by this layer's origin mark.
So peers on one process relay signaling with no Redis round trip and keep
doing so while Redis is away, and every connection receives what this
process sends it in the order it was sent: the news that a peer joined
before that peer's first offer, whichever way each went.

Each process subscribes to one Redis channel for all its connections, its
inbox: a connection's channel is named after the inbox, and a message for it
from another process goes to the inbox with the channel it is for, where
this process puts it in that channel's queue. channels-redis subscribes to a
Redis channel per connection: a SUBSCRIBE for each connect, an UNSUBSCRIBE
for each close, and a subscription in Redis for each connection.

Everything this process publishes to Redis, relays and group messages alike,
goes out in the order it was made, through one pipeline per round trip (see
Outbox): channels-redis sends each PUBLISH alone, holding a lock for its round
trip, which new connections' SUBSCRIBEs then wait behind.

Locally delivered messages are shallow copies of what was sent: consumers
must not change the nested values of the events they receive (none do).

While Redis is away, sending to other processes fails (the caller gets the
error; local deliveries of a group message have happened by then) and this
process hears nothing from them. redis-py reconnects the subscriber connection
and subscribes it again by itself once Redis is back; then every member of a
group here gets a RESUBSCRIBED event, so it can fetch what it may have missed
(the lobby consumer: roster changes and stored chat; the cache: its
invalidations). Joins, whose new_channel() fails meanwhile, are refused.
"""

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisSingleShardConnection

from voicebot.queues import OneReaderQueue

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The key that carries a group message's origin through Redis.
ORIGIN_KEY = "__origin"
# The key that carries, through a process's inbox, the channel a message is for.
TO_KEY = "__to"
# Ends the inbox's part of a channel name: "<inbox>!<connection>".
INBOX_END = "!"
# What deserialize() makes of a group message this layer sent itself.
SENT_FROM_HERE = object()
# How long a Redis command may take before it counts as failed. Redis that
# accepts connections but answers nothing (paused, swapping) would otherwise
# hold a relay, a join or the publisher's queue, which lobby events of every
# connection of the process wait behind, until it answers again.
REDIS_TIMEOUT_SECONDS = 2.0
# Delivered to every group member of this process once the connection to
# Redis is back after it broke: messages from other processes may be missing.
RESUBSCRIBED = "layer.resubscribed"


async def in_time(operation: Awaitable[T]) -> T:
    """The operation's result; TimeoutError once it took REDIS_TIMEOUT_SECONDS.
    (asyncio.timeout, not wait_for, which would start a task per message.)"""
    async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
        return await operation


class Outbox:
    """The PUBLISHes of this process to one Redis shard, sent in the order they
    were made: those made while a pipeline is under way go together in the next.
    A reconnect storm publishes thousands of lobby events: one round trip each,
    behind one lock, timed out the SUBSCRIBEs of the joins waiting behind them."""

    def __init__(self, shard: RedisSingleShardConnection) -> None:
        self.shard = shard
        self.pending: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self.sender: asyncio.Task[None] | None = None

    def publish(self, name: str, data: bytes) -> asyncio.Future[None]:
        """Queue the PUBLISH at once; the future is done once Redis took it."""
        loop = asyncio.get_running_loop()
        published = loop.create_future()
        self.pending.append((name, data, published))
        if self.sender is None or self.sender.done():
            # In a context of its own: it must not carry the first sender's log fields.
            self.sender = loop.create_task(self.send_pending(), context=contextvars.Context())
        return published

    async def send_pending(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            self.shard._ensure_redis()
            pipeline = self.shard._redis.pipeline(transaction=False)
            for name, data, _ in batch:
                pipeline.publish(name, data)
            try:
                await in_time(pipeline.execute())
            except Exception as error:
                outcome: Exception | None = error
            else:
                outcome = None
            for _, _, published in batch:
                if published.done():  # its sender stopped waiting
                    continue
                if outcome is None:
                    published.set_result(None)
                else:
                    published.set_exception(outcome)


class Inbox:
    """Stands in the loop layer's channels for the process's inbox: channels-redis
    hands it what Redis brings for the inbox, and it queues each message for
    the channel it is for (dropped if that connection is gone)."""

    def __init__(self, layer: "LocalFirstChannelLayer", channels: dict[str, Any]) -> None:
        self.layer = layer
        self.channels = channels

    def put_nowait(self, data: bytes) -> None:
        message = self.layer.deserialize(data)
        queue = self.channels.get(message.pop(TO_KEY, None))
        if queue is not None:
            queue.put_nowait(message)


class LocalFirstChannelLayer(RedisPubSubChannelLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin = uuid.uuid4().hex
        self.outboxes: dict[RedisSingleShardConnection, Outbox] = {}
        # The inbox's channel name in Redis, by event loop (see new_channel).
        self.inboxes: dict[asyncio.AbstractEventLoop, str] = {}

    def publish(self, name: str, message: dict[str, Any]) -> asyncio.Future[None]:
        """PUBLISH through the shard's Outbox; queued before this returns, so
        calls made one after another reach Redis in that order."""
        shard = self._get_layer()._get_shard(name)
        outbox = self.outboxes.get(shard)
        if outbox is None:
            outbox = self.outboxes[shard] = Outbox(shard)
        return outbox.publish(name, self.serialize(message))

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        layer = self._get_layer()
        queue = layer.channels.get(channel)
        if queue is not None:
            queue.put_nowait(dict(message))
            return
        await in_time(self.publish_to_channel(channel, message))

    def publish_to_channel(self, channel: str, message: dict[str, Any]) -> asyncio.Future[None]:
        """PUBLISH for one channel: to its process's inbox if it has one."""
        inbox, end, _ = channel.partition(INBOX_END)
        if not end:
            return self.publish(channel, message)
        return self.publish(inbox + end, {**message, TO_KEY: channel})

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A channel of this process's inbox (subscribed to on the first call).
        Every connection has one: a plain dict-backed queue, where an
        asyncio.Queue is about 3.2 KiB. Nothing can have been sent to the
        channel yet, as nobody knows its name."""
        layer = self._get_layer()
        loop = asyncio.get_running_loop()
        inbox = self.inboxes.get(loop)
        if inbox is None:
            inbox = f"{layer.prefix}{prefix}{uuid.uuid4().hex}{INBOX_END}"
            await in_time(layer._subscribe_to_channel(inbox))
            layer.channels[inbox] = Inbox(self, layer.channels)
            self.inboxes[loop] = inbox
            self.watch_reconnects()
        channel = f"{inbox}{uuid.uuid4().hex}"
        layer.channels[channel] = OneReaderQueue()
        return channel

    async def group_add(self, group: str, channel: str) -> None:
        layer = self._get_layer()
        name = layer._get_group_channel_name(group)
        if name in layer._get_shard(name)._subscribed_to:
            # Subscribed already: channels-redis would take the shard's lock just to find that out.
            layer.groups.setdefault(name, set()).add(channel)
            return
        await in_time(layer.group_add(group, channel))
        self.watch_reconnects()

    async def group_discard(self, group: str, channel: str) -> None:
        """Leaves the group here even when Redis cannot be told: a connection
        closing during an outage must still get to end its stay. The Redis
        subscription, if it was the group's last member, stays until the
        process stops; messages for a group with no member here are dropped."""
        try:
            await in_time(self._get_layer().group_discard(group, channel))
        except Exception as error:
            logger.warning("Could not unsubscribe from group %s in Redis: %s", group, error)

    async def flush(self) -> None:
        self.inboxes.pop(asyncio.get_running_loop(), None)
        await self._get_layer().flush()

    def watch_reconnects(self) -> None:
        """Hears, from redis-py, each time the subscriber connection comes back.
        It calls back after its own callback has subscribed again (registered
        first); registering the same method twice keeps one."""
        for shard in self._get_layer()._shards:
            if shard._pubsub is not None and shard._pubsub.connection is not None:
                shard._pubsub.connection.register_connect_callback(self.resubscribed)

    def resubscribed(self, connection: Any) -> None:
        layer = self._get_layer()
        members = set().union(*layer.groups.values())
        logger.warning("Reconnected to Redis; telling %d group members they may have missed messages", len(members))
        for channel in members:
            queue = layer.channels.get(channel)
            if queue is not None:
                queue.put_nowait({"type": RESUBSCRIBED})

    async def send_through_redis(self, channel: str, message: dict[str, Any]) -> None:
        """send(), but out to Redis and back even for a channel of this process:
        the readiness check's round trip."""
        await in_time(self.publish_to_channel(channel, message))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        layer = self._get_layer()
        for channel in layer.groups.get(layer._get_group_channel_name(group), ()):
            queue = layer.channels.get(channel)
            if queue is not None:
                queue.put_nowait(dict(message))
        await in_time(self.publish(layer._get_group_channel_name(group), {**message, ORIGIN_KEY: self.origin}))

    async def receive(self, channel: str) -> dict[str, Any]:
        while True:
            message = await self._get_layer().receive(channel)
            if message is not SENT_FROM_HERE:
                return message

    def deserialize(self, message: bytes | dict[str, Any]) -> Any:
        # What was queued locally was never serialized.
        if isinstance(message, dict):
            return message
        decoded = super().deserialize(message)
        if decoded.pop(ORIGIN_KEY, None) == self.origin:
            return SENT_FROM_HERE
        return decoded
