"""The load-test scenarios. Each returns flat figures: name -> number.

Rooms scenarios sweep the offered rate upwards, step by step, and keep the
highest step the server sustained: every message delivered (within the drain
time after the step), p99 relay latency within the limit, and the generator
able to offer the rate.
"""

import asyncio
import itertools
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from lobbies.loadtest.clients import LoadClient, Step, Tally, create_lobby, create_sessions
from lobbies.loadtest.servers import Target
from lobbies.management.commands.benchjoins import percentile

# What a peer connection's negotiation looks like on the wire: an offer, an
# answer and a handful of ICE candidates.
SIGNAL_KINDS = ("offer", "answer", "ice", "ice", "ice", "ice", "ice", "ice")
CONNECTS_IN_FLIGHT = 50
DRAIN_SECONDS = 2.0
# The project's lobbies hold LOBBY_DEFAULT_MAX_PARTICIPANTS (12) unless created larger.
DEFAULT_LOBBY_SIZE = 12

Figures = dict[str, float | None]


@dataclass
class Options:
    pairs: int = 100
    rooms: int = 25
    room_size: int = 8
    fanout_size: int = 50
    idle: int = 1000
    step_seconds: float = 5.0
    start_rate: float = 250.0
    max_rate: float = 50_000.0
    growth: float = 1.5
    refinements: int = 2
    p99_limit_ms: float = 20.0
    idle_seconds: float = 5.0


def latency_ms(latencies: list[float], share: float) -> float | None:
    """A percentile of latencies in seconds, in milliseconds (share 1.0: the maximum)."""
    return 1000 * percentile(latencies, share) if latencies else None


async def limited(coroutines: list[Coroutine[Any, Any, Any]], in_flight: int) -> list[Any]:
    gate = asyncio.Semaphore(in_flight)

    async def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        async with gate:
            return await coroutine

    return await asyncio.gather(*(run(coroutine) for coroutine in coroutines), return_exceptions=True)


def raise_first(results: list[Any], what: str) -> None:
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(results)} {what} failed; first: {failures[0]!r}")


async def join_rooms(target: Target, rooms: int, size: int, tally: Tally) -> list[list[LoadClient]]:
    tokens = await asyncio.to_thread(create_sessions, target, rooms * size)
    prefix = f"load-{uuid.uuid4().hex[:6]}"
    if size > DEFAULT_LOBBY_SIZE:
        for room in range(rooms):
            await asyncio.to_thread(create_lobby, target, tokens[0], f"{prefix}-{room}", size)
    clients = [
        [LoadClient(target, room * size + seat, f"{prefix}-{room}", tokens[room * size + seat], tally) for seat in range(size)]
        for room in range(rooms)
    ]
    everyone = [client for room in clients for client in room]
    raise_first(await limited([client.connect() for client in everyone], CONNECTS_IN_FLIGHT), "connects")
    if not target.reference:
        # Nobody is addressed before every roster holds the whole room (the
        # reference relay keeps no roster).
        deadline = time.monotonic() + 10
        while any(client.peers_known < size - 1 for client in everyone):
            if time.monotonic() > deadline:
                raise RuntimeError("peer_joined events did not reach every client within 10 s")
            await asyncio.sleep(0.01)
    return clients


async def drive(rate: float, seconds: float, send: Callable[[int], Awaitable[None]]) -> tuple[int, float]:
    """Send rate × seconds messages, paced evenly; returns how many and how long
    that took (longer than `seconds` when the generator cannot keep up)."""
    total = max(1, round(rate * seconds))
    started = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int(rate * (time.perf_counter() - started)) + 1)
        while sent < due:
            await send(sent)
            sent += 1
        await asyncio.sleep(0.002)
    return sent, max(time.perf_counter() - started, seconds)


