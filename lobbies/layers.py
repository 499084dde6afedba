"""The channel layer for Redis: channels-redis's pub/sub layer, except that a
message to a channel of this very process goes straight into that channel's
queue instead of out to Redis and back.

A lobby's peers on one server process then relay signaling to each other with
no Redis round trip, no serialization and no wait for PUBLISH's reply; peers
on other processes are reached through Redis as before. Group sends (chat,
lobby events) still go through Redis, which delivers them to every process,
this one included, once.

Locally delivered messages are shallow copies of what was sent: consumers
must not change the nested values of the events they receive (none do).
"""

from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer


class LocalFirstChannelLayer(RedisPubSubChannelLayer):
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        layer = self._get_layer()
        queue = layer.channels.get(channel)
        if queue is not None:
            queue.put_nowait(dict(message))
            return
        await layer.send(channel, message)

    def deserialize(self, message: bytes | dict[str, Any]) -> dict[str, Any]:
        # What send() queued locally was never serialized.
        return message if isinstance(message, dict) else super().deserialize(message)
