"""The soak run behind `manage.py soak` (docs/performance.md#soak-run).

Many clients in many lobbies signal, chat, drop and resume for a long time,
and every message is accounted for. Each message carries a step number of its
own (the load test's marker), registered in the Tally of each client that must
receive it, so a receiver that misses it is known by name.

The loss rule: a message that arrives is delivered (late if after its
deadline, DEADLINE seconds after sending). It counts as lost if it never
arrives although, when it was sent, its receiver was connected, and both its
sender and its receiver stayed connected until the deadline. An offer, answer
or ICE candidate also needs the sender's server connection to have known the
receiver's current connection when it was sent, which the generator knows for
certain in two cases: the sender connected after the receiver's current
connection got its welcome (its roster had it), or the sender's connection has
received a message from the receiver's current connection (the server routes
replies from there). Otherwise that news travels as an event the clients do
not see, and the protocol loses a message for a peer it believes is
reconnecting without an error (docs/protocol.md#leaving-and-resume). So each
client, when it has (re)joined, sends an offer to everyone in its lobby, as a
browser renegotiates after a resume. "Never" is: not by OVERDUE_SECONDS after
the deadline (the generator does not drop a client while a message for it is
overdue, which would leave late and lost indistinguishable). Any other
message that did not arrive is excused (a peer dropped before the deadline)
or, if its receiver was absent in the sense above, not counted.
"""

import asyncio
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lobbies.loadtest.clients import LoadClient, Tally, create_sessions
from lobbies.loadtest.scenarios import latency_ms, limited
from lobbies.loadtest.servers import Target

# What a peer connection's negotiation looks like on the wire.
SIGNAL_KINDS = ("offer", "answer", "ice", "ice", "ice", "ice", "ice", "ice")
CONNECTS_IN_FLIGHT = 50
# A dropped client comes back after this long, as a browser's reconnect does.
RESUME_DELAY_SECONDS = (0.5, 3.0)
# Pending messages are judged this often: judging each on every tick would
# cost the generator more than sending.
JUDGE_EVERY_SECONDS = 0.1
TICK_SECONDS = 0.005
# How long a message that missed its deadline is still waited for, so that a
# slow message (on an overloaded machine) counts as late rather than lost.
OVERDUE_SECONDS = 30.0
WARM_UP_SHARE = 0.1
WARM_UP_LIMIT_SECONDS = 60.0


@dataclass
class Options:
    clients: int = 1000
    lobbies: int = 100
    seconds: float = 600.0
    rate: float = 500.0
    chat_rate: float = 20.0
    drop_rate: float = 2.0
    interval: float = 10.0
    deadline: float = 5.0
    # Percent; None: memory growth is reported but not judged.
    max_growth: float | None = 10.0
    seed: int | None = None


# The suite's version: everything the long run does, in seconds.
SHORT = {"clients": 40, "lobbies": 8, "seconds": 15.0, "rate": 100.0, "chat_rate": 5.0, "drop_rate": 1.0,
         "interval": 5.0, "max_growth": None}


def warm_up_seconds(options: Options) -> float:
    return min(WARM_UP_LIMIT_SECONDS, WARM_UP_SHARE * options.seconds)


class Seat:
    """One participant: a client, its own Tally, and the history of its connections.

    The epoch counts drops; `ended` holds when each past epoch's connection dropped.
    """

    def __init__(self, client: LoadClient, tally: Tally, lobby: int) -> None:
        self.client = client
        self.tally = tally
        self.lobby = lobby
        self.connected = False
        self.failed = False
        self.connect_started = 0.0
        self.connected_at = 0.0
        # Seat -> its epoch whose messages this seat's current connection has received.
        self.heard_from: dict[Seat, int] = {}
        self.epoch = 0
        self.ended: dict[int, float] = {}
        self.resumes = 0

    def stayed(self, epoch: int, until: float) -> bool:
        """Whether the connection of `epoch` lasted until `until`."""
        return self.epoch == epoch or self.ended[epoch] >= until

    def routes_to(self, receiver: "Seat") -> bool:
        """Whether this seat's server connection surely knows the receiver's current one."""
        return receiver.connected and (
            self.connect_started >= receiver.connected_at or self.heard_from.get(receiver) == receiver.epoch
        )


@dataclass
class Delivery:
    """One message to one receiver, until it is judged."""

    step: int
    sender: Seat
    sender_epoch: int
    receiver: Seat
    receiver_epoch: int
    sent_at: float
    interval: int
    # Whether the loss rule holds the server to it (else only its arrival counts).
    counted: bool = True
    # Whether its arrival tells the receiver's connection where the sender is (signals do, chat does not).
    routes: bool = False


