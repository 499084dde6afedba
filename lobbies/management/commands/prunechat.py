from django.core.management.base import BaseCommand

from lobbies.services import chat_prune


class Command(BaseCommand):
    help = "Delete chat messages older than CHAT_RETENTION_DAYS (run it daily, from cron or a scheduler)."

    def handle(self, *args: object, **options: object) -> None:
        deleted = chat_prune()
        self.stdout.write(f"Deleted {deleted} chat message(s).")
