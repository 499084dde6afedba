"""Rate limits: who may do how much, how often.

Two kinds, for two costs:

- Per WebSocket connection, on every message: token buckets held in the
  connection's own memory (MessageLimiter). Checking one is a few float
  operations, no I/O: it runs on the relay's hot path. Signaling, chat and
  everything else have budgets of their own, so a chat flood cannot starve
  the connection's signaling, and the defaults are far above what a real call
  sends (a browser joining a full room sends an offer or answer and dozens of
  ICE candidates to every peer within a second or so).
- Per client address (WebSocket connects, new sessions) and per session (new
  lobbies): a sliding-window counter per minute in Django's cache, so every
  server process counts against the same number (Redis when REDIS_URL is set;
  local memory, one process, on the embedded default). cache.add and
  cache.incr are atomic in both. The counter estimates the last minute as the
  current minute's count plus the previous minute's, weighted by how much of
  it still falls within the last 60 seconds; unlike fixed windows it lets no
  double burst through at a minute's turn.

django-ratelimit was considered: its decorator is for synchronous views only
(async support is an open issue), it cannot serve a Channels consumer, and it
sends no Retry-After; what is needed here is this small module.

Every limit is a setting (voicebot/settings.py, docs/configuration.md); 0
turns one off, and RATE_LIMITS=0 all of them (for load tests from one machine).
"""

import ipaddress
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import BaseCache, caches
from django.http import HttpRequest

from lobbies.protocol import SIGNALING_TYPES

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# --- client address ---------------------------------------------------------------


@lru_cache(maxsize=8)
def trusted_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def parse_address(value: str) -> IPAddress | None:
    """An address as proxies write it in X-Forwarded-For: bare, `v4:port` or `[v6]:port`."""
    value = value.strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    return getattr(address, "ipv4_mapped", None) or address


def client_ip(source: HttpRequest | Mapping[str, Any]) -> str | None:
    """The client's address for an HTTP request or a WebSocket's ASGI scope.

    The server reports the direct peer (uvicorn has already replaced it from
    X-Forwarded-For when the peer is in its --forwarded-allow-ips). If that
    peer is in VOICEBOT_TRUSTED_PROXIES, X-Forwarded-For is read from the
    right, each proxy having appended the address it saw: the first address
    that is not a trusted proxy is the client. Otherwise the header is the
    client's own say and is ignored. None when there is no peer address (a
    Unix socket, the test communicator).
    """
    if isinstance(source, HttpRequest):
        peer = source.META.get("REMOTE_ADDR") or ""
        forwarded = source.META.get("HTTP_X_FORWARDED_FOR", "")
    else:
        client = source.get("client")
        peer = client[0] if client else ""
        forwarded = ",".join(
            value.decode("latin1") for name, value in source.get("headers", []) if name == b"x-forwarded-for"
        )
    address = parse_address(peer)
    if address is None:
        return None
    networks = trusted_networks(tuple(settings.VOICEBOT_TRUSTED_PROXIES))
    if not any(address in network for network in networks):
        return str(address)
    for entry in reversed(forwarded.split(",")):
        hop = parse_address(entry)
        if hop is None:
            # Garbage written by the client, passed on by the proxy: the
            # proxy's own peer is the last address known to be real.
            break
        address = hop
        if not any(address in network for network in networks):
            break
    return str(address)


def address_key(address: str) -> str:
    """What a per-address limit counts: the address, or for IPv6 its /64, which
    one subscriber usually holds whole."""
    parsed = ipaddress.ip_address(address)
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def client_key(source: HttpRequest | Mapping[str, Any]) -> str | None:
    """What per-address limits count for this request or connection."""
    address = client_ip(source)
    return None if address is None else address_key(address)


# --- per-minute limits in the shared cache ----------------------------------------

WINDOW_SECONDS = 60
FAILURE_PAUSE_SECONDS = 5


@dataclass(frozen=True)
class Limit:
    """A per-minute limit; the setting is read on each use, so it may change in tests."""

    name: str
    setting: str
    # The error message, before "; try again in N s".
    refusal: str

    @property
    def per_minute(self) -> int:
        if not settings.RATE_LIMITS:
            return 0
        return getattr(settings, self.setting)


CONNECTS = Limit("connects", "RATE_LIMIT_CONNECTS_PER_MINUTE", "Too many connections from your address")
SESSIONS = Limit("sessions", "RATE_LIMIT_SESSIONS_PER_MINUTE", "Too many new sessions from your address")
LOBBIES = Limit("lobbies", "RATE_LIMIT_LOBBIES_PER_MINUTE", "Too many new lobbies from this session")


