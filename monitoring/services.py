"""Writes of the monitoring app: samples, alert rule states and their events,
and the security audit log (audit_record).

alerts_evaluate is the only place alerts fire or resolve; it logs each change
and POSTs it to the rule's webhook after the transaction commits.
"""

import datetime
import ipaddress
import json
import logging
import threading
import urllib.request
import uuid
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from monitoring.models import METRICS, AlertEvent, AlertRule, AuditEvent
from monitoring.samples import SERIES, aggregate, retention_start, store

logger = logging.getLogger(__name__)
alert_log = logging.getLogger("voicebot.alerts")
audit_log = logging.getLogger("voicebot.audit")

METRIC_LABELS = dict(METRICS)
WEBHOOK_TIMEOUT_SECONDS = 5


def sample_record(*, sample: dict[str, Any]) -> None:
    store().add(sample)


def monitoring_prune(*, now: datetime.datetime | None = None) -> None:
    """Drops samples past MONITORING_RETENTION_HOURS, alert events past
    MONITORING_EVENT_RETENTION_DAYS and audit events past AUDIT_RETENTION_DAYS."""
    now = now or timezone.now()
    store().prune(retention_start(now.timestamp()))
    AlertEvent.objects.filter(
        created_at__lt=now - datetime.timedelta(days=settings.MONITORING_EVENT_RETENTION_DAYS)
    ).delete()
    AuditEvent.objects.filter(created_at__lt=now - datetime.timedelta(days=settings.AUDIT_RETENTION_DAYS)).delete()


def current_values(now: datetime.datetime) -> dict[str, float | None] | None:
    """Every metric over the last MONITORING_ALERT_WINDOW_SECONDS; None if the samples cannot be read."""
    try:
        return aggregate(store().since(now.timestamp() - settings.MONITORING_ALERT_WINDOW_SECONDS))
    except Exception:
        logger.warning("Could not read monitoring samples for the alert rules", exc_info=True)
        return None


def alerts_evaluate(*, now: datetime.datetime | None = None) -> list[AlertEvent]:
    """Moves each rule between ok and its severity. Every process calls this
    once per sample; a rule evaluated less than half an interval ago, or
    being evaluated by another process, is skipped."""
    now = now or timezone.now()
    values = current_values(now)
    if values is None:
        # The shared store is out of reach, so this process is not ready; the
        # other metrics are unknown and their rules keep their state.
        values = {**dict.fromkeys(SERIES), "processes_not_ready": 1}
        known = {"processes_not_ready"}
    else:
        known = set(SERIES)
    recently = now - datetime.timedelta(seconds=settings.MONITORING_SAMPLE_SECONDS / 2)
    events = []
    with transaction.atomic():
        rules = AlertRule.objects.select_for_update(skip_locked=True).filter(
            Q(evaluated_at__isnull=True) | Q(evaluated_at__lt=recently)
        )
        for rule in rules:
            if rule.metric not in known:
                continue
            event = rule_evaluate(rule, values.get(rule.metric), now)
            if event is not None:
                events.append(event)
                transaction.on_commit(partial(alert_announce, event=event))
    return events


def rule_evaluate(rule: AlertRule, value: float | None, now: datetime.datetime) -> AlertEvent | None:
    breached = rule.enabled and value is not None and rule.breached_by(value)
    rule.value = value
    rule.evaluated_at = now
    event = None
    if breached:
        rule.breached_since = rule.breached_since or now
        held_for = (now - rule.breached_since).total_seconds()
        if rule.state != rule.severity and held_for >= rule.duration_seconds:
            rule.state, rule.state_since = rule.severity, now
            event = event_create(rule, AlertEvent.FIRING, f"{describe(rule, value)} ({rule.condition()})")
    else:
        rule.breached_since = None
        if rule.state != AlertRule.OK:
            rule.state, rule.state_since = AlertRule.OK, now
            reason = "rule disabled" if not rule.enabled else describe(rule, value)
            event = event_create(rule, AlertEvent.RESOLVED, f"{reason}, no longer {rule.condition()}")
    rule.save()
    return event


def describe(rule: AlertRule, value: float | None) -> str:
    label = METRIC_LABELS.get(rule.metric, rule.metric)
    return f"{label}: no data" if value is None else f"{label} is {value:.3g}"


def event_create(rule: AlertRule, kind: str, message: str) -> AlertEvent:
    return AlertEvent.objects.create(
        rule=rule, kind=kind, severity=rule.severity, value=rule.value, message=f"{rule.name}: {message}"
    )


def alert_announce(*, event: AlertEvent) -> None:
    rule = event.rule
    fields = {
        "alert": rule.name,
        "alert_kind": event.kind,
        "severity": event.severity,
        "metric": rule.metric,
        "value": event.value,
        "condition": rule.condition(),
    }
    if event.kind == AlertEvent.FIRING:
        alert_log.warning("Alert firing: %s", event.message, extra=fields)
    else:
        alert_log.info("Alert resolved: %s", event.message, extra=fields)
    if rule.webhook_url:
        payload = {**fields, "state": rule.state, "message": event.message, "at": event.created_at.isoformat()}
        # A thread of its own, so a slow receiver never holds up sampling.
        threading.Thread(target=webhook_post, args=(rule.webhook_url, payload), daemon=True).start()


def webhook_post(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "voicebot-alerts"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
            response.read()
    except Exception as error:
        logger.warning("Alert webhook for %s failed: %s", payload["alert"], error)


# Attributes every log record has: a detail key among them would make
# logging raise, so it goes out prefixed instead.
LOG_RECORD_ATTRIBUTES = {*logging.makeLogRecord({}).__dict__, "message", "asctime"}


def ip_address_or_none(value: str | None) -> str | None:
    """The address in canonical form; None for none, or for what a server on a
    Unix socket or a test client reports instead of an address."""
    try:
        return str(ipaddress.ip_address(value)) if value else None
    except ValueError:
        return None


def audit_record(
    *,
    action: str,
    user: AbstractBaseUser | None = None,
    session_id: uuid.UUID | str | None = None,
    actor: str = "",
    ip: str | None = None,
    lobby: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Record a security-relevant action: who (an administrator, or a session and
    its display name), from where (the client's IP address), what, in which lobby.

    Writes an AuditEvent and logs a line on "voicebot.audit" whose fields are
    the event's, with detail's keys at the top level. Call it from sync code,
    from a consumer through database_sync_to_async, and for a change made in a
    transaction from transaction.on_commit, so that a change rolled back leaves no event.
    """
    actor = actor or (user.get_username() if user is not None else "")
    detail = detail or {}
    ip = ip_address_or_none(ip)
    fields = {
        **{f"detail_{key}" if key in LOG_RECORD_ATTRIBUTES else key: value for key, value in detail.items()},
        "action": action,
        "actor": actor,
        "admin_user": user.get_username() if user is not None else None,
        "admin_user_id": user.pk if user is not None else None,
        "session_id": str(session_id) if session_id else None,
        "ip": ip,
        "lobby": lobby or None,
    }
    # What is unknown is left out, so the connection's bound context (logcontext) can fill it in.
    fields = {name: value for name, value in fields.items() if value is not None}
    where = f" in lobby {lobby}" if lobby else ""
    # Logged first: if the database is what failed, the line still tells.
    audit_log.info("%s: %s from %s%s", action, actor or "unknown", ip or "unknown address", where, extra=fields)
    return AuditEvent.objects.create(
        action=action, user=user, session_id=session_id or None, actor=actor, ip=ip, lobby=lobby, detail=detail
    )
