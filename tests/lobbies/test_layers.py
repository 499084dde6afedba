"""The Redis channel layer delivers to channels of its own process without Redis,
and to channels of other processes through it."""

import asyncio
import uuid

import pytest
import redis

from lobbies.layers import LocalFirstChannelLayer


def publishes(url: str) -> int:
    """PUBLISH commands the Redis server has run so far."""
    return redis.Redis.from_url(url).info("commandstats").get("cmdstat_publish", {}).get("calls", 0)


@pytest.fixture
def layers(settings) -> tuple[LocalFirstChannelLayer, LocalFirstChannelLayer]:
    """Two layers with one prefix: two server processes of one deployment."""
    if not settings.REDIS_URL:
        pytest.fail("REDIS_URL is not set: run the suite with `bash tests/run.sh`.")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return (
        LocalFirstChannelLayer(hosts=[settings.REDIS_URL], prefix=prefix),
        LocalFirstChannelLayer(hosts=[settings.REDIS_URL], prefix=prefix),
    )


async def test_a_channel_of_this_process_gets_the_message_without_redis(layers, settings) -> None:
    here, _ = layers
    channel = await here.new_channel()
    event = {"type": "lobby.deliver", "text": '{"type": "ice"}', "received_at": 1.5}
    before = publishes(settings.REDIS_URL)

    await here.send(channel, event)
    event["text"] = "changed after sending"

    assert await here.receive(channel) == {"type": "lobby.deliver", "text": '{"type": "ice"}', "received_at": 1.5}
    assert publishes(settings.REDIS_URL) == before
    await here.flush()


async def test_a_channel_of_another_process_gets_the_message_through_redis(layers, settings) -> None:
    here, there = layers
    channel = await there.new_channel()
    before = publishes(settings.REDIS_URL)

    await here.send(channel, {"type": "lobby.deliver", "text": "hello"})

    assert await there.receive(channel) == {"type": "lobby.deliver", "text": "hello"}
    assert publishes(settings.REDIS_URL) == before + 1
    await here.flush()
    await there.flush()


async def test_a_group_reaches_members_of_this_process_without_waiting_for_redis(layers, settings) -> None:
    here, _ = layers
    member = await here.new_channel()
    await here.group_add("lobby", member)
    layer = here._get_layer()

    await here.group_send("lobby", {"type": "lobby.peer_joined", "peer": {"peer_id": "p"}})

    # Queued before group_send returned, not when Redis brings it back.
    assert layer.channels[member].qsize() >= 1
    assert await here.receive(member) == {"type": "lobby.peer_joined", "peer": {"peer_id": "p"}}
    await here.flush()


async def test_what_this_process_sends_arrives_in_the_order_it_was_sent(layers) -> None:
    here, _ = layers
    newcomer, member = await here.new_channel(), await here.new_channel()
    await here.group_add("lobby", member)

    await here.group_send("lobby", {"type": "lobby.peer_joined", "peer": {"peer_id": "newcomer"}})
    await here.send(member, {"type": "lobby.deliver", "text": "offer", "from": "newcomer", "channel": newcomer})

    assert (await here.receive(member))["type"] == "lobby.peer_joined"
    assert (await here.receive(member))["type"] == "lobby.deliver"
    await here.flush()


async def test_groups_still_reach_every_process_once(layers) -> None:
    here, there = layers
    near, far = await here.new_channel(), await there.new_channel()
    await here.group_add("lobby", near)
    await there.group_add("lobby", far)

    await here.group_send("lobby", {"type": "lobby.peer_left", "peer_id": "p"})

    assert await here.receive(near) == {"type": "lobby.peer_left", "peer_id": "p"}
    assert await there.receive(far) == {"type": "lobby.peer_left", "peer_id": "p"}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(here.receive(near), 0.3)
    await here.flush()
    await there.flush()
