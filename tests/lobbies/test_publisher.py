"""Lobby events published by services reach the channel layer in order, and
flush() waits until everything published so far has."""

import threading

from channels.layers import InMemoryChannelLayer

from lobbies import publisher as publisher_module
from lobbies.publisher import Publisher


def queued(layer: InMemoryChannelLayer, channel: str) -> int:
    return layer.channels[channel].qsize() if channel in layer.channels else 0


async def test_flush_returns_once_every_event_published_so_far_was_handed_over(monkeypatch) -> None:
    layer = InMemoryChannelLayer()
    monkeypatch.setattr(publisher_module, "get_channel_layer", lambda: layer)
    channel = await layer.new_channel()
    await layer.group_add("lobby", channel)
    publisher = Publisher()
    publisher.attach()

    # As a service does after its transaction commits, from a worker thread.
    events = [{"type": "lobby.peer_joined", "number": number} for number in range(3)]
    # (joined while the loop is blocked, so the publisher's task cannot run yet)
    thread = threading.Thread(target=lambda: [publisher.publish(("group", "lobby", event)) for event in events])
    thread.start()
    thread.join()
    assert queued(layer, channel) == 0, "nothing is handed over until the publisher's task runs"

    await publisher.flush()

    # Already queued for the receiver: reading it needs no more turns of the loop.
    assert queued(layer, channel) == 3
    assert [await layer.receive(channel) for _ in events] == events
