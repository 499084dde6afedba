"""Reads about bots: what a worker needs to run one, and how bots are doing."""

from datetime import timedelta
from typing import TypedDict

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from bots.config import BotProfile
from bots.models import Assignment, Bot, Turn, Worker


def assignment_profile(*, assignment_id: int) -> BotProfile:
    """The bot's settings as they are now, so a restart picks up admin changes."""
    assignment = Assignment.objects.select_related("bot__provider", "bot__speech_provider").get(pk=assignment_id)
    return assignment.bot.profile()


class BotAnalytics(TypedDict):
    turns: int
    errors: int
    interrupted: int
    # End of a person's speech to the bot's first audio, over spoken turns.
    first_audio_avg_ms: float | None
    first_audio_p95_ms: float | None


def bot_analytics(*, bot: Bot, days: int | None = None) -> BotAnalytics:
    turns = Turn.objects.filter(bot=bot)
    if days is not None:
        turns = turns.filter(created_at__gte=timezone.now() - timedelta(days=days))
    latencies = sorted(turns.filter(first_audio_ms__isnull=False, source=Turn.Source.VOICE).values_list("first_audio_ms", flat=True))
    return {
        "turns": turns.count(),
        "errors": turns.exclude(error="").count(),
        "interrupted": turns.filter(interrupted=True).count(),
        "first_audio_avg_ms": sum(latencies) / len(latencies) if latencies else None,
        "first_audio_p95_ms": percentile(latencies, 95) if latencies else None,
    }


def percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of an ordered, non-empty list."""
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


def live_workers() -> QuerySet[Worker]:
    """Workers that sent a heartbeat recently and have not stopped."""
    alive_since = timezone.now() - timedelta(seconds=settings.BOT_WORKER_TIMEOUT_SECONDS)
    return Worker.objects.filter(stopped_at__isnull=True, heartbeat_at__gte=alive_since)


def live_assignments() -> QuerySet[Assignment]:
    return Assignment.objects.filter(removed_at__isnull=True)
