"""runbots workers against a real server on Postgres and Redis: admin actions
take effect live, no bot runs twice, and bots come back from a dead worker."""

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from bots import services
from bots.models import Assignment, Bot, Provider
from lobbies.models import Lobby, Membership
from tests.bots.conftest import WorkerProcess
from tests.conftest import LiveClient, LiveServer

pytestmark = pytest.mark.usefixtures("close_thread_connections")

# The workers' timeout (tests/bots/conftest.py), one heartbeat to notice, two seconds to rejoin.
BOUND_SECONDS = 3 + 1 + 2


def make_bots(count: int) -> list[Bot]:
    provider = Provider.objects.create(name="offline", kind=Provider.Kind.OFFLINE)
    return [Bot.objects.create(name=f"Bot{index}", provider=provider, greeting="") for index in range(count)]


async def wait_for(client: LiveClient, matches: Callable[[dict], bool], timeout: float) -> dict:
    """The first frame that matches, skipping others (a bot's offers, for example)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching frame in time"
        frame = await client.receive(timeout=left)
        if matches(frame):
            return frame


async def assignment_when(assignment: Assignment, done: Callable[[Assignment], bool], timeout: float = 5) -> Assignment:
    """The assignment as soon as `done` holds for it (the worker records changes a moment later), or at the timeout."""
    deadline = time.monotonic() + timeout
    while not done(assignment) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        await assignment.arefresh_from_db()
    return assignment


def bot_joined(name: str) -> Callable[[dict], bool]:
    return lambda frame: frame["type"] == "peer_joined" and frame["peer"]["bot"] and frame["peer"]["name"] == name


async def test_admin_actions_add_and_remove_a_bot_live(
    start_production_server: Callable[..., LiveServer], start_bot_worker: Callable[..., WorkerProcess], staff_client: Client
) -> None:
    server = start_production_server()
    await sync_to_async(start_bot_worker)(server)
    [ava] = await sync_to_async(make_bots)(1)
    alice = LiveClient(server, "Alice")
    await alice.join("kitchen")
    lobby = await Lobby.objects.aget(name="kitchen")

    started = time.monotonic()
    response = await sync_to_async(staff_client.post)(
        "/admin/bots/bot/", {"action": "add_to_lobby", "_selected_action": [ava.pk], "lobby": lobby.pk}
    )
    assert response.status_code == 302
    joined = await wait_for(alice, bot_joined("Bot0"), timeout=2)
    print(f"bot in the room {1000 * (time.monotonic() - started):.0f} ms after the admin action")
    assert joined["peer"]["state"] == "connected"

    assignment = await Assignment.objects.aget(bot=ava, lobby=lobby)
    started = time.monotonic()
    response = await sync_to_async(staff_client.post)(
        "/admin/bots/assignment/", {"action": "remove_from_lobby", "_selected_action": [assignment.pk]}
    )
    assert response.status_code == 302
    await wait_for(alice, lambda frame: frame == {"type": "peer_left", "peer_id": joined["peer"]["peer_id"]}, timeout=2)
    print(f"bot gone {1000 * (time.monotonic() - started):.0f} ms after the admin action")
    await alice.close()


async def test_restart_brings_the_bot_back_as_the_same_peer(
    start_production_server: Callable[..., LiveServer], start_bot_worker: Callable[..., WorkerProcess], staff_client: Client
) -> None:
    server = start_production_server()
    await sync_to_async(start_bot_worker)(server)
    [ava] = await sync_to_async(make_bots)(1)
    alice = LiveClient(server, "Alice")
    await alice.join("kitchen")
    assignment = await sync_to_async(services.bot_add_to_lobby)(bot=ava, lobby=await Lobby.objects.aget(name="kitchen"))
    joined = await wait_for(alice, bot_joined("Bot0"), timeout=5)

    response = await sync_to_async(staff_client.post)(
        "/admin/bots/assignment/", {"action": "restart", "_selected_action": [assignment.pk]}
    )
    assert response.status_code == 302

    # It leaves and joins again; the others see the same peer come back.
    bot_id = joined["peer"]["peer_id"]
    await wait_for(alice, lambda frame: frame == {"type": "peer_left", "peer_id": bot_id}, timeout=3)
    back = await wait_for(alice, bot_joined("Bot0"), timeout=3)
    assert back["peer"]["peer_id"] == bot_id
    await alice.close()


async def test_two_workers_never_run_one_bot_twice_and_a_dead_workers_bots_come_back(
    start_production_server: Callable[..., LiveServer], start_bot_worker: Callable[..., WorkerProcess]
) -> None:
    server = start_production_server()
    first = await sync_to_async(start_bot_worker)(server, capacity=2)
    second = await sync_to_async(start_bot_worker)(server, capacity=2)
    bots = await sync_to_async(make_bots)(4)
    alice = LiveClient(server, "Alice")
    await alice.join("hall")
    hall = await Lobby.objects.aget(name="hall")
    for bot in bots:
        await sync_to_async(services.bot_add_to_lobby)(bot=bot, lobby=hall)

    bot_ids = {}
    for _ in bots:
        joined = await wait_for(alice, lambda frame: frame["type"] == "peer_joined", timeout=10)
        bot_ids[joined["peer"]["name"]] = joined["peer"]["peer_id"]
    assert sorted(bot_ids) == ["Bot0", "Bot1", "Bot2", "Bot3"]
    # Nobody is replaced, nobody joins twice: the room stays as it is.
    with pytest.raises(TimeoutError):
        await wait_for(alice, lambda frame: frame["type"] in ("peer_joined", "peer_left", "peer_updated"), timeout=3)
    holders = await sync_to_async(lambda: sorted(Assignment.objects.values_list("worker__pid", flat=True)))()
    assert holders == sorted([first.process.pid] * 2 + [second.process.pid] * 2)

    spare = await sync_to_async(start_bot_worker)(server, capacity=4)
    first_bots = await sync_to_async(
        lambda: set(Assignment.objects.filter(worker__pid=first.process.pid).values_list("session_id", flat=True))
    )()
    first.process.kill()
    killed_at = time.monotonic()
    back: set[str] = set()
    while back != {str(session_id) for session_id in first_bots}:
        frame = await wait_for(alice, lambda frame: frame["type"] == "peer_updated", timeout=BOUND_SECONDS + 2)
        if frame["peer"]["state"] == "connected":
            back.add(frame["peer"]["peer_id"])
    print(f"a killed worker's bots back in {time.monotonic() - killed_at:.1f} s")
    assert time.monotonic() - killed_at < BOUND_SECONDS + 2

    # SIGTERM: the bots leave cleanly at once, the worker exits, another takes them.
    second_bots = await sync_to_async(
        lambda: {str(i) for i in Assignment.objects.filter(worker__pid=second.process.pid).values_list("session_id", flat=True)}
    )()
    second.process.send_signal(signal.SIGTERM)
    left = set()
    while left != second_bots:
        frame = await wait_for(alice, lambda frame: frame["type"] == "peer_left", timeout=5)
        left.add(frame["peer_id"])
    assert await asyncio.to_thread(second.process.wait, 10) == 0
    rejoined = set()
    while rejoined != second_bots:
        frame = await wait_for(alice, lambda frame: frame["type"] == "peer_joined", timeout=5)
        rejoined.add(frame["peer"]["peer_id"])
    holders = await sync_to_async(lambda: set(Assignment.objects.values_list("worker__pid", flat=True)))()
    assert holders == {spare.process.pid}
    await alice.close()


async def test_a_failing_provider_costs_only_its_own_bot_an_apology(
    start_production_server: Callable[..., LiveServer], start_bot_worker: Callable[..., WorkerProcess]
) -> None:
    server = start_production_server()
    await sync_to_async(start_bot_worker)(server)

    def make_pair() -> tuple[Bot, Bot]:
        # Nothing listens on port 9 of loopback: every call fails at once.
        dead = Provider.objects.create(name="dead", kind=Provider.Kind.OPENAI, base_url="http://127.0.0.1:9/v1", timeout_seconds=0.5, max_retries=0)
        offline = Provider.objects.create(name="offline", kind=Provider.Kind.OFFLINE)
        return Bot.objects.create(name="Broken", provider=dead), Bot.objects.create(name="Fine", provider=offline)

    broken, fine = await sync_to_async(make_pair)()
    alice, bob = LiveClient(server, "Alice"), LiveClient(server, "Bob")
    await alice.join("first")
    await bob.join("second")
    await sync_to_async(services.bot_add_to_lobby)(bot=broken, lobby=await Lobby.objects.aget(name="first"))
    await sync_to_async(services.bot_add_to_lobby)(bot=fine, lobby=await Lobby.objects.aget(name="second"))
    await wait_for(alice, bot_joined("Broken"), timeout=5)
    await wait_for(bob, bot_joined("Fine"), timeout=5)

    await alice.send({"type": "chat", "text": "Broken, what is the capital of France?"})
    await bob.send({"type": "chat", "text": "Fine, what is the capital of France?"})

    apology = await wait_for(alice, lambda frame: frame["type"] == "chat" and frame["name"] == "Broken", timeout=10)
    answer = await wait_for(bob, lambda frame: frame["type"] == "chat" and frame["name"] == "Fine", timeout=10)
    assert apology["text"] == "Sorry, I can't answer right now."
    assert "Paris" in answer["text"]
    # The status is recorded just after the apology is written.
    assignment = await assignment_when(await Assignment.objects.aget(bot=broken), lambda a: a.status == Assignment.Status.ERROR)
    assert assignment.status == Assignment.Status.ERROR and "dead" in assignment.last_error
    assert (await Assignment.objects.aget(bot=fine)).status != Assignment.Status.ERROR
    await alice.close()
    await bob.close()


async def test_a_kicked_bot_is_removed_from_the_lobby(
    start_production_server: Callable[..., LiveServer], start_bot_worker: Callable[..., WorkerProcess], staff_client: Client
) -> None:
    server = start_production_server()
    await sync_to_async(start_bot_worker)(server)
    [bot] = await sync_to_async(make_bots)(1)
    alice = LiveClient(server, "Alice")
    await alice.join("kitchen")
    await sync_to_async(services.bot_add_to_lobby)(bot=bot, lobby=await Lobby.objects.aget(name="kitchen"))
    joined = await wait_for(alice, bot_joined("Bot0"), timeout=5)
    membership = await Membership.objects.aget(session_id=joined["peer"]["peer_id"], left_at__isnull=True)

    response = await sync_to_async(staff_client.post)(
        "/admin/lobbies/membership/", {"action": "kick", "_selected_action": [membership.pk]}
    )

    assert response.status_code == 302
    await wait_for(alice, lambda frame: frame == {"type": "peer_left", "peer_id": joined["peer"]["peer_id"]}, timeout=3)
    assignment = await assignment_when(await Assignment.objects.aget(bot=bot), lambda a: a.removed_at is not None)
    assert assignment.removed_at is not None
    # It stays out: nobody claims a removed assignment.
    with pytest.raises(TimeoutError):
        await wait_for(alice, bot_joined("Bot0"), timeout=3)
    await alice.close()


async def test_a_bot_with_no_place_in_a_full_lobby_says_so_and_joins_when_there_is_one(
    start_production_server: Callable[..., LiveServer], start_bot_worker: Callable[..., WorkerProcess]
) -> None:
    server = start_production_server()
    await sync_to_async(start_bot_worker)(server)
    [bot] = await sync_to_async(make_bots)(1)
    alice = LiveClient(server, "Alice")
    await alice.join("snug")
    await Lobby.objects.filter(name="snug").aupdate(max_participants=1)
    assignment = await sync_to_async(services.bot_add_to_lobby)(bot=bot, lobby=await Lobby.objects.aget(name="snug"))

    assignment = await assignment_when(assignment, lambda a: a.status == Assignment.Status.ERROR)
    assert assignment.last_error == "This lobby is full."

    # Room at last: the bot takes it at its next attempt (its backoff is short at first).
    await Lobby.objects.filter(name="snug").aupdate(max_participants=2)
    await wait_for(alice, bot_joined("Bot0"), timeout=15)
    await alice.close()
