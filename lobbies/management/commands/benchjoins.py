"""Benchmark of lobby joins and roster lookups, with the caches off and on.

Runs the code the lobby consumer and the lobby detail endpoint run, in this
process, against the configured database and cache (use Postgres and Redis:
DATABASE_URL and REDIS_URL), and prints a table. Each round creates fresh
sessions and lobbies (not measured), has every session join a lobby and looks
every lobby up, then removes what it made.
"""

import asyncio
import time
import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connection

from lobbies import cache, selectors, services
from lobbies.consumers import join_batches
from lobbies.models import Lobby, Session
from lobbies.publisher import publisher


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Command(BaseCommand):
    help = "Measure lobby joins and roster lookups with the cache off and on; prints a table."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--sessions", type=int, default=200)
        parser.add_argument("--lobbies", type=int, default=50)
        parser.add_argument("--rounds", type=int, default=5, help="measured rounds per mode, after one warm-up")
        parser.add_argument("--concurrency", type=int, default=8, help="joins in flight at once")

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(
            f"database: {connection.vendor}; cache: {settings.CACHES['default']['BACKEND']}; "
            f"{options['sessions']} sessions joining {options['lobbies']} lobbies, "
            f"{options['rounds']} rounds per mode, {options['concurrency']} joins at once"
        )
        rows = []
        for enabled in (False, True):
            settings.VOICEBOT_CACHE = enabled
            cache.local.clear()
            joins: list[float] = []
            lookups: list[float] = []
            join_seconds = lookup_seconds = 0.0
            for round_number in range(options["rounds"] + 1):
                result = asyncio.run(self.round(options))
                if round_number == 0:
                    continue  # warm-up: connections, code paths
                joins += result["joins"]
                lookups += result["lookups"]
                join_seconds += result["join_seconds"]
                lookup_seconds += result["lookup_seconds"]
            rows.append(("on" if enabled else "off", joins, join_seconds, lookups, lookup_seconds))
        self.print_table(rows)

    async def round(self, options: dict[str, Any]) -> dict[str, Any]:
        # As in a server process: lobby events go out from the loop, not from the database thread.
        publisher.attach()
        tag = uuid.uuid4().hex[:8]
        lobby_names = [f"bench-{tag}-{i}" for i in range(options["lobbies"])]
        people = await database_sync_to_async(self.make_people_and_lobbies)(options["sessions"], tag, lobby_names)
        gate = asyncio.Semaphore(options["concurrency"])

        async def join(index: int, token: str) -> float:
            async with gate:
                started = time.perf_counter()
                session = await selectors.asession_for_token(token)
                await join_batches.run(
                    services.JoinRequest(
                        lobby_name=lobby_names[index % len(lobby_names)],
                        session=session,
                        channel_name=f"bench.{tag}!{index}",
                    )
                )
                return time.perf_counter() - started

        async def lookup(name: str) -> float:
            async with gate:
                started = time.perf_counter()
                await database_sync_to_async(selectors.lobby_detail)(name=name)
                return time.perf_counter() - started

        started = time.perf_counter()
        joins = await asyncio.gather(*(join(i, token) for i, token in enumerate(people)))
        join_seconds = time.perf_counter() - started
        started = time.perf_counter()
        lookups = await asyncio.gather(*(lookup(name) for name in lobby_names * 4))
        lookup_seconds = time.perf_counter() - started
        await database_sync_to_async(self.clean_up)(tag)
        return {"joins": joins, "join_seconds": join_seconds, "lookups": lookups, "lookup_seconds": lookup_seconds}

    def make_people_and_lobbies(self, count: int, tag: str, lobby_names: list[str]) -> list[str]:
        """Sessions and lobbies exist before the joins, as after POST /api/sessions/ and /api/lobbies/."""
        sessions = [services.session_create(name=f"bench {tag} {i}") for i in range(count)]
        for name in lobby_names:
            services.lobby_create(name=name, private=False, max_participants=50, created_by=sessions[0][0])
        return [token for _, token in sessions]

    def clean_up(self, tag: str) -> None:
        for lobby in Lobby.objects.filter(name__startswith=f"bench-{tag}-"):
            cache.shared.delete(selectors.roster_key(lobby.pk))
        Lobby.objects.filter(name__startswith=f"bench-{tag}-").delete()
        Session.objects.filter(name__startswith=f"bench {tag} ").delete()

    def print_table(self, rows: list[tuple]) -> None:
        header = (
            f"{'cache':<6}{'joins/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
            f"{'lookups/s':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        )
        self.stdout.write(header)
        for mode, joins, join_seconds, lookups, lookup_seconds in rows:
            self.stdout.write(
                f"{mode:<6}{len(joins) / join_seconds:>9.0f}"
                + "".join(f"{percentile(joins, q) * 1000:>9.2f}" for q in (0.5, 0.95, 0.99))
                + f"{len(lookups) / lookup_seconds:>11.0f}"
                + "".join(f"{percentile(lookups, q) * 1000:>9.2f}" for q in (0.5, 0.95, 0.99))
            )
        (_, off, *_), (_, on, *_) = rows
        gain = 1 - percentile(on, 0.95) / percentile(off, 0.95)
        self.stdout.write(f"p95 join latency with the cache: {gain:.0%} lower than without")
