"""The Redis channel layer delivers to channels of its own process without Redis,
and to channels of other processes through it."""

import asyncio
import signal
import time
import uuid

import pytest
import redis

from lobbies.layers import REDIS_TIMEOUT_SECONDS, RESUBSCRIBED, LocalFirstChannelLayer
from tests.conftest import OwnRedis


def publishes(url: str) -> int:
    """PUBLISH commands the Redis server has run so far."""
    return redis.Redis.from_url(url).info("commandstats").get("cmdstat_publish", {}).get("calls", 0)


@pytest.fixture
def layers(own_redis: OwnRedis) -> tuple[LocalFirstChannelLayer, LocalFirstChannelLayer]:
    """Two layers with one prefix: two server processes of one deployment, on
    a Redis of the test's own (which it may stop, and whose PUBLISH count
    nothing else moves)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return (
        LocalFirstChannelLayer(hosts=[own_redis.url], prefix=prefix),
        LocalFirstChannelLayer(hosts=[own_redis.url], prefix=prefix),
    )


async def test_a_channel_of_this_process_gets_the_message_without_redis(layers, own_redis) -> None:
    here, _ = layers
    channel = await here.new_channel()
    event = {"type": "lobby.deliver", "text": '{"type": "ice"}', "received_at": 1.5}
    before = publishes(own_redis.url)

    await here.send(channel, event)
    event["text"] = "changed after sending"

    assert await here.receive(channel) == {"type": "lobby.deliver", "text": '{"type": "ice"}', "received_at": 1.5}
    assert publishes(own_redis.url) == before
    await here.flush()


async def test_a_channel_of_another_process_gets_the_message_through_redis(layers, own_redis) -> None:
    here, there = layers
    channel = await there.new_channel()
    before = publishes(own_redis.url)

    await here.send(channel, {"type": "lobby.deliver", "text": "hello"})

    assert await there.receive(channel) == {"type": "lobby.deliver", "text": "hello"}
    assert publishes(own_redis.url) == before + 1
    await here.flush()
    await there.flush()


async def test_a_group_reaches_members_of_this_process_without_waiting_for_redis(layers, own_redis) -> None:
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


async def test_while_redis_is_away_a_group_message_still_reaches_this_process(layers, own_redis) -> None:
    here, _ = layers
    member = await here.new_channel()
    await here.group_add("lobby", member)
    own_redis.stop()

    # The caller learns that the other processes were not reached...
    with pytest.raises(redis.ConnectionError):
        await here.group_send("lobby", {"type": "lobby.peer_left", "peer_id": "p"})

    # ...after the members of this one were.
    assert await asyncio.wait_for(here.receive(member), 1) == {"type": "lobby.peer_left", "peer_id": "p"}


async def test_leaving_a_group_while_redis_is_away_does_not_fail(layers, own_redis) -> None:
    here, _ = layers
    member = await here.new_channel()
    await here.group_add("lobby", member)
    own_redis.stop()
    await asyncio.sleep(0.5)  # the subscriber connection's next poll finds it closed

    await asyncio.wait_for(here.group_discard("lobby", member), 1)

    with pytest.raises(redis.ConnectionError):
        await here.group_send("lobby", {"type": "lobby.peer_left", "peer_id": "p"})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(here.receive(member), 0.3)


async def test_once_redis_is_back_group_members_hear_it_and_groups_span_processes_again(
    layers, own_redis
) -> None:
    here, there = layers
    near, far, alone = await here.new_channel(), await there.new_channel(), await there.new_channel()
    await here.group_add("lobby", near)
    await there.group_add("lobby", far)
    own_redis.stop()
    own_redis.start()

    # redis-py reconnects on the receiving side's next poll, within about a second.
    assert await asyncio.wait_for(there.receive(far), 5) == {"type": RESUBSCRIBED}
    assert await asyncio.wait_for(here.receive(near), 5) == {"type": RESUBSCRIBED}
    await here.group_send("lobby", {"type": "lobby.peer_left", "peer_id": "p"})

    assert await asyncio.wait_for(there.receive(far), 2) == {"type": "lobby.peer_left", "peer_id": "p"}
    # A channel in no group had nothing to miss from a group.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(there.receive(alone), 0.3)
    await here.flush()
    await there.flush()


async def test_a_stalled_redis_fails_sends_in_bounded_time_while_this_process_delivers(layers, own_redis) -> None:
    """Redis that accepts connections but answers nothing (paused, swapping, stuck in a fork)."""
    here, there = layers
    remote = await there.new_channel()
    member = await here.new_channel()
    await here.group_add("lobby", member)
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(here.send(remote, {"type": "lobby.deliver", "text": "offer"}), 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(here.group_send("lobby", {"type": "lobby.peer_left", "peer_id": "p"}), 10)
        assert time.monotonic() - started < 2 * REDIS_TIMEOUT_SECONDS + 1
        assert await asyncio.wait_for(here.receive(member), 1) == {"type": "lobby.peer_left", "peer_id": "p"}
    finally:
        own_redis.process.send_signal(signal.SIGCONT)


async def test_many_sends_to_another_process_arrive_in_order_in_a_few_round_trips(
    layers, own_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there = layers
    channel = await there.new_channel()
    pipelines = []
    execute = redis.asyncio.client.Pipeline.execute

    async def counted_execute(self, *args, **kwargs):
        pipelines.append(len(self.command_stack))
        return await execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", counted_execute)
    before = publishes(own_redis.url)

    # As a relay to a peer and the lobby events of a storm do: many at once.
    await asyncio.gather(*(here.send(channel, {"type": "lobby.deliver", "text": str(n)}) for n in range(200)))

    assert [(await there.receive(channel))["text"] for _ in range(200)] == [str(n) for n in range(200)]
    assert publishes(own_redis.url) == before + 200
    assert sum(pipelines) == 200 and len(pipelines) <= 3
    await here.flush()
    await there.flush()


async def test_publishing_and_joining_a_subscribed_group_do_not_wait_behind_subscribes(layers) -> None:
    """channels-redis holds a shard's lock while it subscribes, and held it for
    every PUBLISH's round trip: in a reconnect storm, joins timed out behind it."""
    here, there = layers
    member, newcomer = await here.new_channel(), await here.new_channel()
    elsewhere = await there.new_channel()
    await here.group_add("lobby", member)
    shard = here._get_layer()._shards[0]

    async with shard._lock:  # as while a slow SUBSCRIBE is under way
        async with asyncio.timeout(1):
            await here.group_add("lobby", newcomer)
            await here.send(elsewhere, {"type": "lobby.deliver", "text": "offer"})
            await here.group_send("lobby", {"type": "lobby.peer_joined", "peer": {"peer_id": "newcomer"}})

    assert (await there.receive(elsewhere))["text"] == "offer"
    assert (await here.receive(newcomer))["type"] == "lobby.peer_joined"
    await here.flush()
    await there.flush()


async def test_a_process_subscribes_once_for_all_its_connections(layers, own_redis) -> None:
    here, there = layers
    channels = [await there.new_channel() for _ in range(50)]
    redis_client = redis.Redis.from_url(own_redis.url)
    prefix = there._get_layer().prefix

    # One subscription in Redis, however many connections the process holds.
    assert len(redis_client.pubsub_channels(f"{prefix}*")) == 1
    await asyncio.gather(*(here.send(channel, {"type": "lobby.deliver", "text": channel}) for channel in channels))
    for channel in channels:
        assert await there.receive(channel) == {"type": "lobby.deliver", "text": channel}

    # A connection that is gone: what is sent to it is dropped, and the others still get theirs.
    del there._get_layer().channels[channels[0]]
    await here.send(channels[0], {"type": "lobby.deliver", "text": "too late"})
    await here.send(channels[1], {"type": "lobby.deliver", "text": "still here"})
    assert await there.receive(channels[1]) == {"type": "lobby.deliver", "text": "still here"}
    await here.flush()
    await there.flush()