async def drain(step: Step, expected: int) -> None:
    """Wait for the step's messages still on their way, for DRAIN_SECONDS at most."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while step.received < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def sweep(
    name: str,
    target: Target,
    tally: Tally,
    send: Callable[[int, int], Awaitable[None]],
    deliveries_per_message: int,
    options: Options,
    progress: Callable[[str], None],
) -> Figures:
    """Raise the offered delivery rate by `growth` until a step fails, then
    narrow the limit down: `refinements` more steps, each halfway (on a log
    scale) between the highest rate passed and the lowest failed. Figures of
    the best step passed."""
    best: Figures = {f"{name}_rate": 0.0}
    # Each step its own number, so that late deliveries of one step never count for another.
    numbers = itertools.count(max(tally.steps, default=0) + 1)
    number = next(numbers)
    # A warm-up step, not judged: the first messages pay for connections and caches.
    warm_up = tally.step(number)
    rate = options.start_rate
    sent, _ = await drive(rate / deliveries_per_message, options.step_seconds / 2, lambda i: send(i, number))
    await drain(warm_up, sent * deliveries_per_message)
    del tally.steps[number]
    highest_passed: float | None = None
    lowest_failed: float | None = None
    loss_at_limit: int | None = None
    refinements = options.refinements
    while rate <= options.max_rate:
        passed, figures, lost = await judged_step(
            name, target, tally, numbers, send, deliveries_per_message, rate, options, progress
        )
        if passed:
            best, highest_passed = figures, rate
        else:
            loss_at_limit, lowest_failed = lost, rate
        if lowest_failed is None:
            rate *= options.growth
        elif highest_passed is None or refinements == 0:
            break
        else:
            refinements -= 1
            rate = math.sqrt(highest_passed * lowest_failed)
    return best if loss_at_limit is None else {**best, f"{name}_loss_at_limit": loss_at_limit}


async def judged_step(
    name: str,
    target: Target,
    tally: Tally,
    numbers: Iterator[int],
    send: Callable[[int, int], Awaitable[None]],
    deliveries_per_message: int,
    rate: float,
    options: Options,
    progress: Callable[[str], None],
) -> tuple[bool, Figures, int]:
    """Offer `rate` deliveries a second for a step: whether the server sustained
    it, the step's figures and how many deliveries were lost. A step failed for
    p99 alone is tried once more: one latency spike (a checkpoint, a
    collection) does not make a limit."""
    for _ in range(2):
        number = next(numbers)
        step = tally.step(number)
        cpu_before = target.cpu_seconds()
        generator_cpu_before = time.process_time()
        bytes_before = tally.bytes_received
        sent, elapsed = await drive(rate / deliveries_per_message, options.step_seconds, lambda i: send(i, number))
        expected = sent * deliveries_per_message
        await drain(step, expected)
        cpu_after = target.cpu_seconds()
        # The load generator is one Python process: near 100% of a core, it is the limit, not the server.
        generator_cpu_percent = 100 * (time.process_time() - generator_cpu_before) / elapsed
        rss = target.rss_bytes()
        lost = max(expected - step.received, 0)
        p99_ms = latency_ms(step.latencies, 0.99)
        offered_enough = elapsed <= 1.1 * options.step_seconds
        passed = lost == 0 and p99_ms is not None and p99_ms <= options.p99_limit_ms and offered_enough
        figures: Figures = {
            f"{name}_rate": step.received / elapsed,
            f"{name}_p50_ms": latency_ms(step.latencies, 0.5),
            f"{name}_p95_ms": latency_ms(step.latencies, 0.95),
            f"{name}_p99_ms": p99_ms,
            f"{name}_max_ms": latency_ms(step.latencies, 1.0),
            f"{name}_server_cpu_percent": None
            if cpu_before is None or cpu_after is None
            else 100 * (cpu_after - cpu_before) / elapsed,
            f"{name}_server_rss_mib": None if rss is None else rss / 2**20,
            f"{name}_generator_cpu_percent": generator_cpu_percent,
            f"{name}_wire_bytes_per_message": (tally.bytes_received - bytes_before) / max(step.received, 1),
        }
        verdict = "ok" if passed else ("lost messages" if lost else "p99 too high" if offered_enough else "generator fell behind")
        progress(
            f"  {name}: offered {rate:,.0f}/s, delivered {figures[f'{name}_rate']:,.0f}/s, lost {lost}, "
            f"p99 {fmt(p99_ms)} ms, server CPU {fmt(figures[f'{name}_server_cpu_percent'])} %, "
            f"generator CPU {fmt(generator_cpu_percent)} %: {verdict}"
        )
        del tally.steps[number]
        if verdict != "p99 too high":
            break
    return passed, figures, lost


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


async def rooms_scenario(
    name: str, target: Target, rooms: int, size: int, options: Options, progress: Callable[[str], None]
) -> Figures:
    """Everyone in each room sends offers, answers and ICE to everyone else in turn."""
    tally = Tally()
    clients = await join_rooms(target, rooms, size, tally)
    routes = [(sender, receiver.peer_id) for room in clients for sender in room for receiver in room if receiver is not sender]

    async def send(index: int, step: int) -> None:
        sender, to = routes[index % len(routes)]
        await sender.send_signal(SIGNAL_KINDS[(index // len(routes)) % len(SIGNAL_KINDS)], to, step)

    try:
        figures = await sweep(name, target, tally, send, 1, options, progress)
    finally:
        await asyncio.gather(*(client.close() for room in clients for client in room), return_exceptions=True)
    return {**figures, f"{name}_errors": sum(tally.errors.values())}


async def fanout_scenario(target: Target, options: Options, progress: Callable[[str], None]) -> Figures:
    """One big room; everyone chats in turn, and every chat goes to everyone else."""
    tally = Tally()
    [room] = await join_rooms(target, 1, options.fanout_size, tally)

    async def send(index: int, step: int) -> None:
        await room[index % len(room)].send_chat(step)

    try:
        figures = await sweep("fanout", target, tally, send, len(room) - 1, options, progress)
    finally:
        await asyncio.gather(*(client.close() for client in room), return_exceptions=True)
    return {**figures, "fanout_errors": sum(tally.errors.values())}


async def idle_and_storm_scenario(target: Target, options: Options, progress: Callable[[str], None]) -> Figures:
    """Many idle connections (connect rate, memory each), then all drop and resume at once."""
    tally = Tally()
    count = options.idle
    tokens = await asyncio.to_thread(create_sessions, target, count)
    prefix = f"idle-{uuid.uuid4().hex[:6]}"
    clients = [LoadClient(target, index, f"{prefix}-{index // 10}", tokens[index], tally) for index in range(count)]
    rss_before = target.rss_bytes()
    cpu_before, generator_cpu_before = target.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    raise_first(await limited([client.connect() for client in clients], CONNECTS_IN_FLIGHT), "connects")
    connect_seconds = time.perf_counter() - started
    cpu_after, generator_cpu_after = target.cpu_seconds(), time.process_time()
    await asyncio.sleep(options.idle_seconds)
    rss_after = target.rss_bytes()
    per_connection = None if rss_before is None or rss_after is None else (rss_after - rss_before) / count / 1024
    # What one connect costs each side: the two together must fit in the machine's cores.
    server_ms = None if cpu_before is None or cpu_after is None else 1000 * (cpu_after - cpu_before) / count
    generator_ms = 1000 * (generator_cpu_after - generator_cpu_before) / count
    progress(f"  idle: {count} connected in {connect_seconds:.2f} s ({count / connect_seconds:,.0f}/s), "
             f"{fmt(per_connection)} KiB of server memory each, CPU per connect: server {fmt(server_ms)} ms, "
             f"generator {fmt(generator_ms)} ms")

    for client in clients:
        client.drop()
    started = time.perf_counter()
    results = await asyncio.gather(*(client.connect() for client in clients), return_exceptions=True)
    storm_seconds = time.perf_counter() - started
    errors = [result for result in results if isinstance(result, BaseException)]
    failures = len(errors)
    progress(f"  storm: {count - failures} of {count} resumed in {storm_seconds:.2f} s, {failures} failed")
    if errors:
        reason, times = Counter(str(error) or repr(error) for error in errors).most_common(1)[0]
        progress(f"  storm: most common failure ({times}×): {reason[:200]}")
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return {
        "idle_connects_per_second": count / connect_seconds,
        "idle_kib_per_connection": per_connection,
        "idle_server_cpu_ms_per_connect": server_ms,
        "idle_generator_cpu_ms_per_connect": generator_ms,
        "storm_seconds": storm_seconds,
        "storm_connects_per_second": (count - failures) / storm_seconds,
        "storm_failures": failures,
        "idle_errors": sum(tally.errors.values()),
    }


SCENARIOS = ("pairs", "rooms", "fanout", "idle")


async def run_scenario(scenario: str, target: Target, options: Options, progress: Callable[[str], None]) -> Figures:
    if scenario == "pairs":
        return await rooms_scenario("pairs", target, options.pairs, 2, options, progress)
    if scenario == "rooms":
        return await rooms_scenario("rooms", target, options.rooms, options.room_size, options, progress)
    if scenario == "fanout":
        return await fanout_scenario(target, options, progress)
    return await idle_and_storm_scenario(target, options, progress)
