"""The reference relay: a lobby relay written the obvious way, to measure the
project against in the same run on the same machine.

An AsyncJsonWebsocketConsumer that group_sends every message through
channels-redis's RedisChannelLayer (the core layer, default settings), each
receiver picking out what is addressed to it. It speaks just enough of the
lobby protocol for the load generator: a welcome with the connection's
peer_id, then every frame relayed with "from" added (chat to everyone,
anything with a "to" to that peer only). No sessions, no database.

Run by the load test as `daphne lobbies.loadtest.reference:application`,
with REDIS_URL set.
"""

import os
import uuid
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "voicebot.settings")
django.setup()

from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import re_path  # noqa: E402

settings.CHANNEL_LAYERS["reference"] = {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    "CONFIG": {"hosts": [settings.REDIS_URL], "prefix": "loadtest-reference"},
}


class ReferenceRelay(AsyncJsonWebsocketConsumer):
    channel_layer_alias = "reference"

    async def connect(self) -> None:
        self.peer_id = uuid.uuid4().hex
        self.room = "room-" + self.scope["url_route"]["kwargs"]["lobby_name"]
        await self.channel_layer.group_add(self.room, self.channel_name)
        await self.accept()
        await self.send_json({"type": "welcome", "peer_id": self.peer_id, "peers": []})

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.room, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict):
            content["from"] = self.peer_id
            await self.channel_layer.group_send(self.room, {"type": "relay", "frame": content})

    async def relay(self, event: dict[str, Any]) -> None:
        frame = event["frame"]
        if frame["from"] != self.peer_id and frame.get("to", self.peer_id) == self.peer_id:
            await self.send_json(frame)


application = ProtocolTypeRouter(
    {"websocket": URLRouter([re_path(r"^ws/lobby/(?P<lobby_name>[^/]+)/$", ReferenceRelay.as_asgi())])}
)
