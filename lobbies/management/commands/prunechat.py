from django.core.management.base import BaseCommand

from lobbies.services import chat_prune

BATCH = 1000


class Command(BaseCommand):
    help = (
        "Delete chat messages older than CHAT_RETENTION_DAYS now. Server processes also do it "
        "by themselves every hour."
    )

    def handle(self, *args: object, **options: object) -> None:
        deleted = batch = chat_prune(limit=BATCH)
        while batch == BATCH:
            batch = chat_prune(limit=BATCH)
            deleted += batch
        self.stdout.write(f"Deleted {deleted} chat message(s).")
