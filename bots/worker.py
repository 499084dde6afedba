"""The bot worker: claims bot assignments and runs a BotRunner for each.

`manage.py runbots` runs one in its own process; on the embedded default the
server starts one on its own event loop (see BotsInProcess). Workers hear of
changes through the channel layer at once and also look every heartbeat, so a
lost message only costs a heartbeat interval.
"""

import asyncio
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from bots import metrics, selectors, services, speech
from bots.config import BotProfile
from bots.models import Assignment
from bots.pipeline import TurnRecord
from bots.runner import BotRunner, RunnerEnded, use_host_addresses
from lobbies.publisher import publisher
from voicebot import logcontext
from voicebot.tracing import trace_turn

logger = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 3600


class BotWorker:
    def __init__(self, *, server_url: str, capacity: int) -> None:
        self.server_url = server_url
        self.capacity = capacity
        self.worker_id: int | None = None
        self.runners: dict[int, asyncio.Task] = {}
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.last_prune = 0.0

    async def run(self) -> None:
        """Work until stop() is called; then every bot leaves its lobby and the
        assignments are handed back for other workers."""
        publisher.attach()
        use_host_addresses(settings.BOT_HOST_ADDRESSES)
        # Models load before the first claim, so no bot's first turn waits for them.
        await asyncio.to_thread(speech.warm_up)
        worker = await database_sync_to_async(services.worker_register)(capacity=self.capacity)
        self.worker_id = worker.pk
        logger.info("Bot worker %s started (capacity %d, server %s)", worker.name, self.capacity, self.server_url)
        listener = asyncio.create_task(self.listen())
        try:
            while not self.stopping.is_set():
                await self.beat()
                self.wake.clear()
                await self.wait(settings.BOT_WORKER_HEARTBEAT_SECONDS)
        finally:
            listener.cancel()
            await self.stop_runners(list(self.runners))
            await database_sync_to_async(services.worker_stop)(worker_id=self.worker_id)
            logger.info("Bot worker %s stopped", worker.name)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def beat(self) -> None:
        """Heartbeat, stop bots this worker no longer holds, claim new ones."""
        try:
            held = await database_sync_to_async(services.worker_heartbeat)(worker_id=self.worker_id)
            gone = [assignment_id for assignment_id in self.runners if assignment_id not in held]
            await self.stop_runners(gone)
            for assignment_id, task in list(self.runners.items()):
                if task.done():
                    del self.runners[assignment_id]
            metrics.bots_in_rooms.set(len(self.runners))
            free = self.capacity - len(self.runners)
            claims = await database_sync_to_async(services.assignments_claim)(worker_id=self.worker_id, limit=free)
            for claim in claims:
                await self.start_runner(claim)
            await self.prune()
        except Exception:
            # The database may be away for a moment; the bots already running carry on.
            logger.exception("Bot worker heartbeat failed")

    async def start_runner(self, claim: services.Claim) -> None:
        profile = await database_sync_to_async(selectors.assignment_profile)(assignment_id=claim.assignment_id)
        runner = BotRunner(
            claim=claim,
            profile=profile,
            server_url=self.server_url,
            on_status=lambda status, error="": self.set_status(claim.assignment_id, status, error),
            on_turn=lambda turn: self.record_turn(claim.assignment_id, turn, profile),
            on_kicked=lambda: self.kicked(claim.assignment_id),
        )
        self.runners[claim.assignment_id] = asyncio.create_task(self.supervise(runner, claim))
        metrics.bots_in_rooms.set(len(self.runners))
        logger.info("Bot %s joining lobby %s", profile.name, claim.lobby_name)

    async def supervise(self, runner: BotRunner, claim: services.Claim) -> None:
        # This task runs the bot: its logs, and those of the tasks the runner
        # starts, carry which bot in which lobby. The bot's own session is session_id.
        logcontext.bind(
            assignment_id=claim.assignment_id,
            bot=runner.profile.name,
            lobby=claim.lobby_name,
            session_id=claim.session_id,
        )
        try:
            await runner.run()
        except RunnerEnded as ended:
            logger.info("Bot %s left lobby %s: %s", runner.profile.name, claim.lobby_name, ended)
        except Exception as error:
            logger.exception("Bot %s failed in lobby %s", runner.profile.name, claim.lobby_name)
            await self.set_status(claim.assignment_id, Assignment.Status.ERROR, f"The bot stopped: {error}")

    async def stop_runners(self, assignment_ids: list[int]) -> None:
        tasks = [self.runners.pop(assignment_id) for assignment_id in assignment_ids if assignment_id in self.runners]
        for task in tasks:
            task.cancel()
        metrics.bots_in_rooms.set(len(self.runners))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def listen(self) -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(services.WORKERS_GROUP, channel)
        try:
            while True:
                try:
                    await layer.receive(channel)
                except Exception:
                    logger.exception("Bot worker lost the channel layer; polling meanwhile")
                    await asyncio.sleep(1)
                    continue
                self.wake.set()
        finally:
            await asyncio.shield(layer.group_discard(services.WORKERS_GROUP, channel))

    async def set_status(self, assignment_id: int, status: str, error: str = "") -> None:
        try:
            await database_sync_to_async(services.assignment_set_status)(
                assignment_id=assignment_id, worker_id=self.worker_id, status=status, error=error
            )
        except Exception:
            logger.exception("Could not record bot status %s", status)

    async def record_turn(self, assignment_id: int, turn: TurnRecord, profile: BotProfile) -> None:
        metrics.turn_finished(turn, profile)
        trace_turn(turn_fields(turn), started_at=turn.started_at)
        try:
            await database_sync_to_async(services.turn_record)(assignment_id=assignment_id, **turn_fields(turn))
        except Exception:
            logger.exception("Could not record a bot turn")

    async def kicked(self, assignment_id: int) -> None:
        assignment = await database_sync_to_async(Assignment.objects.select_related("bot", "lobby").get)(pk=assignment_id)
        await database_sync_to_async(services.bot_remove_from_lobby)(assignment=assignment)

    async def prune(self) -> None:
        if time.monotonic() - self.last_prune >= PRUNE_INTERVAL_SECONDS:
            self.last_prune = time.monotonic()
            deleted = await database_sync_to_async(services.turns_prune)()
            if deleted:
                logger.info("Deleted %d bot turns past the retention limit", deleted)


