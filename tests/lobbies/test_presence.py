"""Presence: heartbeats cost no database work; liveness is written in batches."""

import pytest
from django.db.backends.utils import CursorWrapper
from django.utils import timezone

from lobbies.models import Membership
from lobbies.presence import presence
from tests.conftest import Person, make_person
from tests.lobbies.test_consumers import Client, open_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer")]


@pytest.fixture
def count_queries(monkeypatch: pytest.MonkeyPatch):
    """Counts SQL statements from every thread (consumers query from worker threads)."""
    executed: list[str] = []
    original = CursorWrapper.execute

    def execute(self, sql, params=None):
        executed.append(sql)
        return original(self, sql, params)

    def start() -> list[str]:
        monkeypatch.setattr(CursorWrapper, "execute", execute)
        return executed

    return start


@pytest.fixture
def hundred_people(transactional_db: None) -> list[Person]:
    return [make_person(f"Person {i}") for i in range(100)]


async def test_a_thousand_heartbeats_from_a_hundred_sessions_take_a_handful_of_queries(
    count_queries, hundred_people: list[Person]
) -> None:
    people = hundred_people
    clients: list[Client] = []
    for i, person in enumerate(people):
        client = open_client(f"room-{i % 10}", token=person.token)
        assert (await client.connect(timeout=5))[0]
        assert (await client.receive())["type"] == "welcome"
        clients.append(client)
    before = timezone.now()

    executed = count_queries()
    for _ in range(10):
        for client in clients:
            await client.send_json_to({"type": "ping"})
    for client in clients:
        pongs = 0
        while pongs < 10:
            # The peer_joined of later arrivals come in between.
            pongs += (await client.receive())["type"] == "pong"
    await presence.beat()

    assert len(executed) <= 4, executed
    assert await Membership.objects.filter(left_at__isnull=True, last_seen_at__gte=before).acount() == 100
    for client in clients:
        await client.disconnect()
