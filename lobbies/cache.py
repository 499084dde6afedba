"""Caches in front of the database for what joins and lookups read.

Two layers:

- `shared`: Django's default cache, Redis when REDIS_URL is set (local memory
  otherwise). Holds what must be the same for every process, such as a
  lobby's roster; writers update it while they hold the lobby's row lock.
- `local`: a small in-process LRU with a TTL for data that rarely changes
  (session identities, lobby settings). A change is broadcast over the channel
  layer, so every process drops its copy at once; the TTL bounds the damage
  if a broadcast is missed.

A cache that fails (Redis down) counts an error, logs a warning now and then
and answers as a miss, so callers fall back to the database; it is tried again
on the next call and so recovers by itself.
"""

import asyncio
import logging
import pickle
import threading
import time
from collections import Counter
from typing import Any

import redis
from cachetools import TTLCache
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import caches

from lobbies.layers import RESUBSCRIBED

logger = logging.getLogger(__name__)

INVALIDATION_GROUP = "voicebot.cache-invalidation"
MISSING = object()

# (cache, outcome) -> count, outcome one of hit, miss, error. Read by monitoring.
stats: Counter[tuple[str, str]] = Counter()


class SharedCache:
    name = "shared"
    prefix = "voicebot:"

    def __init__(self) -> None:
        self.last_warning = 0.0
        self.redis: redis.Redis | None = None
        self.redis_location = ""

    def client(self) -> redis.Redis | None:
        """A long-lived redis-py client when the shared cache is Redis.

        Django's cache API builds a client for every call, which costs more
        than the round trip; joins read and write the cache on every call.
        """
        config = settings.CACHES["default"]
        if not config["BACKEND"].endswith(".RedisCache"):
            return None
        if self.redis is None or self.redis_location != config["LOCATION"]:
            self.redis = redis.Redis.from_url(config["LOCATION"], **config.get("OPTIONS", {}))
            self.redis_location = config["LOCATION"]
        return self.redis

    def get(self, key: str) -> Any:
        return self.get_many([key]).get(key, MISSING)

    def set(self, key: str, value: Any, timeout: float) -> None:
        self.set_many({key: value}, timeout)

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """The values of those of `keys` the cache holds, in one round trip."""
        if not settings.VOICEBOT_CACHE or not keys:
            return {}
        try:
            client = self.client()
            if client is None:
                values = caches["default"].get_many(keys)
            else:
                raws = client.mget([self.prefix + key for key in keys])
                values = {key: pickle.loads(raw) for key, raw in zip(keys, raws) if raw is not None}
        except Exception as error:
            self.failed("read", error)
            return {}
        stats[(self.name, "hit")] += len(values)
        stats[(self.name, "miss")] += len(keys) - len(values)
        return values

    def set_many(self, values: dict[str, Any], timeout: float) -> None:
        """Set every key of `values`, in one round trip."""
        if not settings.VOICEBOT_CACHE or not values:
            return
        try:
            client = self.client()
            if client is None:
                caches["default"].set_many(values, timeout)
            else:
                pipeline = client.pipeline(transaction=False)
                for key, value in values.items():
                    pipeline.set(self.prefix + key, pickle.dumps(value, pickle.HIGHEST_PROTOCOL), ex=int(timeout))
                pipeline.execute()
        except Exception as error:
            self.failed("write", error)

    def delete(self, key: str) -> None:
        if not settings.VOICEBOT_CACHE:
            return
        try:
            client = self.client()
            if client is None:
                caches["default"].delete(key)
            else:
                client.delete(self.prefix + key)
        except Exception as error:
            self.failed("delete", error)

    def failed(self, what: str, error: Exception) -> None:
        stats[(self.name, "error")] += 1
        now = time.monotonic()
        if now - self.last_warning > 10:
            self.last_warning = now
            logger.warning("Cache %s failed, using the database instead: %s", what, error)


class LocalCache:
    """Thread-safe: read from the event loop and from database worker threads."""

    name = "local"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: TTLCache | None = None

    def store(self) -> TTLCache:
        if self.entries is None:
            self.entries = TTLCache(maxsize=settings.LOCAL_CACHE_SIZE, ttl=settings.LOCAL_CACHE_TTL_SECONDS)
        return self.entries

    def get(self, key: str) -> Any:
        if not settings.VOICEBOT_CACHE:
            return MISSING
        with self.lock:
            value = self.store().get(key, MISSING)
        stats[(self.name, "miss" if value is MISSING else "hit")] += 1
        return value

    def set(self, key: str, value: Any) -> None:
        if settings.VOICEBOT_CACHE:
            with self.lock:
                self.store()[key] = value

    def forget(self, *keys: str) -> None:
        with self.lock:
            for key in keys:
                self.store().pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self.entries = None


shared = SharedCache()
local = LocalCache()


def invalidate_everywhere(*keys: str) -> None:
    """Drop `keys` from this process's local cache now, and from every other's."""
    from lobbies.publisher import publisher

    local.forget(*keys)
    publisher.publish(("group", INVALIDATION_GROUP, {"type": "cache.invalidate", "keys": list(keys)}))


class InvalidationListener:
    """Listens, on the server's loop, for keys other processes changed."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return
        self.loop = loop
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(INVALIDATION_GROUP, channel)
        loop.create_task(self.run(layer, channel))

    async def run(self, layer: Any, channel: str) -> None:
        while True:
            try:
                message = await layer.receive(channel)
            except Exception:
                # Redis away: copies may now be stale for up to their TTL.
                logger.exception("Cache invalidation listener failed; retrying")
                await asyncio.sleep(1)
                continue
            if message["type"] == RESUBSCRIBED:
                # Back from a Redis outage, during which invalidations were missed.
                local.clear()
            else:
                local.forget(*message["keys"])


invalidation_listener = InvalidationListener()
