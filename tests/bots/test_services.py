"""Bot assignments: adding, removing, restarting, and how workers claim them."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from bots import selectors, services
from bots.models import Assignment, Bot, Provider, Turn, Worker
from lobbies import services as lobby_services
from lobbies.models import Lobby
from lobbies.selectors import session_for_token


@pytest.fixture
def offline_provider(transactional_db: None) -> Provider:
    return Provider.objects.create(name="offline", kind=Provider.Kind.OFFLINE)


@pytest.fixture
def ava(offline_provider: Provider) -> Bot:
    return Bot.objects.create(name="Ava", provider=offline_provider, greeting="Hello {name}!", max_lobbies=2)


def make_lobby(name: str) -> Lobby:
    creator, _ = lobby_services.session_create(name="Creator")
    return lobby_services.lobby_create(name=name, private=False, max_participants=12, created_by=creator)


def register_worker(capacity: int = 8) -> Worker:
    return services.worker_register(capacity=capacity)


def test_an_added_bot_gets_its_own_bot_session(ava: Bot) -> None:
    assignment = services.bot_add_to_lobby(bot=ava, lobby=make_lobby("kitchen"))

    assert assignment.status == Assignment.Status.PENDING
    assert assignment.session.is_bot and assignment.session.name == "Ava"


def test_a_bot_is_in_a_lobby_once_and_in_at_most_its_limit_of_lobbies(ava: Bot) -> None:
    services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    with pytest.raises(services.BotUnavailable, match="already in one"):
        services.bot_add_to_lobby(bot=ava, lobby=Lobby.objects.get(name="one"))
    services.bot_add_to_lobby(bot=ava, lobby=make_lobby("two"))
    with pytest.raises(services.BotUnavailable, match="2 lobbies"):
        services.bot_add_to_lobby(bot=ava, lobby=make_lobby("three"))


def test_a_disabled_bot_cannot_be_added(ava: Bot) -> None:
    ava.enabled = False
    ava.save()
    with pytest.raises(services.BotUnavailable, match="disabled"):
        services.bot_add_to_lobby(bot=ava, lobby=make_lobby("kitchen"))


def test_a_claim_gives_the_bot_a_new_token_and_the_old_one_stops_working(ava: Bot) -> None:
    services.bot_add_to_lobby(bot=ava, lobby=make_lobby("kitchen"))
    first_worker, second_worker = register_worker(), register_worker()
    [first] = services.assignments_claim(worker_id=first_worker.pk, limit=5)
    assert session_for_token(first.token).pk.hex == first.session_id.replace("-", "")

    Worker.objects.filter(pk=first_worker.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    [second] = services.assignments_claim(worker_id=second_worker.pk, limit=5)

    assert second.session_id == first.session_id
    assert session_for_token(first.token) is None
    assert session_for_token(second.token) is not None


def test_a_live_workers_claims_are_not_taken_and_a_dead_ones_are(ava: Bot) -> None:
    services.bot_add_to_lobby(bot=ava, lobby=make_lobby("kitchen"))
    alive, other = register_worker(), register_worker()
    assert len(services.assignments_claim(worker_id=alive.pk, limit=5)) == 1

    assert services.assignments_claim(worker_id=other.pk, limit=5) == []
    Worker.objects.filter(pk=alive.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert len(services.assignments_claim(worker_id=other.pk, limit=5)) == 1
    # The stalled worker learns at its next heartbeat that the bot is no longer its own.
    assert services.worker_heartbeat(worker_id=alive.pk) == set()


def test_workers_claiming_at_once_never_take_the_same_assignment(offline_provider: Provider) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks with SKIP LOCKED are what is tested; run on Postgres")
    for index in range(40):
        bot = Bot.objects.create(name=f"Bot {index}", provider=offline_provider)
        services.bot_add_to_lobby(bot=bot, lobby=make_lobby(f"room-{index}"))
    workers = [register_worker() for _ in range(4)]
    claimed: dict[int, list[int]] = {worker.pk: [] for worker in workers}
    start = threading.Barrier(len(workers))

    def claim_all(worker: Worker) -> None:
        start.wait()
        try:
            while claims := services.assignments_claim(worker_id=worker.pk, limit=3):
                claimed[worker.pk].extend(claim.assignment_id for claim in claims)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim_all, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    every_claim = [assignment_id for ids in claimed.values() for assignment_id in ids]
    assert sorted(every_claim) == sorted(Assignment.objects.values_list("pk", flat=True))
    assert len(set(every_claim)) == 40
    # Each assignment is recorded as held by the worker that got it.
    for worker_id, ids in claimed.items():
        assert set(Assignment.objects.filter(worker_id=worker_id).values_list("pk", flat=True)) == set(ids)


def test_a_claim_takes_no_more_than_the_workers_free_places(offline_provider: Provider) -> None:
    for index in range(5):
        bot = Bot.objects.create(name=f"Bot {index}", provider=offline_provider)
        services.bot_add_to_lobby(bot=bot, lobby=make_lobby(f"room-{index}"))
    worker = register_worker()

    assert len(services.assignments_claim(worker_id=worker.pk, limit=2)) == 2
    assert len(services.assignments_claim(worker_id=worker.pk, limit=0)) == 0


def test_removing_and_restarting_take_the_bot_from_its_worker(ava: Bot) -> None:
    removed = services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    restarted = services.bot_add_to_lobby(bot=ava, lobby=make_lobby("two"))
    worker = register_worker()
    services.assignments_claim(worker_id=worker.pk, limit=5)
    assert services.worker_heartbeat(worker_id=worker.pk) == {removed.pk, restarted.pk}

    assert services.bot_remove_from_lobby(assignment=removed)
    assert services.bot_restart(assignment=restarted)

    assert services.worker_heartbeat(worker_id=worker.pk) == set()
    assert not services.bot_remove_from_lobby(assignment=removed)
    # A restarted bot is free for any worker, this one included.
    [claim] = services.assignments_claim(worker_id=worker.pk, limit=5)
    assert claim.assignment_id == restarted.pk


def test_disabling_a_bot_takes_it_from_its_worker(ava: Bot) -> None:
    services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    worker = register_worker()
    services.assignments_claim(worker_id=worker.pk, limit=5)
    Bot.objects.filter(pk=ava.pk).update(enabled=False)

    assert services.worker_heartbeat(worker_id=worker.pk) == set()
    assert services.assignments_claim(worker_id=worker.pk, limit=5) == []


def test_a_stopping_worker_hands_its_bots_back_at_once(ava: Bot) -> None:
    assignment = services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    stopping, other = register_worker(), register_worker()
    services.assignments_claim(worker_id=stopping.pk, limit=5)

    services.worker_stop(worker_id=stopping.pk)

    assignment.refresh_from_db()
    assert assignment.status == Assignment.Status.PENDING and assignment.worker is None
    assert len(services.assignments_claim(worker_id=other.pk, limit=5)) == 1


def test_a_worker_restarted_on_the_same_machine_ends_its_dead_predecessor(ava: Bot) -> None:
    services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    predecessor = register_worker()
    services.assignments_claim(worker_id=predecessor.pk, limit=5)
    # A pid no process has: the predecessor died without stopping.
    Worker.objects.filter(pk=predecessor.pk).update(pid=2**22 + 7)

    successor = register_worker()

    assert len(services.assignments_claim(worker_id=successor.pk, limit=5)) == 1


def test_status_is_recorded_only_for_the_worker_holding_the_bot(ava: Bot) -> None:
    assignment = services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    holder, stranger = register_worker(), register_worker()
    services.assignments_claim(worker_id=holder.pk, limit=5)

    services.assignment_set_status(assignment_id=assignment.pk, worker_id=holder.pk, status="error", error="Provider down")
    services.assignment_set_status(assignment_id=assignment.pk, worker_id=stranger.pk, status="in_room")

    assignment.refresh_from_db()
    assert (assignment.status, assignment.last_error) == ("error", "Provider down")
    since = assignment.status_since
    services.assignment_set_status(assignment_id=assignment.pk, worker_id=holder.pk, status="error", error="Still down")
    assignment.refresh_from_db()
    assert assignment.status_since == since and assignment.last_error == "Still down"


def test_history_past_retention_is_pruned_and_analytics_count_the_rest(ava: Bot, settings) -> None:
    settings.BOT_HISTORY_RETENTION_DAYS = 7
    assignment = services.bot_add_to_lobby(bot=ava, lobby=make_lobby("one"))
    old = services.turn_record(assignment_id=assignment.pk, source="voice", user_text="old", first_audio_ms=900.0)
    Turn.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=8))
    for latency in range(100, 2100, 100):
        services.turn_record(assignment_id=assignment.pk, source="voice", user_text="hi", first_audio_ms=float(latency))
    services.turn_record(assignment_id=assignment.pk, source="chat", user_text="hi", error="Provider down")

    assert services.turns_prune() == 1

    figures = selectors.bot_analytics(bot=ava)
    assert figures["turns"] == 21 and figures["errors"] == 1
    assert figures["first_audio_avg_ms"] == pytest.approx(1050.0)
    assert figures["first_audio_p95_ms"] == 1900.0


def test_a_bot_joins_a_lobby_with_a_password_without_it_and_people_still_need_it(ava: Bot) -> None:
    creator, _ = lobby_services.session_create(name="Creator")
    lobby = lobby_services.lobby_create(
        name="vault", private=True, max_participants=12, created_by=creator, password="open sesame"
    )
    assignment = services.bot_add_to_lobby(bot=ava, lobby=lobby)

    joined = lobby_services.lobby_join(lobby_name="vault", session=assignment.session, channel_name="bot-channel")

    assert joined.peer["bot"] is True
    stranger, _ = lobby_services.session_create(name="Mallory")
    with pytest.raises(lobby_services.BadPassword):
        lobby_services.lobby_join(lobby_name="vault", session=stranger, channel_name="mallory-channel")
