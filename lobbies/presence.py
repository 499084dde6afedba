"""Presence: which connections this server process holds.

Instead of a database write per heartbeat, each process refreshes the rows of
all its live connections in one UPDATE every PRESENCE_INTERVAL_SECONDS, and
on the same beat ends the stays of participants who dropped and did not come
back within the grace period (also those of a process that died, whose rows
stopped being refreshed). Once an hour the beat also deletes chat past
CHAT_RETENTION_DAYS, so retention needs no scheduler of its own.
"""

import asyncio
import logging
import time

from channels.db import database_sync_to_async
from django.conf import settings

from lobbies import services

logger = logging.getLogger(__name__)

CHAT_PRUNE_EVERY_SECONDS = 3600
CHAT_PRUNE_BATCH = 1000
EXPIRE_LOBBIES_AT_ONCE = 50


class Presence:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        # channel name -> membership id
        self.live: dict[str, int] = {}
        # time.monotonic() after which the next beat prunes chat.
        self.chat_prune_due = 0.0

    def attach(self) -> None:
        """Run the beat on the running loop. Call from async code."""
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return
        self.loop = loop
        self.live = {}
        loop.create_task(self.run())

    def add(self, channel_name: str, membership_id: int) -> None:
        self.live[channel_name] = membership_id

    def discard(self, channel_name: str) -> None:
        self.live.pop(channel_name, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(settings.PRESENCE_INTERVAL_SECONDS)
            await self.beat()

    async def beat(self) -> None:
        try:
            await database_sync_to_async(services.memberships_touch)(membership_ids=list(self.live.values()))
            await self.expire()
            if time.monotonic() >= self.chat_prune_due:
                self.chat_prune_due = time.monotonic() + CHAT_PRUNE_EVERY_SECONDS
                await self.prune_chat()
        except Exception:
            # The database may be briefly away; the next beat tries again.
            logger.exception("Presence beat failed")

    async def expire(self) -> None:
        # A few lobbies per thread hop: after a server holding thousands of
        # connections died, the process's other database work on this thread
        # (session lookups, chat, mutes) waits behind a few lobbies only.
        expire = database_sync_to_async(services.memberships_expire)
        while await expire(lobby_limit=EXPIRE_LOBBIES_AT_ONCE) == EXPIRE_LOBBIES_AT_ONCE:
            pass

    async def prune_chat(self) -> None:
        # One batch per thread hop: leaves and chat queued behind it wait for one batch only.
        while await database_sync_to_async(services.chat_prune)(limit=CHAT_PRUNE_BATCH) == CHAT_PRUNE_BATCH:
            pass


presence = Presence()
