from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from monitoring.models import AlertEvent, AlertRule, AuditEvent


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    """Thresholds the dashboard watches; their state is shown on /admin/dashboard/."""

    list_display = ["name", "enabled", "metric", "condition", "severity", "state", "value", "state_since"]
    list_filter = ["state", "severity", "enabled", "metric"]
    search_fields = ["name"]
    fields = ["name", "enabled", "metric", "comparison", "threshold", "duration_seconds", "severity", "webhook_url"]
    readonly_fields = ["state", "state_since", "value", "evaluated_at"]

    def get_fields(self, request: HttpRequest, obj: AlertRule | None = None) -> list[str]:
        return self.fields if obj is None else [*self.fields, *self.readonly_fields]

    @admin.display(description="Condition")
    def condition(self, rule: AlertRule) -> str:
        return rule.condition()


@admin.register(AlertEvent)
class AlertEventAdmin(admin.ModelAdmin):
    """Rules firing and resolving: read-only, kept MONITORING_EVENT_RETENTION_DAYS days."""

    list_display = ["created_at", "rule_link", "kind", "severity", "value", "message"]
    list_filter = ["kind", "severity", "rule"]
    list_select_related = ["rule"]
    date_hierarchy = "created_at"
    search_fields = ["message"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AlertEvent | None = None) -> bool:
        return False

    @admin.display(description="Rule", ordering="rule__name")
    def rule_link(self, event: AlertEvent) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:monitoring_alertrule_change", args=[event.rule_id]), event.rule.name
        )


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The security audit log: read-only, kept AUDIT_RETENTION_DAYS days.
    Names and details are shown as text (the admin escapes them): they come from users."""

    list_display = ["created_at", "action", "actor", "session_id", "ip", "lobby", "detail"]
    list_filter = ["action", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["ip", "actor", "session_id", "lobby"]
    readonly_fields = ["created_at", "action", "user", "actor", "session_id", "ip", "lobby", "detail"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        # Only the retention pruning removes events, so nobody can cover their tracks.
        return False

