"""Reads for the performance dashboard."""

import math
from collections import defaultdict
from typing import Any

from django.conf import settings
from django.urls import reverse

from monitoring.models import METRICS, AlertEvent, AlertRule
from monitoring.samples import SERIES, aggregate, store

# About this many points per chart, whatever the window.
POINTS_PER_CHART = 240
STATE_ORDER = {AlertRule.CRITICAL: 0, AlertRule.WARNING: 1, AlertRule.OK: 2}
RECENT_EVENTS = 20


def chart_step(window: int) -> int:
    """At least two sample intervals, so every point holds a sample of every
    live process: a point that missed one would show its gauges summed short."""
    interval = settings.MONITORING_SAMPLE_SECONDS
    return interval * max(2, math.ceil(window / POINTS_PER_CHART / interval))


def series_over(samples: list[dict], *, start: float, step: int, buckets: int) -> dict[str, list]:
    by_bucket: dict[int, list[dict]] = defaultdict(list)
    for sample in samples:
        by_bucket[int((sample["t"] - start) // step)].append(sample)
    series: dict[str, list] = {"t": [start + index * step for index in range(buckets)]}
    for name in SERIES:
        series[name] = []
    for index in range(buckets):
        values = aggregate(by_bucket.get(index, []))
        for name in SERIES:
            value = values[name]
            series[name].append(None if value is None else round(value, 3))
    return series


def processes_seen(samples: list[dict]) -> list[dict[str, Any]]:
    latest: dict[str, dict] = {}
    for sample in samples:
        if sample["process"] not in latest or sample["t"] > latest[sample["process"]]["t"]:
            latest[sample["process"]] = sample
    return [
        {"process": name, "role": sample.get("role", ""), "last_seen": sample["t"], "ready": sample.get("ready", True)}
        for name, sample in sorted(latest.items())
    ]


def rules_listed() -> list[dict[str, Any]]:
    labels = dict(METRICS)
    rules = sorted(AlertRule.objects.all(), key=lambda rule: (STATE_ORDER[rule.state], rule.name))
    return [
        {
            "id": rule.pk,
            "name": rule.name,
            "enabled": rule.enabled,
            "metric": rule.metric,
            "metric_label": labels.get(rule.metric, rule.metric),
            "condition": rule.condition(),
            "severity": rule.severity,
            "state": rule.state,
            "value": rule.value,
            "since": rule.state_since.isoformat(),
            "admin_url": reverse("admin:monitoring_alertrule_change", args=[rule.pk]),
        }
        for rule in rules
    ]


def events_listed() -> list[dict[str, Any]]:
    return [
        {
            "at": event.created_at.isoformat(),
            "rule": event.rule.name,
            "kind": event.kind,
            "severity": event.severity,
            "value": event.value,
            "message": event.message,
        }
        for event in AlertEvent.objects.select_related("rule")[:RECENT_EVENTS]
    ]


def dashboard_data(*, window: int, now: float) -> dict[str, Any]:
    """Every chart's series over the window, the processes that reported in
    it, the alert rules and the latest alert events."""
    step = chart_step(window)
    start = (now - window) // step * step
    samples = store().since(start)
    buckets = math.ceil((now - start) / step)
    return {
        "window": window,
        "step": step,
        "now": now,
        "refresh_seconds": max(settings.MONITORING_SAMPLE_SECONDS, step // 3),
        "storage": store().name,
        "processes": processes_seen(samples),
        "series": series_over(samples, start=start, step=step, buckets=buckets),
        "rules": rules_listed(),
        "events": events_listed(),
    }
