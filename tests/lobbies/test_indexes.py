"""The lookups on the hot paths are served by indexes (Postgres's own plans)."""

from collections.abc import Iterator

import pytest
from django.db import connection

from lobbies.models import Lobby, Membership, Session
from lobbies.selectors import live_memberships, token_hash
from tests.conftest import Person

pytestmark = pytest.mark.django_db


@pytest.fixture
def planner_avoids_seq_scans() -> Iterator[None]:
    """With a handful of rows a sequential scan is cheapest; forbid it, so the
    plan shows whether an index can serve the query at all."""
    assert connection.vendor == "postgresql", "run the suite with tests/run.sh"
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
    yield
    with connection.cursor() as cursor:
        cursor.execute("RESET enable_seqscan")


def test_the_lobby_roster_is_read_through_the_live_roster_index(
    planner_avoids_seq_scans: None, alice: Person
) -> None:
    lobby = Lobby.objects.create(name="indexed")
    Membership.objects.create(session_id=alice.id, lobby=lobby, channel_name="c")

    plan = live_memberships({lobby.pk}).explain()

    assert "live_roster" in plan, plan


def test_a_session_is_found_by_its_token_through_an_index(planner_avoids_seq_scans: None, alice: Person) -> None:
    plan = Session.objects.filter(token_hash=token_hash(alice.token)).explain()

    assert "Index Scan" in plan and "token_hash" in plan, plan


def test_the_presence_sweep_uses_the_live_presence_index(planner_avoids_seq_scans: None) -> None:
    plan = Membership.objects.filter(left_at__isnull=True, state="reconnecting").explain()

    assert "live_presence" in plan, plan