def turn_fields(turn: TurnRecord) -> dict[str, Any]:
    return {
        "source": turn.source,
        "speaker_name": turn.speaker_name[:64],
        "speaker_session_id": turn.speaker_peer_id or None,
        "user_text": turn.user_text,
        "reply_text": turn.reply_text,
        "error": turn.error,
        "interrupted": turn.interrupted,
        "end_of_speech_ms": turn.end_of_speech_ms,
        "recognition_ms": turn.recognition_ms,
        "model_first_token_ms": turn.model_first_token_ms,
        "synthesis_first_audio_ms": turn.synthesis_first_audio_ms,
        "first_audio_ms": turn.first_audio_ms,
        "barge_in_ms": turn.barge_in_ms,
    }


class BotsInProcess:
    """ASGI middleware for the embedded default: the first request or
    connection starts a bot worker on the server's own loop, connecting
    back to the address that request came in on."""

    def __init__(self, application: Any) -> None:
        self.application = application
        self.worker: BotWorker | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if self.worker is None and scope.get("server"):
            host, port = scope["server"][:2]
            host = f"[{host}]" if ":" in host else host
            scheme = "wss" if scope.get("scheme") in ("https", "wss") else "ws"
            self.worker = BotWorker(server_url=f"{scheme}://{host}:{port}", capacity=settings.BOT_WORKER_CAPACITY)
            asyncio.get_running_loop().create_task(self.worker.run())
        return await self.application(scope, receive, send)
