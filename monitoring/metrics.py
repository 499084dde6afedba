"""GET /metrics: this process's metrics in the Prometheus text format.

Each server process serves its own metrics (one scrape target per process,
see docs/metrics.md). Besides the counters updated as things happen
(django-prometheus, lobbies/metrics.py, bots/metrics.py) a few values are
read when Prometheus scrapes: lobby occupancy from the database, cache
counts from lobbies.cache.stats and the database pools' statistics.

The endpoint is open unless METRICS_BEARER_TOKEN or METRICS_ALLOWED_NETWORKS
is set; then a request needs the token (401 otherwise) and/or must come from
one of the networks (403 otherwise).
"""

import hmac
import ipaddress
import logging
import threading
from collections.abc import Iterator

import prometheus_client
from django.conf import settings
from django.db import connections
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import bots.metrics  # noqa: F401  registers the bot metrics, so every process exports them
from lobbies import cache
from lobbies.models import Membership

logger = logging.getLogger(__name__)

# Participants per lobby: lobbies hold at most LOBBY_MAX_PARTICIPANTS_LIMIT (50 by default).
PARTICIPANT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 50)


# --- access -------------------------------------------------------------------


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(network, strict=False) for network in settings.METRICS_ALLOWED_NETWORKS]


def from_allowed_network(request: HttpRequest) -> bool:
    networks = allowed_networks()
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in networks)


def has_token(request: HttpRequest) -> bool:
    expected = settings.METRICS_BEARER_TOKEN
    if not expected:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant-time, so the token cannot be guessed byte by byte from timings.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


# --- values read at scrape time -------------------------------------------------


class LobbyCollector(Collector):
    """Sessions and lobbies with someone in them, and participants per lobby,
    from the database (all processes together: every target reports the
    same numbers, so aggregate them with max, not sum)."""

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry calls collect() on registration, a database query.
        yield GaugeMetricFamily("voicebot_sessions_active", "")
        yield GaugeMetricFamily("voicebot_lobbies_active", "")
        yield HistogramMetricFamily("voicebot_lobby_participants", "")

    def collect(self) -> Iterator[Metric]:
        try:
            per_lobby = list(
                Membership.objects.filter(left_at__isnull=True)
                .values("lobby_id")
                .annotate(participants=Count("id"))
                .values_list("participants", flat=True)
            )
            sessions = Membership.objects.filter(left_at__isnull=True).values("session_id").distinct().count()
        except Exception:
            # A database outage shows on /readyz; the scrape itself still answers.
            logger.warning("Could not read lobby occupancy for /metrics", exc_info=True)
            return
        yield GaugeMetricFamily(
            "voicebot_sessions_active", "Sessions with a place in at least one lobby (all processes).", value=sessions
        )
        yield GaugeMetricFamily(
            "voicebot_lobbies_active", "Lobbies with at least one participant (all processes).", value=len(per_lobby)
        )
        yield participants_histogram(per_lobby)


def participants_histogram(per_lobby: list[int]) -> HistogramMetricFamily:
    buckets = [(str(float(bound)), sum(1 for count in per_lobby if count <= bound)) for bound in PARTICIPANT_BUCKETS]
    buckets.append(("+Inf", len(per_lobby)))
    return HistogramMetricFamily(
        "voicebot_lobby_participants",
        "Participants per active lobby, counted afresh at each scrape (all processes).",
        buckets=buckets,
        sum_value=sum(per_lobby),
    )


class CacheCollector(Collector):
    """lobbies.cache.stats: lookups of this process's shared (Redis) and local caches."""

    def collect(self) -> Iterator[Metric]:
        family = prometheus_client.core.CounterMetricFamily(
            "voicebot_cache_requests",
            "Cache lookups of this process by cache (shared, local) and outcome (hit, miss, error).",
            labels=["cache", "outcome"],
        )
        counts = dict(cache.stats)
        for name in ("shared", "local"):
            for outcome in ("hit", "miss", "error"):
                family.add_metric([name, outcome], counts.get((name, outcome), 0))
        yield family


class DatabasePoolCollector(Collector):
    """Django's psycopg pool per database alias (only aliases that use one)."""

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry would open the pools on registration.
        for name in ("connections", "connections_in_use", "requests_waiting", "max_connections"):
            yield GaugeMetricFamily(f"voicebot_db_pool_{name}", "", labels=["alias"])

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "voicebot_db_pool_connections", "Connections the pool holds, in use or idle.", labels=["alias"]
        )
        in_use = GaugeMetricFamily("voicebot_db_pool_connections_in_use", "Connections lent out.", labels=["alias"])
        waiting = GaugeMetricFamily(
            "voicebot_db_pool_requests_waiting", "Callers waiting for a connection.", labels=["alias"]
        )
        max_size = GaugeMetricFamily("voicebot_db_pool_max_connections", "The pool's max_size.", labels=["alias"])
        for alias in settings.DATABASES:
            stats = pool_stats(alias)
            if stats is None:
                continue
            size.add_metric([alias], stats.get("pool_size", 0))
            in_use.add_metric([alias], connections_in_use(stats))
            waiting.add_metric([alias], stats.get("requests_waiting", 0))
            max_size.add_metric([alias], stats.get("pool_max", 0))
        yield from (size, in_use, waiting, max_size)


def connections_in_use(stats: dict[str, int]) -> int:
    return stats.get("pool_size", 0) - stats.get("pool_available", 0)


def pool_stats(alias: str) -> dict[str, int] | None:
    if "pool" not in settings.DATABASES[alias].get("OPTIONS", {}):
        return None
    try:
        pool = connections[alias].pool
    except Exception:
        logger.warning("Could not reach the database pool of %s for /metrics", alias, exc_info=True)
        return None
    return pool.get_stats() if pool is not None else None


_registration = threading.Lock()
_registered = False


def register_collectors() -> None:
    """Registered on the first scrape of /metrics rather than on import: every
    management command imports the URLconf (system checks), and a runbots
    worker's own endpoint should not query lobby occupancy."""
    global _registered
    with _registration:
        if _registered:
            return
        for collector in (LobbyCollector(), CacheCollector(), DatabasePoolCollector()):
            prometheus_client.REGISTRY.register(collector)
        _registered = True


# --- the view ---------------------------------------------------------------------


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Synchronous on purpose: the collectors above query the database."""
    if not from_allowed_network(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    if not has_token(request):
        response = HttpResponse("Unauthorized\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    register_collectors()
    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    # Every name here is a classic one, so the body is text format 0.0.4, which
    # Prometheus 2 (Debian 12's 2.42 among them) understands; 1.0.0 is newer.
    return HttpResponse(body, content_type=prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4)
