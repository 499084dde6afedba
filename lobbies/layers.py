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

Locally delivered messages are shallow copies of what was sent: consumers
must not change the nested values of the events they receive (none do).
"""

import uuid
from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer

# The key that carries a group message's origin through Redis.
ORIGIN_KEY = "__origin"
# What deserialize() makes of a group message this layer sent itself.
SENT_FROM_HERE = object()


class LocalFirstChannelLayer(RedisPubSubChannelLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin = uuid.uuid4().hex

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        layer = self._get_layer()
        queue = layer.channels.get(channel)
        if queue is not None:
            queue.put_nowait(dict(message))
            return
        await layer.send(channel, message)

    async def send_through_redis(self, channel: str, message: dict[str, Any]) -> None:
        """send(), but out to Redis and back even for a channel of this process:
        the readiness check's round trip."""
        await self._get_layer().send(channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        layer = self._get_layer()
        for channel in layer.groups.get(layer._get_group_channel_name(group), ()):
            queue = layer.channels.get(channel)
            if queue is not None:
                queue.put_nowait(dict(message))
        await layer.group_send(group, {**message, ORIGIN_KEY: self.origin})

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