@dataclass
class Interval:
    number: int
    start: float
    end: float
    signals: int = 0
    chats: int = 0
    drops: int = 0
    delivered: int = 0
    lost: int = 0
    late: int = 0
    excused: int = 0
    absent: int = 0
    pending: int = 0
    latencies: list[float] = field(default_factory=list)
    # Taken when the interval's time is over.
    closed: bool = False
    connected: int = 0
    errors: int = 0
    rss: int | None = None


@dataclass
class Report:
    options: Options
    processes: int
    intervals: list[Interval]
    errors: Counter
    rss_launch: int | None
    rss_start: int | None
    rss_end: int | None
    first_error: str = ""

    @property
    def lost(self) -> int:
        return sum(interval.lost for interval in self.intervals)

    @property
    def growth(self) -> float | None:
        if self.rss_start is None or self.rss_end is None:
            return None
        return 100 * (self.rss_end - self.rss_start) / self.rss_start

    def failures(self) -> list[str]:
        failed = []
        if sum(self.errors.values()):
            failed.append(f"{sum(self.errors.values())} error(s)")
        if self.lost:
            failed.append(f"{self.lost} message(s) lost")
        growth = self.growth
        if self.options.max_growth is not None and growth is not None and growth >= self.options.max_growth:
            failed.append(f"server memory grew {growth:.1f} % (limit {self.options.max_growth:g} %)")
        return failed


def label(interval: Interval) -> str:
    return "join" if interval.end == 0 else f"{interval.start:g}-{interval.end:g} s"


def mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


