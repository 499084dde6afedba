"""Joins, leaves and mutes commit without waiting for the disk; sessions,
lobbies made through the API and chat wait as usual (docs/performance.md#joins)."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from lobbies import services
from lobbies.models import Session
from tests.conftest import Person

SOFT_COMMIT = "SET LOCAL synchronous_commit TO OFF"


def soft_commits(captured: CaptureQueriesContext) -> int:
    return sum(SOFT_COMMIT in query["sql"] for query in captured.captured_queries)


@pytest.mark.django_db(transaction=True)
def test_roster_changes_commit_without_waiting_for_the_disk(alice: Person) -> None:
    session = Session.objects.get(pk=alice.id)
    with CaptureQueriesContext(connection) as joining:
        services.lobby_join(lobby_name="disk", session=session, channel_name="test.one")
    with CaptureQueriesContext(connection) as muting:
        services.membership_set_muted(lobby_name="disk", session_id=alice.id, channel_name="test.one", muted=True)
    with CaptureQueriesContext(connection) as leaving:
        services.lobby_leave(lobby_name="disk", session_id=alice.id, channel_name="test.one")

    assert (soft_commits(joining), soft_commits(muting), soft_commits(leaving)) == (1, 1, 1)


@pytest.mark.django_db(transaction=True)
def test_sessions_lobbies_and_chat_commit_durably(alice: Person) -> None:
    with CaptureQueriesContext(connection) as creating:
        services.session_create(name="Dora")
        services.lobby_create(
            name="durable", private=False, max_participants=4, created_by=Session.objects.get(pk=alice.id)
        )
    services.lobby_join(lobby_name="durable", session=Session.objects.get(pk=alice.id), channel_name="test.one")
    with CaptureQueriesContext(connection) as chatting:
        services.chat_send(lobby_name="durable", session_id=alice.id, channel_name="test.one", text="kept")

    assert (soft_commits(creating), soft_commits(chatting)) == (0, 0)
