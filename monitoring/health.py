"""Health checks for the readiness probe and the detailed health page.

Every check is a django-health-check `HealthCheck`. Checks say nothing about
connection URLs: their messages end up in public responses.
"""

import asyncio
import dataclasses
import datetime
import inspect
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections
from django.utils import timezone
from health_check import Cache, Database, HealthCheck
from health_check.base import HealthCheckResult
from health_check.exceptions import HealthCheckException, ServiceUnavailable, ServiceWarning

OK = "ok"
DEGRADED = "degraded"
DOWN = "down"


def budget() -> datetime.timedelta:
    return datetime.timedelta(seconds=settings.HEALTH_CHECK_TIMEOUT_SECONDS)


@dataclasses.dataclass
class ChannelLayerRoundTrip(HealthCheck):
    """Sends a message to a fresh channel of this process and receives it back,
    through Redis on the Redis layer (which would otherwise deliver it locally)."""

    async def run(self) -> None:
        layer = get_channel_layer()
        if layer is None:
            raise ServiceUnavailable("no channel layer configured")
        channel = ""
        try:
            channel = await layer.new_channel()
            await getattr(layer, "send_through_redis", layer.send)(channel, {"type": "health.ping"})
            message = await layer.receive(channel)
        except (ConnectionError, OSError) as error:
            raise ServiceUnavailable("cannot reach the channel layer") from error
        except Exception as error:
            # redis-py's errors do not subclass ConnectionError; name no URL.
            raise ServiceUnavailable(f"channel layer error ({type(error).__name__})") from error
        finally:
            if channel:
                await forget_channel(layer, channel)
        if message.get("type") != "health.ping":
            raise ServiceUnavailable("channel layer returned another message")


async def forget_channel(layer, channel: str) -> None:
    """Channels has no delete_channel(): without this, every probe would leave a
    queue (and, on the pub/sub layer, a Redis subscription) behind."""
    queues = getattr(layer, "channels", None)
    if not isinstance(queues, dict) or channel not in queues:
        return
    del queues[channel]
    if hasattr(layer, "_get_shard"):
        with suppress(Exception):
            await layer._get_shard(channel).unsubscribe(channel)


@dataclasses.dataclass
class Disk(HealthCheck):
    """Free space where the server keeps its data (VOICEBOT_DATA_DIR)."""

    path: Path = dataclasses.field(default_factory=lambda: Path(settings.DATA_DIR), repr=False)
    detail: str = dataclasses.field(default="", repr=False)

    def run(self) -> None:
        usage = shutil.disk_usage(self.path)
        free_percent = 100 * usage.free / usage.total
        self.detail = f"{free_percent:.0f}% free ({usage.free // 2**20} MiB)"
        if free_percent < settings.HEALTH_DISK_MIN_FREE_PERCENT:
            raise ServiceWarning(f"disk nearly full: {self.detail}")