class Soak:
    def __init__(self, target: Target, options: Options, progress: Callable[[str], None]) -> None:
        self.target = target
        self.options = options
        self.progress = progress
        self.random = random.Random(options.seed)
        self.seats: list[Seat] = []
        self.lobbies: list[list[Seat]] = []
        self.pending: list[Delivery] = []
        self.intervals: list[Interval] = []
        self.printed = 0
        self.steps = 0
        self.started = 0.0
        # Errors the generator sees itself; those the server sends are in each seat's Tally.
        self.generator_errors: Counter = Counter()
        self.first_error = ""
        self.resuming: set[asyncio.Task] = set()
        self.totals: Counter = Counter()

    # Setting up and tearing down

    async def join(self) -> None:
        options = self.options
        size = math.ceil(options.clients / options.lobbies)
        tokens = await asyncio.to_thread(create_sessions, self.target, options.clients)
        prefix = f"soak-{uuid.uuid4().hex[:6]}"
        self.lobbies = [[] for _ in range(options.lobbies)]
        for index in range(options.clients):
            # Neighbouring indices go to different server processes, so each
            # lobby has members on every process.
            tally = Tally()
            lobby = index // size
            seat = Seat(LoadClient(self.target, index, f"{prefix}-{lobby}", tokens[index], tally), tally, lobby)
            self.seats.append(seat)
            self.lobbies[lobby].append(seat)
        started = time.perf_counter()
        results = await limited([self.connect(seat) for seat in self.seats], CONNECTS_IN_FLIGHT)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(results)} connects failed; first: {failures[0]!r}")
        # As a browser, nobody greets a peer before its server announced it.
        deadline = time.monotonic() + 10
        while any(seat.client.peers_known < len(self.lobbies[seat.lobby]) - 1 for seat in self.seats):
            if time.monotonic() > deadline:
                raise RuntimeError("peer_joined events did not reach every client within 10 s")
            await asyncio.sleep(0.01)
        for seat in self.seats:
            seat.connected = True
        self.progress(f"  {options.clients} clients joined {options.lobbies} lobbies in {time.perf_counter() - started:.1f} s")

    async def connect(self, seat: Seat, server_index: int | None = None) -> None:
        seat.heard_from = {}
        seat.connect_started = time.time()
        await seat.client.connect(server_index=server_index)
        seat.connected_at = time.time()

    async def greet(self, seat: Seat) -> None:
        """An offer to everyone else in the lobby, as a browser sends after joining or resuming."""
        for other in self.lobbies[seat.lobby]:
            if other is not seat and not other.failed:
                await self.send_signal(seat, other, "offer")

    async def leave(self) -> None:
        await asyncio.gather(*self.resuming, return_exceptions=True)
        await asyncio.gather(*(seat.client.close() for seat in self.seats), return_exceptions=True)

    # The load

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def interval_now(self) -> Interval:
        return self.intervals[-1]

    def pick_connected(self, unless: Callable[[Seat], bool] = lambda seat: False) -> Seat | None:
        for _ in range(50):
            seat = self.random.choice(self.seats)
            if seat.connected and not unless(seat):
                return seat
        return None

    def awaits_overdue(self, seat: Seat) -> bool:
        """Whether a message for `seat` is past its deadline and not judged yet."""
        due = time.time() - self.options.deadline
        return any(
            delivery.receiver is seat and delivery.counted and delivery.sent_at <= due for delivery in self.pending
        )

    def record_error(self, code: str, error: BaseException) -> None:
        self.generator_errors[code] += 1
        if not self.first_error:
            self.first_error = f"{code}: {error!r}"

    def expect(self, sender: Seat, receiver: Seat, step: int, now: float, counted: bool = True, routes: bool = False) -> Delivery:
        receiver.tally.step(step)
        delivery = Delivery(
            step, sender, sender.epoch, receiver, receiver.epoch, now, self.interval_now().number, counted, routes
        )
        self.pending.append(delivery)
        self.interval_now().pending += 1
        return delivery

    def forget(self, deliveries: list[Delivery]) -> None:
        """Deliveries of a message that was never sent."""
        for delivery in deliveries:
            self.pending.remove(delivery)
            self.intervals[delivery.interval].pending -= 1
            del delivery.receiver.tally.steps[delivery.step]

    async def send_random_signal(self) -> None:
        sender = self.pick_connected()
        if sender is None:
            return
        others = [seat for seat in self.lobbies[sender.lobby] if seat is not sender and not seat.failed]
        if others:
            receiver = self.random.choice(others)
            await self.send_signal(sender, receiver, SIGNAL_KINDS[self.steps % len(SIGNAL_KINDS)])

    async def send_signal(self, sender: Seat, receiver: Seat, kind: str) -> None:
        self.steps += 1
        step = self.steps
        deliveries = []
        # Registered whenever the receiver is there, so that its arrival shows the route.
        if receiver.connected:
            deliveries.append(self.expect(sender, receiver, step, time.time(), sender.routes_to(receiver), routes=True))
        try:
            await sender.client.send_signal(kind, receiver.client.peer_id, step)
        except Exception as error:
            self.forget(deliveries)
            self.record_error("send_failed", error)
            return
        self.interval_now().signals += 1
        self.interval_now().absent += not deliveries

    async def send_chat(self) -> None:
        sender = self.pick_connected()
        if sender is None:
            return
        self.steps += 1
        step = self.steps
        now = time.time()
        others = [seat for seat in self.lobbies[sender.lobby] if seat is not sender]
        deliveries = [self.expect(sender, seat, step, now) for seat in others if seat.connected]
        try:
            await sender.client.send_chat(step)
        except Exception as error:
            self.forget(deliveries)
            self.record_error("send_failed", error)
            return
        self.interval_now().chats += 1
        self.interval_now().absent += len(others) - len(deliveries)

    def drop(self) -> None:
        # Dropping a client that still waits for an overdue message would leave
        # no way to tell whether that message was late or lost.
        seat = self.pick_connected(unless=self.awaits_overdue)
        if seat is None:
            return
        seat.client.drop()
        seat.connected = False
        seat.ended[seat.epoch] = time.time()
        seat.epoch += 1
        self.interval_now().drops += 1
        task = asyncio.create_task(self.resume(seat))
        self.resuming.add(task)
        task.add_done_callback(self.resuming.discard)

    async def resume(self, seat: Seat) -> None:
        await asyncio.sleep(self.random.uniform(*RESUME_DELAY_SECONDS))
        seat.resumes += 1
        try:
            # On the next server process each time, as a load balancer may send it.
            await self.connect(seat, server_index=seat.client.index + seat.resumes)
        except Exception as error:
            seat.failed = True
            self.record_error("resume_failed", error)
            return
        # Only then is it picked to send, receive or drop again: its greeting
        # runs beside the main loop, which must not drop it mid-send.
        await self.greet(seat)
        seat.connected = True

    # Judging

    def judge(self, final: bool = False) -> None:
        now = time.time()
        waiting = []
        for delivery in self.pending:
            step = delivery.receiver.tally.steps[delivery.step]
            interval = self.intervals[delivery.interval]
            deadline = delivery.sent_at + self.options.deadline
            if step.received:
                interval.delivered += 1
                interval.late += step.latencies[0] > self.options.deadline
                interval.latencies.append(step.latencies[0])
                sender, receiver = delivery.sender, delivery.receiver
                if delivery.routes and sender.epoch == delivery.sender_epoch and receiver.epoch == delivery.receiver_epoch:
                    receiver.heard_from[sender] = sender.epoch
            elif not delivery.receiver.stayed(delivery.receiver_epoch, deadline):
                # The receiver's socket is gone: nothing can arrive on it any more.
                if delivery.counted:
                    interval.excused += 1
                else:
                    interval.absent += 1
            elif now < deadline and not final:
                waiting.append(delivery)
                continue
            elif not delivery.counted:
                interval.absent += 1
            elif not delivery.sender.stayed(delivery.sender_epoch, deadline):
                interval.excused += 1
            elif now < deadline + OVERDUE_SECONDS and not final:
                # Late so far, not lost.
                waiting.append(delivery)
                continue
            else:
                interval.lost += 1
            interval.pending -= 1
            del delivery.receiver.tally.steps[delivery.step]
        self.pending = waiting

    def errors(self) -> Counter:
        total = Counter(self.generator_errors)
        for seat in self.seats:
            total.update(seat.tally.errors)
        return total

    def close_interval(self, end: float) -> None:
        interval = self.interval_now()
        interval.closed = True
        interval.connected = sum(seat.connected for seat in self.seats)
        interval.errors = sum(self.errors().values())
        interval.rss = self.target.rss_bytes()
        if end < self.options.seconds:
            self.intervals.append(Interval(interval.number + 1, end, min(end + self.options.interval, self.options.seconds)))

    def print_ready(self) -> None:
        """A line for each interval whose messages are all judged, in order."""
        while self.printed < len(self.intervals):
            interval = self.intervals[self.printed]
            if not interval.closed or interval.pending:
                return
            for name in ("signals", "chats", "delivered", "lost"):
                self.totals[name] += getattr(interval, name)
            self.progress(
                f"  {label(interval):>8}  connected {interval.connected}/{self.options.clients}  "
                f"sent {self.totals['signals'] + self.totals['chats']:,}  received {self.totals['delivered']:,}  "
                f"lost {self.totals['lost']}  p99 {ms(latency_ms(interval.latencies, 0.99))} ms  "
                f"errors {interval.errors}  RSS {mib(interval.rss)} MiB"
            )
            self.printed += 1

    async def run(self) -> Report:
        options = self.options
        rss_launch = self.target.rss_bytes()
        await self.join()
        warm_up = warm_up_seconds(options)
        rss_start = None
        self.progress(
            f"  {options.rate:g} signals/s, {options.chat_rate:g} chats/s, {options.drop_rate:g} drops/s for "
            f"{options.seconds:g} s; memory from {warm_up:g} s on"
        )
        # The greetings of the join get a line of their own, before the time starts.
        self.intervals.append(Interval(0, 0.0, 0.0))
        for seat in self.seats:
            await self.greet(seat)
        while self.pending:
            self.judge()
            await asyncio.sleep(JUDGE_EVERY_SECONDS)
        self.close_interval(0.0)
        self.print_ready()
        self.started = time.monotonic()
        sent: Counter = Counter()
        last_judged = 0.0
        while (elapsed := self.elapsed()) < options.seconds:
            while elapsed >= self.interval_now().end:
                self.close_interval(self.interval_now().end)
            while sent["signals"] < int(options.rate * elapsed):
                sent["signals"] += 1
                await self.send_random_signal()
            while sent["chats"] < int(options.chat_rate * elapsed):
                sent["chats"] += 1
                await self.send_chat()
            while sent["drops"] < int(options.drop_rate * elapsed):
                sent["drops"] += 1
                self.drop()
            if rss_start is None and elapsed >= warm_up:
                rss_start = self.target.rss_bytes()
            if elapsed - last_judged >= JUDGE_EVERY_SECONDS:
                last_judged = elapsed
                self.judge()
                self.print_ready()
            await asyncio.sleep(TICK_SECONDS)
        self.close_interval(options.seconds)
        rss_end = self.interval_now().rss
        # Clients still resuming come back (and greet) before the last messages are judged.
        await asyncio.gather(*self.resuming, return_exceptions=True)
        while self.pending:
            self.judge()
            self.print_ready()
            await asyncio.sleep(JUDGE_EVERY_SECONDS)
        self.print_ready()
        errors = self.errors()
        await self.leave()
        return Report(
            options=options,
            processes=len(self.target.urls),
            intervals=self.intervals,
            errors=errors,
            rss_launch=rss_launch,
            rss_start=rss_start,
            rss_end=rss_end,
            first_error=self.first_error,
        )


