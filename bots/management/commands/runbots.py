import asyncio
import logging
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from prometheus_client import start_http_server

import bots.metrics  # noqa: F401  registers the bot metrics
from bots.worker import BotWorker
from monitoring.sampler import Sampler

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run a bot worker: claim bots that admins put in lobbies and run them. "
        "Run as many as needed, on as many machines; SIGTERM makes its bots leave and hands them to the others."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--server-url", default=settings.BOT_SERVER_URL, help="Where bots open their lobby WebSockets.")
        parser.add_argument("--capacity", type=int, default=settings.BOT_WORKER_CAPACITY, help="Lobbies at most.")
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="Serve this worker's Prometheus metrics on http://0.0.0.0:PORT/metrics (0: off).",
        )

    def handle(self, *args: object, server_url: str, capacity: int, metrics_port: int, **options: object) -> None:
        if metrics_port:
            # A thread of its own: the worker's loop may be busy with audio when Prometheus scrapes.
            start_http_server(metrics_port)
            logger.info("Bot worker metrics on port %d", metrics_port)
        asyncio.run(self.work(server_url, capacity))

    async def work(self, server_url: str, capacity: int) -> None:
        worker = BotWorker(server_url=server_url, capacity=capacity)
        sampler = Sampler(role="bots")
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        sampling = loop.create_task(sampler.run()) if settings.MONITORING_SAMPLE_SECONDS else None
        try:
            await worker.run()
        finally:
            sampler.stop()
            if sampling is not None:
                await sampling
