"""Alert rules: they fire after their condition held long enough, show the
severity as their state, log and POST each change, and resolve."""

import datetime
import importlib
import logging

import pytest
from django.apps import apps
from django.utils import timezone

from monitoring import services
from monitoring.models import AlertEvent, AlertRule
from monitoring.samples import store
from tests.monitoring.conftest import make_sample

default_rules = importlib.import_module("monitoring.migrations.0002_default_alert_rules")


@pytest.fixture
def shipped_rules(transactional_db: None) -> None:
    """The rules the migration ships (the test database is emptied between tests)."""
    default_rules.add_default_rules(apps, None)


def test_default_rules_watch_errors_relay_readiness_and_bots(shipped_rules: None) -> None:
    assert set(AlertRule.objects.values_list("metric", flat=True)) == {
        "http_error_rate_percent", "relay_latency_p95_ms", "processes_not_ready", "bot_first_audio_p95_ms"
    }


@pytest.fixture
def busy_rule(transactional_db: None, webhook) -> AlertRule:
    return AlertRule.objects.create(
        name="Busy", metric="http_requests_per_second", comparison=">", threshold=1,
        duration_seconds=10, severity=AlertRule.CRITICAL, webhook_url=webhook.url,
    )


def at(seconds: float) -> datetime.datetime:
    return timezone.now() + datetime.timedelta(seconds=seconds)


def test_a_rule_fires_once_its_condition_held_long_enough_then_resolves(
    sample_store, busy_rule: AlertRule, webhook, caplog: pytest.LogCaptureFixture
) -> None:
    now = at(0)
    sample_store.add(make_sample(now.timestamp(), http_requests=25))  # 5 requests a second

    assert services.alerts_evaluate(now=now) == []
    busy_rule.refresh_from_db()
    assert (busy_rule.state, busy_rule.value) == (AlertRule.OK, 5.0)

    with caplog.at_level(logging.INFO, logger="voicebot.alerts"):
        [fired] = services.alerts_evaluate(now=now + datetime.timedelta(seconds=10))
    busy_rule.refresh_from_db()
    assert busy_rule.state == AlertRule.CRITICAL
    assert (fired.kind, fired.severity, fired.message) == (
        "firing", "critical", "Busy: HTTP requests per second is 5 (> 1 for 10 s)"
    )
    assert "Alert firing: Busy: HTTP requests per second is 5" in caplog.text
    [posted] = webhook.wait_for(1)
    assert (posted["alert"], posted["alert_kind"], posted["state"], posted["value"]) == ("Busy", "firing", "critical", 5.0)

    # A minute later the window holds no traffic: no data, so the rule resolves.
    with caplog.at_level(logging.INFO, logger="voicebot.alerts"):
        [resolved] = services.alerts_evaluate(now=now + datetime.timedelta(seconds=75))
    busy_rule.refresh_from_db()
    assert busy_rule.state == AlertRule.OK
    assert resolved.kind == "resolved"
    assert "Alert resolved: Busy" in caplog.text
    assert webhook.wait_for(2)[1]["state"] == "ok"


def test_a_short_breach_does_not_fire(sample_store, busy_rule: AlertRule) -> None:
    now = at(0)
    sample_store.add(make_sample(now.timestamp(), http_requests=25))
    services.alerts_evaluate(now=now)
    # The rate falls below the threshold before the 10 s are up: the clock starts again.
    services.alerts_evaluate(now=now + datetime.timedelta(seconds=70))
    sample_store.add(make_sample(now.timestamp() + 75, http_requests=25))
    services.alerts_evaluate(now=now + datetime.timedelta(seconds=76))
    busy_rule.refresh_from_db()
    assert busy_rule.state == AlertRule.OK
    assert not AlertEvent.objects.exists()


def test_evaluating_twice_in_one_interval_fires_once(sample_store, busy_rule: AlertRule) -> None:
    """Every process evaluates after each sample; only one of them changes a rule."""
    busy_rule.duration_seconds = 0
    busy_rule.save()
    now = at(0)
    sample_store.add(make_sample(now.timestamp(), http_requests=25))
    assert len(services.alerts_evaluate(now=now)) == 1
    assert services.alerts_evaluate(now=now + datetime.timedelta(milliseconds=100)) == []
    assert AlertEvent.objects.count() == 1


def test_disabling_a_firing_rule_resolves_it(sample_store, busy_rule: AlertRule) -> None:
    busy_rule.duration_seconds = 0
    busy_rule.save()
    now = at(0)
    sample_store.add(make_sample(now.timestamp(), http_requests=25))
    services.alerts_evaluate(now=now)
    AlertRule.objects.filter(pk=busy_rule.pk).update(enabled=False)
    [resolved] = services.alerts_evaluate(now=now + datetime.timedelta(seconds=5))
    assert resolved.message == "Busy: rule disabled, no longer > 1 for 0 s"


def test_a_process_failing_readiness_fires_the_default_rule(sample_store, shipped_rules: None) -> None:
    rule = AlertRule.objects.get(name="Readiness failing")  # shipped by a migration
    now = at(0)
    sample_store.add(make_sample(now.timestamp(), process="a:1"))
    sample_store.add(make_sample(now.timestamp(), process="b:2", ready=False))
    services.alerts_evaluate(now=now)
    services.alerts_evaluate(now=now + datetime.timedelta(seconds=30))
    rule.refresh_from_db()
    assert (rule.state, rule.value) == (AlertRule.CRITICAL, 1)


def test_unreadable_samples_count_as_not_ready_and_leave_other_rules_alone(
    settings, shipped_rules: None, busy_rule: AlertRule
) -> None:
    AlertRule.objects.filter(pk=busy_rule.pk).update(state=AlertRule.CRITICAL)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    store.cache_clear()
    try:
        services.alerts_evaluate(now=at(0))
        services.alerts_evaluate(now=at(31))
    finally:
        store.cache_clear()
    assert AlertRule.objects.get(name="Readiness failing").state == AlertRule.CRITICAL
    assert AlertRule.objects.get(pk=busy_rule.pk).state == AlertRule.CRITICAL


def test_old_samples_and_events_are_dropped(sample_store, busy_rule: AlertRule, settings) -> None:
    now = at(0)
    sample_store.add(make_sample(now.timestamp() - settings.MONITORING_RETENTION_HOURS * 3600 - 1))
    sample_store.add(make_sample(now.timestamp()))
    old = AlertEvent.objects.create(rule=busy_rule, kind="firing", severity="critical", message="old")
    AlertEvent.objects.filter(pk=old.pk).update(created_at=now - datetime.timedelta(days=31))
    services.monitoring_prune(now=now)
    assert len(sample_store.since(0)) == 1
    assert not AlertEvent.objects.exists()
