"""Writes to bots, their lobby assignments, workers and conversation history.

Adding, removing and restarting a bot change an assignment and then tell the
workers (after commit) through the channel layer, so one of them acts within
a moment; workers also poll, so a lost message only delays the change.
The bot itself enters and leaves the room through the same join and leave as
any browser, which tells the people there.
"""

import logging
import os
import secrets
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from bots.models import Assignment, Bot, Turn, Worker
from lobbies import services as lobby_services
from lobbies.cache import invalidate_everywhere, shared
from lobbies.models import Lobby
from lobbies.publisher import publisher
from lobbies.selectors import session_cache_key, token_hash
from monitoring.services import audit_record
from voicebot.security import client_address

logger = logging.getLogger(__name__)

# Channel-layer group every bot worker listens on.
WORKERS_GROUP = "bots.workers"


class BotUnavailable(Exception):
    """The bot cannot be added: it is disabled, already in the lobby, or at its lobby limit."""


@dataclass
class Claim:
    """What a worker needs to run one assignment; the token exists only here."""

    assignment_id: int
    bot_id: int
    lobby_name: str
    session_id: str
    token: str


def notify_workers() -> None:
    """Wake the workers once the current transaction commits."""
    transaction.on_commit(partial(publisher.publish, ("group", WORKERS_GROUP, {"type": "bots.changed"})))


def bot_add_to_lobby(*, bot: Bot, lobby: Lobby, by: AbstractBaseUser | None = None) -> Assignment:
    """Put the bot in the lobby: a worker claims it and the bot joins within moments."""
    with transaction.atomic():
        bot = Bot.objects.select_for_update().get(pk=bot.pk)
        if not bot.enabled:
            raise BotUnavailable(f"{bot.name} is disabled.")
        live = Assignment.objects.filter(bot=bot, removed_at__isnull=True)
        if live.filter(lobby=lobby).exists():
            raise BotUnavailable(f"{bot.name} is already in {lobby.name}.")
        if live.count() >= bot.max_lobbies:
            raise BotUnavailable(f"{bot.name} is already in {bot.max_lobbies} lobbies, its limit.")
        session, _ = lobby_services.session_create(name=bot.name, is_bot=True)
        try:
            with transaction.atomic():
                assignment = Assignment.objects.create(bot=bot, lobby=lobby, session=session, added_by=by)
        except IntegrityError:
            raise BotUnavailable(f"{bot.name} is already in {lobby.name}.")
        notify_workers()
        _audit("bot_add", by, assignment)
    return assignment


def bot_remove_from_lobby(*, assignment: Assignment, by: AbstractBaseUser | None = None) -> bool:
    """Take the bot out of the lobby; its worker makes it leave. Returns whether it was there."""
    with transaction.atomic():
        updated = Assignment.objects.filter(pk=assignment.pk, removed_at__isnull=True).update(
            removed_at=timezone.now(), status=Assignment.Status.PENDING, status_since=timezone.now()
        )
        if updated:
            notify_workers()
            _audit("bot_remove", by, assignment)
    return bool(updated)


def bot_restart(*, assignment: Assignment, by: AbstractBaseUser | None = None) -> bool:
    """Make the bot leave and join again, with fresh settings, on whichever worker claims it."""
    with transaction.atomic():
        updated = Assignment.objects.filter(pk=assignment.pk, removed_at__isnull=True).update(
            worker=None, claimed_at=None, status=Assignment.Status.PENDING, status_since=timezone.now(), last_error=""
        )
        if updated:
            notify_workers()
            _audit("bot_restart", by, assignment)
    return bool(updated)


def worker_register(*, capacity: int) -> Worker:
    """Record a starting worker. An earlier worker of this machine whose process
    is gone is marked stopped, so its bots are claimed now, not after the timeout."""
    hostname, pid = socket.gethostname(), os.getpid()
    with transaction.atomic():
        earlier = Worker.objects.filter(hostname=hostname, stopped_at__isnull=True)
        gone = [worker.pk for worker in earlier if not process_exists(worker.pid)]
        Worker.objects.filter(pk__in=gone).update(stopped_at=timezone.now())
        name = f"{hostname}:{pid}:{uuid.uuid4().hex[:8]}"
        return Worker.objects.create(name=name, hostname=hostname, pid=pid, capacity=capacity)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_heartbeat(*, worker_id: int) -> set[int]:
    """Record that the worker is alive; returns the assignments it still holds.

    An assignment removed, restarted or (after a long stall) taken over by
    another worker is missing from the answer, and the worker stops its bot.
    """
    Worker.objects.filter(pk=worker_id).update(heartbeat_at=timezone.now())
    return set(
        Assignment.objects.filter(worker_id=worker_id, removed_at__isnull=True, bot__enabled=True).values_list(
            "pk", flat=True
        )
    )


