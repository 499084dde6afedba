"""Samples of a process's numbers, where they are kept, and how they add up.

A sample is a plain dict: counts are increases over the interval, gauges are
values at its end, histograms are per-bucket increases (cumulative, as in
Prometheus) with their upper bounds, so samples of several processes and
intervals can be merged before a percentile is taken:

    {"t": 1764212000.0, "process": "host:123", "role": "server", "seconds": 5.0,
     "http_requests": 12, "http_errors": 0, "http_latency": {"le": [...], "n": [...]},
     "websocket_connections": 3, "signaling_received": 40, "signaling_errors": 0,
     "relay_latency": {...}, "cache_hits": 10, "cache_misses": 2,
     "db_pool_in_use": 1, "db_pool_size": 4, "bot_first_audio": {...},
     "cpu_seconds": 0.3, "memory_bytes": 123456789, "ready": true}
"""

import datetime
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from functools import cache

import redis
from django.conf import settings
from django.utils import timezone

from monitoring.models import Sample

Histogram = dict[str, list[float]]

COUNTS = (
    "http_requests",
    "http_errors",
    "signaling_received",
    "signaling_errors",
    "cache_hits",
    "cache_misses",
    "cpu_seconds",
)
GAUGES = ("websocket_connections", "db_pool_in_use", "db_pool_size", "memory_bytes")
HISTOGRAMS = ("http_latency", "relay_latency", "bot_first_audio")
# What aggregate() returns: the dashboard's series (models.METRICS, plus the pool size).
SERIES = (
    "http_requests_per_second",
    "http_latency_p95_ms",
    "http_error_rate_percent",
    "websocket_connections",
    "signaling_messages_per_second",
    "signaling_errors_per_second",
    "relay_latency_p95_ms",
    "cache_hit_ratio_percent",
    "db_pool_in_use",
    "db_pool_size",
    "bot_first_audio_p95_ms",
    "cpu_percent",
    "memory_mb",
    "processes_not_ready",
)


# --- storage ------------------------------------------------------------------------


class RedisSamples:
    """All processes' samples in one sorted set scored by time."""

    def __init__(self, url: str, key: str) -> None:
        # Short timeouts: the sampler and the dashboard must not hang on an outage.
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.key = key

    name = "redis"

    def add(self, sample: dict) -> None:
        self.client.zadd(self.key, {json.dumps(sample, separators=(",", ":")): sample["t"]})

    def since(self, start: float) -> list[dict]:
        return [json.loads(member) for member in self.client.zrangebyscore(self.key, start, "+inf")]

    def prune(self, before: float) -> None:
        self.client.zremrangebyscore(self.key, "-inf", f"({before}")


class DatabaseSamples:
    """Samples in the Sample table, for deployments without Redis."""

    name = "database"

    def add(self, sample: dict) -> None:
        Sample.objects.create(process=sample["process"], taken_at=from_timestamp(sample["t"]), data=sample)

    def since(self, start: float) -> list[dict]:
        return list(Sample.objects.filter(taken_at__gte=from_timestamp(start)).values_list("data", flat=True))

    def prune(self, before: float) -> None:
        Sample.objects.filter(taken_at__lt=from_timestamp(before)).delete()


def from_timestamp(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


@cache
def store() -> RedisSamples | DatabaseSamples:
    if settings.REDIS_URL:
        return RedisSamples(settings.REDIS_URL, settings.MONITORING_SAMPLES_KEY)
    return DatabaseSamples()


def retention_start(now: float | None = None) -> float:
    now = timezone.now().timestamp() if now is None else now
    return now - settings.MONITORING_RETENTION_HOURS * 3600


# --- adding up ------------------------------------------------------------------------


def merge_histograms(histograms: Iterable[Histogram | None]) -> Histogram | None:
    merged: Histogram | None = None
    for histogram in histograms:
        # A process that observed nothing (a server's bot stages, say) adds nothing.
        if not histogram or not histogram["n"] or histogram["n"][-1] <= 0:
            continue
        if merged is None or merged["le"] != histogram["le"]:
            # Buckets change only with a new release; the newest layout wins.
            merged = {"le": list(histogram["le"]), "n": list(histogram["n"])}
            continue
        merged["n"] = [a + b for a, b in zip(merged["n"], histogram["n"])]
    return merged


def quantile(q: float, histogram: Histogram | None) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in."""
    if not histogram or not histogram["n"] or histogram["n"][-1] <= 0:
        return None
    # "le" holds the finite bounds; "n" has one more count, the +Inf bucket
    # (JSON, and so Postgres, has no infinity).
    bounds, counts = [*histogram["le"], math.inf], histogram["n"]
    rank = q * counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def ratio_percent(part: float, whole: float) -> float | None:
    return None if whole <= 0 else 100 * part / whole


def aggregate(samples: list[dict]) -> dict[str, float | None]:
    """The deployment-wide value of every dashboard metric over these samples.

    Rates divide each process's counts by the time its samples cover, so a
    bucket that is still filling is not under-counted; gauges add up each
    process's peak, so a short peak shows however wide the chart's buckets.
    """
    if not samples:
        return dict.fromkeys(SERIES)
    by_process: dict[str, list[dict]] = defaultdict(list)
    for sample in samples:
        by_process[sample["process"]].append(sample)
    rates: dict[str, float] = defaultdict(float)
    totals: dict[str, float] = defaultdict(float)
    gauges: dict[str, float] = defaultdict(float)
    not_ready = 0
    for own in by_process.values():
        own.sort(key=lambda sample: sample["t"])
        covered = sum(sample.get("seconds", 0) for sample in own) or 1.0
        for name in COUNTS:
            count = sum(sample.get(name, 0) for sample in own)
            totals[name] += count
            rates[name] += count / covered
        for name in GAUGES:
            gauges[name] += max(sample.get(name, 0) for sample in own)
        not_ready += 0 if own[-1].get("ready", True) else 1
    p95 = {name: quantile(0.95, merge_histograms(sample.get(name) for sample in samples)) for name in HISTOGRAMS}
    return {
        "http_requests_per_second": rates["http_requests"],
        "http_latency_p95_ms": milliseconds(p95["http_latency"]),
        "http_error_rate_percent": ratio_percent(totals["http_errors"], totals["http_requests"]),
        "websocket_connections": gauges["websocket_connections"],
        "signaling_messages_per_second": rates["signaling_received"],
        "signaling_errors_per_second": rates["signaling_errors"],
        "relay_latency_p95_ms": milliseconds(p95["relay_latency"]),
        "cache_hit_ratio_percent": ratio_percent(totals["cache_hits"], totals["cache_hits"] + totals["cache_misses"]),
        "db_pool_in_use": gauges["db_pool_in_use"],
        "db_pool_size": gauges["db_pool_size"],
        "bot_first_audio_p95_ms": milliseconds(p95["bot_first_audio"]),
        "cpu_percent": 100 * rates["cpu_seconds"],
        "memory_mb": gauges["memory_bytes"] / 2**20,
        "processes_not_ready": not_ready,
    }

