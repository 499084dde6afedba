from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps


def create_demo_bot(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    """An offline provider and a bot that uses it, so a fresh install has a bot
    to add to a lobby without any API key."""
    Provider = apps.get_model("bots", "Provider")
    Bot = apps.get_model("bots", "Bot")
    offline, _ = Provider.objects.get_or_create(name="Offline responder", defaults={"kind": "offline"})
    Bot.objects.get_or_create(
        name="Robin",
        defaults={
            "provider": offline,
            "system_prompt": "You are Robin, a friendly voice assistant in a voice room. Answer in one or two short sentences.",
            "greeting": "Hello {name}, I am Robin. Ask me something.",
        },
    )


class Migration(migrations.Migration):
    dependencies = [("bots", "0001_initial")]

    operations = [migrations.RunPython(create_demo_bot, migrations.RunPython.noop)]
