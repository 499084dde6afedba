from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

# Starting points; admins tune them to their deployment.
DEFAULT_RULES = [
    {"name": "HTTP error rate", "metric": "http_error_rate_percent", "threshold": 5,
     "duration_seconds": 120, "severity": "critical"},
    {"name": "Slow signaling relay", "metric": "relay_latency_p95_ms", "threshold": 50,
     "duration_seconds": 120, "severity": "warning"},
    {"name": "Readiness failing", "metric": "processes_not_ready", "threshold": 0,
     "duration_seconds": 30, "severity": "critical"},
    {"name": "Slow bot replies", "metric": "bot_first_audio_p95_ms", "threshold": 1500,
     "duration_seconds": 120, "severity": "warning"},
]


def add_default_rules(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    AlertRule = apps.get_model("monitoring", "AlertRule")
    for rule in DEFAULT_RULES:
        AlertRule.objects.get_or_create(name=rule["name"], defaults={**rule, "comparison": ">"})


def remove_default_rules(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    apps.get_model("monitoring", "AlertRule").objects.filter(name__in=[r["name"] for r in DEFAULT_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0001_initial")]

    operations = [migrations.RunPython(add_default_rules, remove_default_rules)]
