"""`manage.py soak`: the short version on Postgres + Redis with two server
processes (latency and memory figures are for people to read, never asserted
here), its loss rule, and the runs it refuses."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from lobbies.loadtest.clients import LoadClient, Tally
from lobbies.loadtest.servers import Target
from lobbies.loadtest.soak import Delivery, Interval, Options, Seat, Soak
from tests.conftest import PROJECT_DIR, production_env


def soak(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "soak", *arguments],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=180,
    )


@pytest.fixture
def env(transactional_db: None, tmp_path: Path) -> dict[str, str]:
    return {**production_env(), "VOICEBOT_DATA_DIR": str(tmp_path)}


def test_the_short_soak_run_loses_nothing_and_reports_every_interval(env: dict[str, str], tmp_path: Path) -> None:
    figures = tmp_path / "soak.json"
    run = soak("--short", "--json", str(figures), env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Starting 2 server process(es) on Postgres + Redis, RATE_LIMITS=0" in run.stderr
    assert "40 clients joined 8 lobbies" in run.stderr
    # A progress line for the join and per interval, then the summary.
    assert run.stderr.count(" connected ") == 4
    for line in ("errors            0  (must be 0): ok", "messages lost     0  (must be 0): ok",
                 "p99 relay latency per interval (ms):", "server RSS", "result: PASSED"):
        assert line in run.stdout

    document = json.loads(figures.read_text())
    assert document["errors"] == {} and document["lost"] == 0 and document["failures"] == []
    assert document["processes"] == 2
    join, *intervals = document["intervals"]
    # On joining, each of the 40 greets the 4 others of its lobby.
    assert (join["signals"], join["chats"], join["drops"], join["lost"], join["errors"]) == (160, 0, 0, 0, 0)
    assert [interval["end"] for interval in intervals] == [5.0, 10.0, 15.0]
    for interval in intervals:
        assert interval["lost"] == 0 and interval["errors"] == 0
        assert interval["signals"] > 0 and interval["chats"] > 0 and interval["delivered"] > 0
        assert interval["rss_bytes"] > 0
    # Clients dropped and resumed (on the other process); at the end, all but those between the two are connected.
    assert sum(interval["drops"] for interval in intervals) >= 10
    assert intervals[-1]["connected"] >= 40 - 5
    assert document["rss_start_bytes"] and document["rss_end_bytes"]


def seat(index: int, tally: Tally) -> Seat:
    target = Target(name="unused", urls=["http://127.0.0.1:9"])
    return Seat(LoadClient(target, index, "soak-rule", "", tally), tally, lobby=0)


def test_the_loss_rule_counts_only_messages_both_ends_were_there_for() -> None:
    """What the judge makes of a message: delivered (perhaps late), lost, or excused by a drop."""
    soak_run = Soak(Target(name="unused", urls=["http://127.0.0.1:9"]), Options(deadline=1.0), print)
    soak_run.intervals.append(Interval(0, 0.0, 10.0))
    sender, receiver = seat(0, Tally()), seat(1, Tally())
    soak_run.seats = [sender, receiver]
    for each in (sender, receiver):
        each.connected = True

    def send(step: int, seconds_ago: float) -> Delivery:
        return soak_run.expect(sender, receiver, step, time.time() - seconds_ago)

    send(1, 0.1)  # arrived
    receiver.tally.steps[1].received = 1
    receiver.tally.steps[1].latencies.append(0.004)
    send(2, 0.1)  # on its way: not judged yet
    send(3, 2.0)  # overdue with both there: late so far, still waited for
    send(4, 2.0)  # the receiver dropped just before the deadline: excused
    send(5, 2.0)  # the sender dropped just before the deadline: excused
    send(6, 40.0)  # overdue for longer than it is waited for: lost
    soak_run.pending[3].receiver_epoch = 7
    receiver.ended[7] = time.time() - 1.5
    soak_run.pending[4].sender_epoch = 7
    sender.ended[7] = time.time() - 1.5

    soak_run.judge()
    interval = soak_run.intervals[0]
    assert (interval.delivered, interval.late, interval.lost, interval.excused) == (1, 0, 1, 2)
    assert interval.latencies == [0.004]
    assert [delivery.step for delivery in soak_run.pending] == [2, 3]
    assert interval.pending == 2
    # Judged steps are forgotten: nothing arriving afterwards is counted twice.
    assert set(receiver.tally.steps) == {2, 3}
    # A client waiting for an overdue message is not dropped: it could not tell late from lost.
    assert soak_run.awaits_overdue(receiver) and not soak_run.awaits_overdue(sender)
    assert soak_run.pick_connected(unless=soak_run.awaits_overdue) is sender

    receiver.tally.steps[3].received = 1
    receiver.tally.steps[3].latencies.append(1.9)
    soak_run.judge()
    assert (interval.delivered, interval.late, interval.lost) == (2, 1, 1)
    assert not soak_run.awaits_overdue(receiver)

    soak_run.judge(final=True)
    assert (interval.delivered, interval.lost, interval.pending) == (2, 2, 0)
    assert soak_run.pending == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--clients", "200", "--lobbies", "10"], "20 clients a lobby is more than a lobby holds (12): give more --lobbies."),
        (["--clients", "10", "--lobbies", "10"], "Every lobby needs at least two clients"),
        (["--short", "--minutes", "0"], "--minutes, --interval and --deadline must be more than zero."),
        (["--url", "http://192.0.2.10:8000"], "not on this machine; pass --allow-remote"),
    ],
)
def test_it_refuses_runs_it_cannot_do(arguments: list[str], message: str) -> None:
    with pytest.raises(CommandError) as refused:
        call_command("soak", *arguments)
    assert message in str(refused.value)


def test_a_signal_counts_once_the_senders_connection_surely_knows_the_receivers() -> None:
    soak_run = Soak(Target(name="unused", urls=["http://127.0.0.1:9"]), Options(), print)
    soak_run.intervals.append(Interval(0, 0.0, 10.0))
    alice, bob = seat(0, Tally()), seat(1, Tally())
    for each in (alice, bob):
        each.connected = True
    # Alice joined before Bob's connection was there: she heard of it only by an event.
    alice.connect_started, bob.connect_started, bob.connected_at = 1.0, 2.0, 3.0
    assert bob.routes_to(alice) and not alice.routes_to(bob)

    # Bob's offer reaches her: her server connection now routes her answer to him.
    soak_run.expect(bob, alice, 1, time.time(), routes=True)
    soak_run.judge()
    assert not alice.routes_to(bob)
    alice.tally.steps[1].received = 1
    alice.tally.steps[1].latencies.append(0.003)
    soak_run.judge()
    assert alice.routes_to(bob)

    # A drop of Bob's makes what she knew stale (his new roster has her), and a chat tells nothing about routes.
    bob.ended[bob.epoch] = time.time()
    bob.epoch += 1
    bob.connect_started = bob.connected_at = time.time()
    assert not alice.routes_to(bob) and bob.routes_to(alice)
    soak_run.expect(bob, alice, 2, time.time())
    alice.tally.steps[2].received = 1
    alice.tally.steps[2].latencies.append(0.003)
    soak_run.judge()
    assert not alice.routes_to(bob)
