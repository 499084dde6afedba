"""Every process samples its own numbers for the dashboard and the alert rules.

The server starts a Sampler on its first request or connection
(SamplerMiddleware in voicebot/asgi.py); a runbots worker starts one next to
its bots. Each tick reads this process's Prometheus metrics, turns the
running totals into increases since the last tick, runs the readiness
checks, stores the sample where every process can read it, and evaluates the
alert rules (one process at a time does that).
"""

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django_prometheus.middleware import Metrics
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.process_collector import PROCESS_COLLECTOR

from bots import metrics as bot_metrics
from lobbies import cache
from lobbies import metrics as lobby_metrics
from monitoring import health, services
from monitoring.metrics import connections_in_use, pool_stats
from monitoring.samples import COUNTS, HISTOGRAMS, Histogram

logger = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 60


def counter_total(metric: MetricWrapperBase, keep: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
    return sum(
        sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and keep(sample.labels)
    )


def gauge_value(metric: MetricWrapperBase) -> float:
    return sum(sample.value for family in metric.collect() for sample in family.samples)


def histogram_totals(metric: MetricWrapperBase, keep: Callable[[dict[str, str]], bool] = lambda labels: True) -> Histogram:
    """Cumulative bucket counts, summed over the label sets `keep` accepts."""
    counts: dict[float, float] = defaultdict(float)
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and keep(sample.labels):
                counts[float(sample.labels["le"])] += sample.value
    bounds = sorted(counts)
    return {"le": [bound for bound in bounds if bound != float("inf")], "n": [counts[bound] for bound in bounds]}


def process_usage() -> dict[str, float]:
    values = {sample.name: sample.value for family in PROCESS_COLLECTOR.collect() for sample in family.samples}
    return {
        "cpu_seconds": values.get("process_cpu_seconds_total", 0.0),
        "memory_bytes": values.get("process_resident_memory_bytes", 0.0),
    }


def pool_usage() -> dict[str, float]:
    in_use = size = 0
    for alias in settings.DATABASES:
        stats = pool_stats(alias)
        if stats:
            in_use += connections_in_use(stats)
            size += stats.get("pool_max", 0)
    return {"db_pool_in_use": in_use, "db_pool_size": size}


def read_totals() -> dict[str, Any]:
    """This process's running totals and gauges, from its Prometheus metrics."""
    http = Metrics.get_instance()
    http_latency = histogram_totals(http.requests_latency_before)
    cache_counts = dict(cache.stats)
    return {
        "http_requests": http_latency["n"][-1] if http_latency["n"] else 0,
        "http_latency": http_latency,
        "http_errors": counter_total(http.responses_by_status, lambda labels: labels["status"].startswith("5")),
        "websocket_connections": gauge_value(lobby_metrics.connections_open),
        "signaling_received": counter_total(lobby_metrics.messages_received),
        "signaling_errors": counter_total(lobby_metrics.errors_sent),
        "relay_latency": histogram_totals(lobby_metrics.relay_latency),
        "cache_hits": sum(count for (_, outcome), count in cache_counts.items() if outcome == "hit"),
        "cache_misses": sum(count for (_, outcome), count in cache_counts.items() if outcome == "miss"),
        "bot_first_audio": histogram_totals(
            bot_metrics.stage_latency, lambda labels: labels["stage"] == "first_audio"
        ),
        **pool_usage(),
        **process_usage(),
    }


def increase(now: float, before: float) -> float:
    # A running total only grows; max() keeps a reset from showing as a negative rate.
    return max(0.0, now - before)


def histogram_increase(now: Histogram, before: Histogram | None) -> Histogram:
    if not before or before["le"] != now["le"]:
        return now
    return {"le": now["le"], "n": [increase(a, b) for a, b in zip(now["n"], before["n"])]}


class Sampler:
    def __init__(self, *, role: str) -> None:
        self.role = role
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        self.previous: dict[str, Any] = {}
        self.last_taken = time.monotonic()
        self.stopped = asyncio.Event()
        self.last_pruned = 0.0

    def take(self) -> dict[str, Any]:
        """The increases since the previous take."""
        totals = read_totals()
        now = time.monotonic()
        sample = {"t": time.time(), "process": self.process, "role": self.role, "seconds": now - self.last_taken}
        self.last_taken = now
        for name, value in totals.items():
            if name in COUNTS:
                sample[name] = increase(value, self.previous.get(name, 0.0))
            elif name in HISTOGRAMS:
                sample[name] = histogram_increase(value, self.previous.get(name))
            else:
                sample[name] = value
        self.previous = totals
        return sample

    async def tick(self) -> None:
        sample = await database_sync_to_async(self.take)()
        outcomes = await health.run_probes(health.readiness_probes())
        sample["ready"] = health.overall_status(outcomes) != health.DOWN
        await database_sync_to_async(services.sample_record)(sample=sample)
        await database_sync_to_async(services.alerts_evaluate)()
        if time.monotonic() - self.last_pruned >= PRUNE_EVERY_SECONDS:
            self.last_pruned = time.monotonic()
            await database_sync_to_async(services.monitoring_prune)()

    async def run(self) -> None:
        interval = settings.MONITORING_SAMPLE_SECONDS
        # The first sample counts from here, not from the process's start-up.
        self.previous = await database_sync_to_async(read_totals)()
        self.last_taken = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self.stopped.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            try:
                await self.tick()
            except Exception:
                # An outage shows on the dashboard as a gap; sampling goes on.
                logger.warning("Could not take or store a monitoring sample", exc_info=True)

    def stop(self) -> None:
        self.stopped.set()


class SamplerMiddleware:
    """ASGI middleware: the first request or connection starts this server
    process's sampler on the server's loop."""

    def __init__(self, application: Any) -> None:
        self.application = application
        self.sampler: Sampler | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if self.sampler is None:
            self.sampler = Sampler(role="server")
            asyncio.get_running_loop().create_task(self.sampler.run())
        return await self.application(scope, receive, send)