def worker_stop(*, worker_id: int) -> None:
    """The worker is shutting down: its assignments wait for another worker at once."""
    with transaction.atomic():
        Assignment.objects.filter(worker_id=worker_id, removed_at__isnull=True).update(
            worker=None, claimed_at=None, status=Assignment.Status.PENDING, status_since=timezone.now()
        )
        Worker.objects.filter(pk=worker_id).update(stopped_at=timezone.now())
        notify_workers()


def assignments_claim(*, worker_id: int, limit: int) -> list[Claim]:
    """Take up to `limit` assignments that no live worker holds.

    Rows are locked with SKIP LOCKED, so workers claiming at the same moment
    take different ones, and each claim gives the bot's session a new token:
    a worker that lost its claim can no longer connect as the bot.
    """
    if limit <= 0:
        return []
    now = timezone.now()
    dead_before = now - timedelta(seconds=settings.BOT_WORKER_TIMEOUT_SECONDS)
    with transaction.atomic():
        free = (
            Assignment.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("lobby", "session")
            .filter(removed_at__isnull=True, bot__enabled=True)
            .filter(
                Q(worker__isnull=True)
                | Q(worker__heartbeat_at__lt=dead_before)
                | Q(worker__stopped_at__isnull=False)
            )
            .exclude(worker_id=worker_id)
            .order_by("created_at")[:limit]
        )
        claims = [_claim(assignment, worker_id, now) for assignment in free]
    return claims


def _claim(assignment: Assignment, worker_id: int, now: datetime) -> Claim:
    token = secrets.token_urlsafe(32)
    session = assignment.session
    old_key = session_cache_key(session.token_hash)
    session.token_hash = token_hash(token)
    # A new token is a use: a bot idle for SESSION_IDLE_DAYS gets one that works.
    session.last_seen_at = now
    session.save(update_fields=["token_hash", "last_seen_at"])
    # The old token must stop working everywhere, not only where it was cached.
    transaction.on_commit(partial(_forget_session_key, old_key))
    Assignment.objects.filter(pk=assignment.pk).update(
        worker_id=worker_id, claimed_at=now, status=Assignment.Status.STARTING, status_since=now, last_error=""
    )
    return Claim(
        assignment_id=assignment.pk,
        bot_id=assignment.bot_id,
        lobby_name=assignment.lobby.name,
        session_id=str(session.pk),
        token=token,
    )


def _forget_session_key(key: str) -> None:
    shared.delete(key)
    invalidate_everywhere(key)


def assignment_set_status(*, assignment_id: int, worker_id: int, status: str, error: str = "") -> None:
    """Record what the bot is doing, if this worker still holds it; `status_since` moves only on a change."""
    Assignment.objects.filter(pk=assignment_id, worker_id=worker_id, removed_at__isnull=True).update(
        status=status,
        status_since=Case(When(status=status, then=F("status_since")), default=Value(timezone.now())),
        last_error=error[:2000] if status == Assignment.Status.ERROR else F("last_error"),
    )


def turn_record(*, assignment_id: int, **fields: Any) -> Turn:
    """Keep one exchange of the conversation (fields as on Turn)."""
    assignment = Assignment.objects.only("bot_id", "lobby_id").get(pk=assignment_id)
    return Turn.objects.create(assignment_id=assignment_id, bot_id=assignment.bot_id, lobby_id=assignment.lobby_id, **fields)


def turns_prune() -> int:
    """Delete conversation history past the retention limit. Returns how many turns went."""
    cutoff = timezone.now() - timedelta(days=settings.BOT_HISTORY_RETENTION_DAYS)
    deleted, _ = Turn.objects.filter(created_at__lt=cutoff).delete()
    return deleted


def _audit(action: str, by: AbstractBaseUser | None, assignment: Assignment) -> None:
    """Record the action (monitoring.AuditEvent and the voicebot.audit log) once
    the transaction that made it has committed; a failure to record it does not undo it."""
    record = partial(
        audit_record,
        action=action,
        user=by,
        actor="" if by else "system",
        ip=client_address.get(),
        lobby=assignment.lobby.name,
        detail={"bot": assignment.bot.name, "bot_id": assignment.bot_id, "lobby_id": assignment.lobby_id},
    )
    transaction.on_commit(record, robust=True)