async def run(target: Target, options: Options, progress: Callable[[str], None]) -> Report:
    soak = Soak(target, options, progress)
    try:
        return await soak.run()
    except BaseException:
        await soak.leave()
        raise


def summary(report: Report) -> str:
    """The interval table and the verdicts."""
    options = report.options
    header = ["interval", "connected", "signals", "chats", "drops", "delivered", "late", "lost", "excused", "absent",
              "p50 ms", "p99 ms", "max ms", "errors", "RSS MiB"]
    rows = [header]
    for interval in report.intervals:
        rows.append([
            label(interval), f"{interval.connected}", f"{interval.signals:,}",
            f"{interval.chats:,}", f"{interval.drops:,}", f"{interval.delivered:,}", f"{interval.late:,}", f"{interval.lost:,}",
            f"{interval.excused:,}", f"{interval.absent:,}", ms(latency_ms(interval.latencies, 0.5)),
            ms(latency_ms(interval.latencies, 0.99)), ms(latency_ms(interval.latencies, 1.0)),
            f"{interval.errors}", mib(interval.rss),
        ])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    table = "\n".join(
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    )
    error_count = sum(report.errors.values())
    delivered = sum(interval.delivered for interval in report.intervals)
    late = sum(interval.late for interval in report.intervals)
    excused = sum(interval.excused for interval in report.intervals)
    absent = sum(interval.absent for interval in report.intervals)
    growth = report.growth
    if options.max_growth is None:
        memory_verdict = "not judged (short run)"
    elif growth is None:
        memory_verdict = "not judged (server memory unknown: give --server-pid)"
    else:
        memory_verdict = "ok" if growth < options.max_growth else "FAILED"
    p99s = " ".join(ms(latency_ms(interval.latencies, 0.99)) for interval in report.intervals)
    breakdown = ", ".join(f"{code} {count}" for code, count in sorted(report.errors.items()))
    lines = [
        f"Soak run: {options.clients} clients in {options.lobbies} lobbies, {report.processes} server process(es), "
        f"{options.seconds:g} s; offered {options.rate:g} signals/s, {options.chat_rate:g} chats/s, "
        f"{options.drop_rate:g} drops and resumes/s",
        "",
        table,
        "",
        f"errors            {error_count}  (must be 0): {'ok' if not error_count else 'FAILED'}"
        + (f" [{breakdown}]" if breakdown else ""),
        f"messages lost     {report.lost}  (must be 0): {'ok' if not report.lost else 'FAILED'}",
        f"deliveries        {delivered:,} delivered ({late:,} of them after the {options.deadline:g} s deadline), "
        f"{report.lost:,} lost; not "
        f"counted: {excused:,} excused (a peer dropped before the deadline), {absent:,} to absent receivers",
        f"p99 relay latency per interval (ms): {p99s}",
        f"server RSS        {mib(report.rss_launch)} MiB at launch, {mib(report.rss_start)} MiB after "
        f"{warm_up_seconds(options):g} s of warm-up, {mib(report.rss_end)} MiB at the end: growth "
        f"{'–' if growth is None else f'{growth:.1f}'} %"
        + ("" if options.max_growth is None else f" (must be < {options.max_growth:g} %)") + f": {memory_verdict}",
    ]
    if report.first_error:
        lines.append(f"first generator error: {report.first_error}")
    failures = report.failures()
    lines.append("result: " + ("PASSED" if not failures else "FAILED: " + "; ".join(failures)))
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    return {
        "options": vars(report.options),
        "processes": report.processes,
        "intervals": [
            {
                "start": interval.start,
                "end": interval.end,
                "connected": interval.connected,
                "signals": interval.signals,
                "chats": interval.chats,
                "drops": interval.drops,
                "delivered": interval.delivered,
                "late": interval.late,
                "lost": interval.lost,
                "excused": interval.excused,
                "absent": interval.absent,
                "p50_ms": latency_ms(interval.latencies, 0.5),
                "p99_ms": latency_ms(interval.latencies, 0.99),
                "max_ms": latency_ms(interval.latencies, 1.0),
                "errors": interval.errors,
                "rss_bytes": interval.rss,
            }
            for interval in report.intervals
        ],
        "errors": dict(report.errors),
        "lost": report.lost,
        "rss_launch_bytes": report.rss_launch,
        "rss_start_bytes": report.rss_start,
        "rss_end_bytes": report.rss_end,
        "rss_growth_percent": report.growth,
        "failures": report.failures(),
    }
