"""Writes to sessions and lobbies.

Every change that others in a lobby must hear of is published here, once the
transaction has committed, to the lobby's channel-layer group. Consumers only
relay what they receive; they never publish state changes themselves.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from lobbies.models import Lobby, Membership, Session
from lobbies.publisher import publisher
from lobbies.selectors import Peer, live_memberships, peer_of, token_hash


class LobbyNameTaken(Exception):
    pass


class LobbyFull(Exception):
    pass


@dataclass
class JoinResult:
    lobby: Lobby
    membership_id: int
    peer: Peer
    # The others already in the lobby, each with the channel that reaches it.
    peers: list[tuple[Peer, str]]


def lobby_group(lobby_name: str) -> str:
    """Channel-layer group of a lobby. Group names must be ASCII, lobby names need not be."""
    return "lobby." + hashlib.sha256(lobby_name.encode()).hexdigest()[:40]


def publish(lobby_name: str, event: dict[str, Any]) -> None:
    """Send `event` to everyone in the lobby once the current transaction commits."""
    transaction.on_commit(partial(publisher.publish, ("group", lobby_group(lobby_name), event)))


def tell_channel(channel_name: str, event: dict[str, Any]) -> None:
    """Send `event` to one connection once the current transaction commits."""
    transaction.on_commit(partial(publisher.publish, ("channel", channel_name, event)))


def session_create(*, name: str, is_bot: bool = False) -> tuple[Session, str]:
    """Create a session and return it with its resume token, which is not stored."""
    token = secrets.token_urlsafe(32)
    session = Session.objects.create(name=name, is_bot=is_bot, token_hash=token_hash(token))
    return session, token


def lobby_create(*, name: str, private: bool, max_participants: int, created_by: Session) -> Lobby:
    try:
        with transaction.atomic():
            return Lobby.objects.create(
                name=name, private=private, max_participants=max_participants, created_by=created_by
            )
    except IntegrityError:
        raise LobbyNameTaken(name)


@transaction.atomic
def lobby_join(*, lobby_name: str, session: Session, channel_name: str) -> JoinResult:
    """Put `session` in the lobby through `channel_name`, creating a public
    lobby of that name if needed.

    A session still in the lobby (reconnecting, or connected through another
    connection) resumes its place: the older connection, if open, is closed,
    and the others see the peer go `reconnecting` and come back `connected`.
    """
    # The row lock serialises joins of one lobby, so two cannot both take its last place.
    lobby, _ = Lobby.objects.select_for_update().get_or_create(
        name=lobby_name, defaults={"created_by": session}
    )
    roster = list(live_memberships(lobby))
    membership = next((m for m in roster if m.session_id == session.pk), None)
    others = [m for m in roster if m.session_id != session.pk]
    now = timezone.now()

    if membership is None:
        if len(others) >= lobby.max_participants:
            raise LobbyFull(lobby_name)
        membership = Membership.objects.create(session=session, lobby=lobby, channel_name=channel_name)
        publish(lobby_name, {"type": "lobby.peer_joined", "peer": peer_of(membership), "channel": channel_name})
    else:
        _resume(membership, lobby_name, channel_name, now)

    Lobby.objects.filter(pk=lobby.pk).update(last_active_at=now)
    Session.objects.filter(pk=session.pk).update(last_seen_at=now)
    return JoinResult(
        lobby=lobby,
        membership_id=membership.pk,
        peer=peer_of(membership),
        peers=[(peer_of(m), m.channel_name) for m in others],
    )


def _resume(membership: Membership, lobby_name: str, channel_name: str, now: datetime) -> None:
    if membership.state == Membership.State.CONNECTED:
        # Its old connection is still open, or its server died: either way it is gone now.
        tell_channel(membership.channel_name, {"type": "lobby.replaced"})
        membership.state = Membership.State.RECONNECTING
        publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership)})
    membership.state = Membership.State.CONNECTED
    membership.channel_name = channel_name
    membership.disconnected_at = None
    membership.last_seen_at = now
    membership.save(update_fields=["state", "channel_name", "disconnected_at", "last_seen_at"])
    publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership), "channel": channel_name})


def lobby_leave(*, lobby_name: str, session_id: str, channel_name: str) -> None:
    """End the session's stay in the lobby at once, if `channel_name` still holds it."""
    with transaction.atomic():
        membership = _live_membership(lobby_name, session_id, channel_name)
        if membership is not None:
            _end_membership(membership, lobby_name, timezone.now())


def lobby_disconnect(*, lobby_name: str, session_id: str, channel_name: str) -> None:
    """The connection dropped: keep the place for the grace period, then end it."""
    with transaction.atomic():
        membership = _live_membership(lobby_name, session_id, channel_name)
        if membership is None:
            return
        membership.state = Membership.State.RECONNECTING
        membership.disconnected_at = timezone.now()
        membership.save(update_fields=["state", "disconnected_at"])
        publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership)})


def memberships_touch(*, membership_ids: list[int]) -> None:
    """Record that these connections, and their sessions, are alive: two statements however many."""
    if not membership_ids:
        return
    now = timezone.now()
    Membership.objects.filter(pk__in=membership_ids, left_at__isnull=True).update(last_seen_at=now)
    Session.objects.filter(memberships__pk__in=membership_ids).update(last_seen_at=now)


def memberships_expire() -> int:
    """End the stays of participants who dropped and did not come back within
    the grace period, and of connections whose server stopped refreshing them.

    Safe to run in every server process at once: rows another process is
    ending are skipped, so everyone hears of each departure once.
    """
    now = timezone.now()
    grace = timedelta(seconds=settings.LOBBY_RESUME_GRACE_SECONDS)
    silent = grace + timedelta(seconds=2 * settings.PRESENCE_INTERVAL_SECONDS)
    with transaction.atomic():
        expired = list(
            Membership.objects.select_related("session", "lobby")
            .select_for_update(skip_locked=True, of=("self",))
            .filter(left_at__isnull=True)
            .filter(
                Q(state=Membership.State.RECONNECTING, disconnected_at__lt=now - grace)
                | Q(last_seen_at__lt=now - silent)
            )
        )
        for membership in expired:
            _end_membership(membership, membership.lobby.name, now)
    return len(expired)


def _end_membership(membership: Membership, lobby_name: str, now: datetime) -> None:
    membership.left_at = now
    membership.state = Membership.State.LEFT
    membership.save(update_fields=["left_at", "state"])
    Session.objects.filter(pk=membership.session_id).update(last_seen_at=now)
    publish(
        lobby_name,
        {"type": "lobby.peer_left", "peer_id": str(membership.session_id), "channel": membership.channel_name},
    )


def membership_set_muted(*, lobby_name: str, session_id: str, channel_name: str, muted: bool) -> None:
    with transaction.atomic():
        membership = _live_membership(lobby_name, session_id, channel_name)
        if membership is None or membership.muted == muted:
            return
        membership.muted = muted
        membership.save(update_fields=["muted"])
        publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership)})


def _live_membership(lobby_name: str, session_id: str, channel_name: str) -> Membership | None:
    """The membership held by one connection, locked for the rest of the transaction."""
    return (
        Membership.objects.select_related("session")
        .select_for_update()
        .filter(
            lobby__name=lobby_name,
            session_id=session_id,
            channel_name=channel_name,
            left_at__isnull=True,
        )
        .first()
    )
