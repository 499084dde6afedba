import asyncio
import logging
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from bots.worker import BotWorker

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run a bot worker: claim bots that admins put in lobbies and run them. "
        "Run as many as needed, on as many machines; SIGTERM makes its bots leave and hands them to the others."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--server-url", default=settings.BOT_SERVER_URL, help="Where bots open their lobby WebSockets.")
        parser.add_argument("--capacity", type=int, default=settings.BOT_WORKER_CAPACITY, help="Lobbies at most.")

    def handle(self, *args: object, server_url: str, capacity: int, **options: object) -> None:
        asyncio.run(self.work(server_url, capacity))

    async def work(self, server_url: str, capacity: int) -> None:
        worker = BotWorker(server_url=server_url, capacity=capacity)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        await worker.run()