class Counters:
    """One cache backend for the whole process: Django's `caches["default"]`
    builds a backend, and with it a Redis connection pool, per thread and per
    async context, which a consumer would pay on every connect."""

    def __init__(self) -> None:
        self.config: dict[str, Any] | None = None
        self.backend: BaseCache | None = None
        self.last_warning = 0.0
        # After a failure the cache is left alone for a while, so that an
        # unreachable Redis does not add its timeout to every request.
        self.resume_at = 0.0

    def cache(self) -> BaseCache:
        config = settings.CACHES["default"]
        if self.backend is None or self.config is not config:
            self.backend = caches.create_connection("default")
            self.config = config
        return self.backend

    def count(self, key: str, previous_key: str) -> tuple[int, int]:
        """Adds one to the current window's count; returns it and the previous window's."""
        cache = self.cache()
        # Kept through the next window, which weighs it.
        cache.add(key, 0, timeout=2 * WINDOW_SECONDS + 5)
        try:
            current = cache.incr(key)
        except ValueError:
            # Evicted between the two calls (the local-memory cache culls when full).
            cache.add(key, 1, timeout=2 * WINDOW_SECONDS + 5)
            current = 1
        return current, cache.get(previous_key, 0)

    def available(self) -> bool:
        return time.monotonic() >= self.resume_at

    def failed(self, error: Exception) -> None:
        now = time.monotonic()
        self.resume_at = now + FAILURE_PAUSE_SECONDS
        if now - self.last_warning > 10:
            self.last_warning = now
            logger.warning("Rate limit counters unavailable, not limiting: %s", error)


counters = Counters()


def retry_after(limit: int, previous: int, current: int, elapsed: float) -> int:
    """Whole seconds until one more attempt would be allowed, if no other comes meanwhile."""
    room = limit - current - 1
    if room >= 0 and previous > 0:
        # Within this window, once enough of the previous one has slid out.
        wait = WINDOW_SECONDS * (1 - room / previous) - elapsed
    else:
        # In the next window, where this one's count is the weighed one.
        wait = (WINDOW_SECONDS - elapsed) + WINDOW_SECONDS * max(0.0, 1 - (limit - 1) / current)
    return max(1, math.ceil(wait))


def hit(limit: Limit, key: str | None, now: float | None = None) -> int | None:
    """Counts one attempt of `key` (an address or a session) against `limit`.

    Returns None when it is allowed, else the seconds to wait (Retry-After).
    Rejected attempts count too, so a client that keeps hammering stays out.
    A key of None (no address known) and a failing cache are not limited: a
    Redis outage must not lock everyone out.
    """
    if not counted(limit, key):
        return None
    per_minute = limit.per_minute
    now = time.time() if now is None else now
    window, elapsed = divmod(now, WINDOW_SECONDS)
    prefix = f"voicebot:ratelimit:{limit.name}:{key}:"
    try:
        current, previous = counters.count(f"{prefix}{int(window)}", f"{prefix}{int(window) - 1}")
    except Exception as error:
        counters.failed(error)
        return None
    estimate = previous * (1 - elapsed / WINDOW_SECONDS) + current
    if estimate <= per_minute:
        return None
    return retry_after(per_minute, previous, current, elapsed)


def counted(limit: Limit, key: str | None) -> bool:
    """Whether an attempt by `key` is counted against `limit` at all."""
    return bool(limit.per_minute) and key is not None and counters.available()


async def ahit(limit: Limit, key: str | None) -> int | None:
    """hit() for async code, in a worker thread: the cache's async methods are no
    use here, as BaseCache.aincr reads and then writes, which is not atomic.
    What is not counted costs no thread hop."""
    if not counted(limit, key):
        return None
    return await sync_to_async(hit, thread_sensitive=False)(limit, key)


# --- per-connection message budgets -----------------------------------------------


class TokenBucket:
    """`capacity` messages at once, refilled at `rate` a second."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.updated) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.updated = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


def bucket(burst_setting: str, rate_setting: str, now: float) -> TokenBucket | None:
    burst = getattr(settings, burst_setting)
    if not settings.RATE_LIMITS or not burst:
        return None
    return TokenBucket(burst, getattr(settings, rate_setting), now)


class MessageLimiter:
    """One connection's message budgets, and its count of refused messages.

    Settings are read when the connection opens.
    """

    __slots__ = ("signaling", "chat", "other", "close_after", "window", "refused", "refused_since")

    def __init__(self) -> None:
        now = time.monotonic()
        self.signaling = bucket("RATE_LIMIT_SIGNALING_BURST", "RATE_LIMIT_SIGNALING_PER_SECOND", now)
        self.chat = bucket("RATE_LIMIT_CHAT_BURST", "RATE_LIMIT_CHAT_PER_SECOND", now)
        self.other = bucket("RATE_LIMIT_OTHER_BURST", "RATE_LIMIT_OTHER_PER_SECOND", now)
        self.close_after = settings.RATE_LIMIT_CLOSE_AFTER if settings.RATE_LIMITS else 0
        self.window = settings.RATE_LIMIT_CLOSE_WINDOW_SECONDS
        self.refused = 0
        self.refused_since = 0.0

    def allow(self, message_type: Any) -> bool:
        """Whether a message of this type (any value, for a malformed message) is within budget."""
        if message_type in SIGNALING_TYPES:
            budget = self.signaling
        elif message_type == "chat":
            budget = self.chat
        else:
            budget = self.other
        return budget is None or budget.take(time.monotonic())

    def refuse(self) -> bool:
        """Counts a refused message; True exactly once, when RATE_LIMIT_CLOSE_AFTER of
        them came within RATE_LIMIT_CLOSE_WINDOW_SECONDS of the first."""
        now = time.monotonic()
        if now - self.refused_since > self.window:
            self.refused = 0
            self.refused_since = now
        self.refused += 1
        return self.refused == self.close_after

