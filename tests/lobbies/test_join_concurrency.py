"""Joins on Postgres run side by side: a lobby whose row is locked holds up
its own joins, not those of other lobbies; and they commit without waiting
for the disk."""

import asyncio
from collections.abc import Callable

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from lobbies import services
from tests.conftest import LiveClient, LiveServer, Person


def database_dsn() -> str:
    db = connection.settings_dict
    return f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} dbname={db['NAME']} user={db['USER']}"


async def test_a_locked_lobby_holds_up_only_its_own_joins(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server()
    waiting, passing = LiveClient(server, "Wanda"), LiveClient(server, "Paul")
    await waiting.join("busy")
    await waiting.close()
    blocker = await asyncio.to_thread(psycopg.connect, database_dsn())
    try:
        await asyncio.to_thread(blocker.execute, "SELECT 1 FROM lobbies_lobby WHERE name = 'busy' FOR UPDATE")
        held_up = asyncio.create_task(waiting.join("busy"))
        await asyncio.sleep(0.5)

        welcome = await asyncio.wait_for(passing.join("quiet"), 5)

        assert welcome["type"] == "welcome"
        assert not held_up.done()
    finally:
        await asyncio.to_thread(blocker.rollback)
        await asyncio.to_thread(blocker.close)
    assert (await asyncio.wait_for(held_up, 5))["type"] == "welcome"
    await waiting.close()
    await passing.close()


@pytest.mark.django_db(transaction=True)
def test_a_join_commits_without_waiting_for_the_disk_and_a_session_does(alice: Person) -> None:
    session = services.Session.objects.get(pk=alice.id)
    with CaptureQueriesContext(connection) as joining:
        services.lobby_join(lobby_name="disk", session=session, channel_name="test.channel")
    with CaptureQueriesContext(connection) as creating:
        services.session_create(name="Dora")

    assert any("synchronous_commit TO OFF" in query["sql"] for query in joining.captured_queries)
    assert not any("synchronous_commit" in query["sql"] for query in creating.captured_queries)
