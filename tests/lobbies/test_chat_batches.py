"""Chat messages stored together, in one transaction (services.chat_send_many),
come out exactly as if they had been sent one after the other; a server
process batches the messages that arrive while one batch is in the database."""

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from lobbies import consumers, services
from lobbies.models import ChatMessage, Session
from lobbies.services import ChatRequest, NotInLobby
from tests.conftest import Person, make_person
from tests.lobbies.test_consumers import joined

pytestmark = pytest.mark.django_db(transaction=True)


def join(person: Person, lobby: str, channel: str) -> None:
    services.lobby_join(lobby_name=lobby, session=Session.objects.get(pk=person.id), channel_name=channel)


def batch_totals() -> tuple[float, float]:
    """Messages and batches so far, from the voicebot_chat_batch_size histogram."""
    return (
        REGISTRY.get_sample_value("voicebot_chat_batch_size_sum"),
        REGISTRY.get_sample_value("voicebot_chat_batch_size_count"),
    )


def test_a_batch_stores_its_messages_in_order_and_refuses_only_the_connections_without_a_place(
    alice: Person, bob: Person, carol: Person
) -> None:
    join(alice, "north", "c.alice")
    join(bob, "south", "c.bob")
    join(carol, "north", "c.carol")

    outcomes = services.chat_send_many(
        requests=[
            ChatRequest(lobby_name="north", session_id=alice.id, channel_name="c.alice", text="one"),
            ChatRequest(lobby_name="south", session_id=bob.id, channel_name="c.bob", text="two"),
            # Carol's place is held through another connection.
            ChatRequest(lobby_name="north", session_id=carol.id, channel_name="c.elsewhere", text="lost"),
            ChatRequest(lobby_name="north", session_id=alice.id, channel_name="c.alice", text="three"),
        ]
    )

    assert isinstance(outcomes[2], NotInLobby)
    stored = [outcomes[0], outcomes[1], outcomes[3]]
    assert [(message.text, message.author_name, message.lobby.name) for message in stored] == [
        ("one", "Alice", "north"),
        ("two", "Bob", "south"),
        ("three", "Alice", "north"),
    ]
    assert [message.pk for message in stored] == sorted(message.pk for message in stored)
    assert list(ChatMessage.objects.values_list("text", flat=True)) == ["one", "two", "three"]


def test_a_batch_costs_the_same_few_statements_however_many_messages_it_holds() -> None:
    people = [make_person(f"P{number}") for number in range(12)]
    for index, person in enumerate(people):
        join(person, f"talk-{index % 3}", f"c.{index}")

    def statements(count: int) -> int:
        requests = [
            ChatRequest(lobby_name=f"talk-{index % 3}", session_id=person.id, channel_name=f"c.{index}", text="hi")
            for index, person in enumerate(people[:count])
        ]
        with CaptureQueriesContext(connection) as captured:
            outcomes = services.chat_send_many(requests=requests)
        assert all(isinstance(outcome, ChatMessage) for outcome in outcomes)
        return len(captured.captured_queries)

    assert statements(12) == statements(1)


@pytest.mark.usefixtures("channel_layer")
async def test_chat_sent_while_a_batch_is_in_the_database_goes_in_the_next_and_arrives_in_order() -> None:
    people = [await sync_to_async(make_person)(f"Guest {number}") for number in range(4)]
    clients = [await joined(person, "busy") for person in people]
    for client in clients:
        while not await client.receive_nothing(timeout=0.2):
            await client.receive_json_from()  # news of those who joined later
    before = batch_totals()
    # The chat thread is busy (as with a batch in the database) until released.
    release = threading.Event()
    consumers.CHAT_THREAD.submit(release.wait, 10)

    for number, client in enumerate(clients):
        await client.send_json_to({"type": "chat", "text": f"message {number}"})
    for _ in range(100):
        if len(consumers.chat_batches.waiting) >= len(clients) - 1:
            break
        await asyncio.sleep(0.02)
    release.set()

    received = [[await client.receive_json_from(timeout=5) for _ in clients] for client in clients]
    texts = sorted(frame["text"] for frame in received[0])
    assert texts == [f"message {number}" for number in range(4)]
    for frames in received:
        # Everyone gets every message once, in the order of their ids.
        assert [frame["id"] for frame in frames] == sorted({frame["id"] for frame in received[0]})
    messages, batches = (total - earlier for total, earlier in zip(batch_totals(), before))
    assert messages == 4 and batches <= 2
    for client in clients:
        await client.disconnect()