def read_meminfo() -> dict[str, int] | None:
    """kB figures from /proc/meminfo, or None where there is none (not Linux)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if len(line.split()) >= 2}


@dataclasses.dataclass
class Memory(HealthCheck):
    """Memory available to new allocations on this host."""

    detail: str = dataclasses.field(default="", repr=False)

    def run(self) -> None:
        info = read_meminfo()
        if not info or "MemAvailable" not in info:
            self.detail = "unknown on this platform"
            return
        available_percent = 100 * info["MemAvailable"] / info["MemTotal"]
        self.detail = f"{available_percent:.0f}% available ({info['MemAvailable'] // 1024} MiB)"
        if available_percent < settings.HEALTH_MEMORY_MIN_AVAILABLE_PERCENT:
            raise ServiceWarning(f"memory low: {self.detail}")


@dataclasses.dataclass
class BotWorkers(HealthCheck):
    """Bot workers: failing when bots are assigned and no worker is alive;
    a warning for each worker that stopped sending heartbeats."""

    detail: str = dataclasses.field(default="", repr=False)

    def run(self) -> None:
        # Imported here: bots imports models, which the URLconf may load before apps are ready.
        from bots import selectors
        from bots.models import Worker

        try:
            live = list(selectors.live_workers().values_list("name", flat=True))
            assigned = selectors.live_assignments().count()
            alive_since = timezone.now() - datetime.timedelta(seconds=settings.BOT_WORKER_TIMEOUT_SECONDS)
            stale = list(
                Worker.objects.filter(stopped_at__isnull=True, heartbeat_at__lt=alive_since).values_list(
                    "name", flat=True
                )
            )
        finally:
            # This runs in an executor thread: give its pooled connection back.
            connections["default"].close()
        self.detail = f"{len(live)} alive, {assigned} bot(s) assigned"
        silent = f"no heartbeat within {settings.BOT_WORKER_TIMEOUT_SECONDS} s: {', '.join(stale)}" if stale else ""
        if assigned and not live:
            raise ServiceUnavailable("; ".join(filter(None, [f"{assigned} bot(s) assigned but no bot worker is alive", silent])))
        if stale:
            raise ServiceWarning(silent)


@dataclasses.dataclass
class Probe:
    """A check with its name in reports, and whether the process can serve without it."""

    name: str
    check: HealthCheck
    critical: bool = True


@dataclasses.dataclass
class Outcome:
    name: str
    critical: bool
    status: str  # "ok", "warning" or "failed"
    message: str
    latency_ms: float
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "critical": self.critical,
            "message": self.message,
            "latency_ms": round(self.latency_ms, 1),
            **({"detail": self.detail} if self.detail else {}),
        }


def redis_cache_configured() -> bool:
    return "redis" in settings.CACHES.get("default", {}).get("BACKEND", "").lower()


def readiness_probes() -> list[Probe]:
    """What this process needs to serve. Replicas are not critical: listings
    can still be read, just not from them."""
    probes = [
        Probe(name=f"database:{alias}", check=Database(alias=alias), critical=alias == "default")
        for alias in settings.DATABASES
    ]
    if redis_cache_configured():
        probes.append(Probe(name="cache", check=Cache(alias="default", timeout=budget())))
    probes.append(Probe(name="channel_layer", check=ChannelLayerRoundTrip()))
    return probes


def detailed_probes() -> list[Probe]:
    return [
        *readiness_probes(),
        Probe(name="disk", check=Disk(), critical=False),
        Probe(name="memory", check=Memory(), critical=False),
        Probe(name="bot_workers", check=BotWorkers()),
    ]


def outcome_of(probe: Probe, result: HealthCheckResult | None, waited: float) -> Outcome:
    detail = getattr(probe.check, "detail", "")
    if result is None:
        message = f"no answer within {settings.HEALTH_CHECK_TIMEOUT_SECONDS} s"
        return Outcome(probe.name, probe.critical, "failed", message, waited * 1000, detail)
    error: HealthCheckException | None = result.error
    if error is None:
        status, message = "ok", ""
    elif isinstance(error, ServiceWarning):
        status, message = "warning", error.message
    else:
        status, message = "failed", error.message
    return Outcome(probe.name, probe.critical, status, str(message), result.time_taken * 1000, detail)


# Blocking checks run here, not in the loop's default executor: a database
# that hangs keeps a thread busy up to the pool timeout, and must not starve
# the other checks or the application of threads.
EXECUTOR = ThreadPoolExecutor(max_workers=32, thread_name_prefix="health-check")
# Blocking checks that outlived their budget, by name, with the event their
# thread sets when it finally returns.
_hung: dict[str, threading.Event] = {}


def guard(probe: Probe) -> threading.Event | None:
    """Wraps a blocking check so its thread reports when it returns. Returns
    None for async checks, which are cancelled outright on timeout."""
    run = probe.check.run
    if inspect.iscoroutinefunction(run):
        return None
    finished = threading.Event()

    def guarded_run() -> None:
        try:
            run()
        finally:
            finished.set()

    probe.check.run = guarded_run
    return finished


def still_hung(probe: Probe) -> bool:
    """True while an earlier run of this check is stuck: repeated probes against
    a hanging dependency then hold one thread, not one per request."""
    finished = _hung.get(probe.name)
    if finished is None:
        return False
    if finished.is_set():
        _hung.pop(probe.name, None)
        return False
    return True


async def start(probe: Probe) -> HealthCheckResult:
    if still_hung(probe):
        error = ServiceUnavailable("the previous check has not returned yet")
        return HealthCheckResult(check=probe.check, error=error, time_taken=0.0)
    return await probe.check.get_result(EXECUTOR)


async def run_probes(probes: list[Probe]) -> list[Outcome]:
    """Runs every check at once and stops waiting when the budget is spent, so
    one hanging dependency cannot hold the probe past the kubelet's timeout."""
    for probe in probes:
        probe.check.timeout = budget()
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = [guard(probe) for probe in probes]
    tasks = [asyncio.ensure_future(start(probe)) for probe in probes]
    await asyncio.wait(tasks, timeout=budget().total_seconds())
    waited = loop.time() - started
    outcomes = []
    for probe, task, finished in zip(probes, tasks, events):
        if task.done():
            outcomes.append(outcome_of(probe, task.result(), waited))
        else:
            task.cancel()
            if finished is not None and not finished.is_set():
                _hung[probe.name] = finished
            outcomes.append(outcome_of(probe, None, waited))
    return outcomes


def overall_status(outcomes: list[Outcome]) -> str:
    if any(o.status == "failed" and o.critical for o in outcomes):
        return DOWN
    if any(o.status != "ok" for o in outcomes):
        return DEGRADED
    return OK


def summary(outcomes: list[Outcome]) -> str:
    failing = [o.name for o in outcomes if o.status == "failed" and o.critical]
    if failing:
        return f"not ready: {', '.join(failing)} failing"
    impaired = [o.name for o in outcomes if o.status != "ok"]
    if impaired:
        return f"serving, degraded: {', '.join(impaired)} not healthy"
    return "all checks pass"
