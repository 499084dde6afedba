"""Dashboard samples, alert rules and the security audit log.

Every server and bot worker process writes a sample of its own numbers every
MONITORING_SAMPLE_SECONDS (monitoring/sampler.py). Samples go to Redis when
REDIS_URL is set and to the Sample table otherwise (monitoring/samples.py);
the dashboard and the alert rules read them back for the whole deployment.
"""

from django.conf import settings
from django.core.validators import URLValidator
from django.db import models
from django.utils import timezone

# What the dashboard charts and alert rules can watch, deployment-wide, as
# computed by monitoring.samples.aggregate().
METRICS = [
    ("http_requests_per_second", "HTTP requests per second"),
    ("http_latency_p95_ms", "HTTP latency p95 (ms)"),
    ("http_error_rate_percent", "HTTP error rate (% of responses that are 5xx)"),
    ("websocket_connections", "WebSocket connections open"),
    ("signaling_messages_per_second", "Signaling messages received per second"),
    ("signaling_errors_per_second", "Signaling error replies per second"),
    ("relay_latency_p95_ms", "Signaling relay latency p95 (ms)"),
    ("cache_hit_ratio_percent", "Cache hit ratio (%)"),
    ("db_pool_in_use", "Database connections in use"),
    ("bot_first_audio_p95_ms", "Bot end of speech to first audio p95 (ms)"),
    ("cpu_percent", "CPU (% of one core, all processes)"),
    ("memory_mb", "Memory RSS (MB, all processes)"),
    ("processes_not_ready", "Processes failing readiness"),
]


class Sample(models.Model):
    """One process's numbers over one sampling interval (database storage only)."""

    process = models.CharField(max_length=200, help_text="host:pid of the process that took the sample.")
    taken_at = models.DateTimeField(db_index=True)
    # Counts are increases over the interval; gauges are values at its end.
    data = models.JSONField()

    class Meta:
        ordering = ["taken_at"]


class AlertRule(models.Model):
    """Fires when a deployment-wide metric stays past a threshold for long enough."""

    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"
    SEVERITIES = [(WARNING, "Warning"), (CRITICAL, "Critical")]
    STATES = [(OK, "OK"), *SEVERITIES]
    COMPARISONS = [(">", "above"), (">=", "at or above"), ("<", "below"), ("<=", "at or below")]

    name = models.CharField(max_length=100, unique=True)
    enabled = models.BooleanField(default=True)
    metric = models.CharField(max_length=50, choices=METRICS)
    comparison = models.CharField(max_length=2, choices=COMPARISONS, default=">")
    threshold = models.FloatField()
    duration_seconds = models.PositiveIntegerField(
        "for (seconds)", default=60, help_text="How long the condition must hold before the rule fires (0: at once)."
    )
    severity = models.CharField(max_length=10, choices=SEVERITIES, default=WARNING)
    webhook_url = models.URLField(
        blank=True,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="Firing and resolving are POSTed here as JSON (and always logged)."
    )

    # Kept up to date by monitoring.services.alerts_evaluate.
    state = models.CharField(max_length=10, choices=STATES, default=OK, editable=False)
    state_since = models.DateTimeField(default=timezone.now, editable=False)
    value = models.FloatField(null=True, editable=False, help_text="The metric at the last evaluation.")
    breached_since = models.DateTimeField(null=True, editable=False)
    evaluated_at = models.DateTimeField(null=True, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def condition(self) -> str:
        threshold = f"{self.threshold:g}"
        return f"{self.comparison} {threshold} for {self.duration_seconds} s"

    def breached_by(self, value: float) -> bool:
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
        }[self.comparison]


class AlertEvent(models.Model):
    """A rule firing or resolving."""

    FIRING = "firing"
    RESOLVED = "resolved"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=10, choices=[(FIRING, "Firing"), (RESOLVED, "Resolved")])
    severity = models.CharField(max_length=10, choices=AlertRule.SEVERITIES)
    value = models.FloatField(null=True)
    message = models.TextField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.message


class AuditEvent(models.Model):
    """A security-relevant action: an administrator's action on a lobby or bot,
    or a refused attempt (wrong password, unknown token, foreign origin, ...).
    Written by monitoring.services.audit_record; kept AUDIT_RETENTION_DAYS days."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    action = models.CharField(max_length=64, db_index=True)
    # Who: an administrator, or a participant's session, or nobody known.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    session_id = models.UUIDField(null=True, blank=True, db_index=True)
    # The user name or display name at the time, kept when the user or session is gone.
    actor = models.CharField(max_length=150, blank=True)
    ip = models.GenericIPAddressField("IP address", null=True, blank=True)
    # A name, not a key: the event outlives the lobby.
    lobby = models.CharField(max_length=64, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["action", "created_at"])]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor or 'unknown'} from {self.ip or 'unknown'}"
